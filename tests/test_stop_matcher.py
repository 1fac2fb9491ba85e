import pytest

from edge_runtime.generate import StopMatcher


def _stream(stops: list[str], pieces: list[str]) -> tuple[list[str], bool, str]:
    """(emitted text per push, whether a stop hit, text flushed at the end)."""
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            return out, True, ""
    return out, False, matcher.flush()


def test_no_stop_strings_passes_everything_through():
    assert _stream([], ["ab", "", "c"]) == (["ab", "", "c"], False, "")


def test_no_stop_hit_emits_everything_eventually():
    out, stopped, rest = _stream(["END"], ["hello E", "N", "d E"])
    assert not stopped
    assert out == ["hello ", "", "EN" + "d "]  # "EN" held until "d" rules out "END"
    assert rest == "E"
    assert "".join(out) + rest == "hello ENd E"


def test_stop_split_across_pieces():
    out, stopped, _ = _stream(["</s>"], ["Hi<", "/", "s", "> more"])
    assert stopped
    assert "".join(out) == "Hi"
    assert out == ["Hi", "", "", ""]


def test_stop_inside_one_piece_drops_it_and_everything_after():
    out, stopped, _ = _stream(["\n\n"], ["one\n\ntwo"])
    assert (out, stopped) == (["one"], True)


def test_overlapping_prefixes_hold_the_longest_possible_start():
    # "aab" can start at either 'a' of "aa"; the matcher must keep both.
    out, stopped, _ = _stream(["aab"], ["xa", "a", "a", "b"])
    assert stopped
    assert "".join(out) == "xa"
    out, stopped, rest = _stream(["abab"], ["ab", "a", "c"])
    assert not stopped and "".join(out) + rest == "abac"


def test_first_stop_to_complete_wins():
    # "bc" completes before "abcd" could, so output ends before "bc".
    out, stopped, _ = _stream(["abcd", "bc"], ["a", "b", "c", "d"])
    assert (stopped, "".join(out)) == (True, "a")
    # Both complete in the same push: the earlier start wins.
    out, stopped, _ = _stream(["cd", "xbcd"], ["xbcd"])
    assert (stopped, "".join(out)) == (True, "")


def test_multiple_stops_hold_for_any_of_them():
    matcher = StopMatcher(["STOP", "###"])
    assert matcher.push("text #") == ("text ", False)
    assert matcher.push("#") == ("", False)
    assert matcher.push("S") == ("##", False)  # "##S" cannot become "###"; "S" may be STOP
    assert matcher.push("TOP!") == ("", True)


def test_after_stop_nothing_more_comes_out():
    matcher = StopMatcher(["x"])
    assert matcher.push("ax") == ("a", True)
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError):
        StopMatcher([""])
