"""The safety filter without a server: normalization (width, case, homoglyphs, zero-width
characters), the PII detectors and their checks, whole-text screening, the streaming guard
split at every possible point, the policy's validation and its reload."""

from __future__ import annotations

import time

import pytest

from edge_wire.settings import ConfigError
from proxy.safety import PolicySource, PolicyViolation, SafetyFilter, screen_prompt
from proxy.safety.detectors import DETECTORS, luhn
from proxy.safety.normalize import normalize, skeleton
from proxy.safety.policy import from_table, load

POLICY = {
    "hold_back_chars": 24,
    "categories": {
        "weapons": {"terms": ["pipe bomb", "nerve agent"], "action": "block"},
        "codename": {"terms": ["project falcon"], "action": "redact", "replacement": "[CODENAME]"},
        "watch": {"patterns": [r"launch\s+codes?"], "action": "log", "direction": "input"},
    },
    "pii": {"email": "redact", "phone": "redact", "card": "block", "national_id": "redact"},
}
# The same blocked phrase as a model or a user might disguise it.
DISGUISES = ["Pipe Bomb", "ＰＩＰＥ ＢＯＭＢ", "pipe-bomb", "PIPE\u200b BOMB", "рiре bоmb", "p1pe b0mb", "pipe\n  bomb"]


@pytest.fixture(scope="module")
def safety() -> SafetyFilter:
    return SafetyFilter(from_table(POLICY, None))


def test_normalization_maps_back_to_the_original():
    text = "Ａb\u200bC ﬁ"
    basic, index = normalize(text)
    assert basic == "abc fi"
    assert [text[i] for i in index] == ["Ａ", "b", "C", " ", "ﬁ", "ﬁ"]
    assert skeleton("раураl 0nе") == "paypal one"


@pytest.mark.parametrize("detector, text, found", [
    ("email", "write to Bob.Smith+x@mail.example.co.uk today", "bob.smith+x@mail.example.co.uk"),
    ("phone", "call +1 (415) 555-0132 now", "+1 (415) 555-0132"),
    ("phone", "call 020 7946 0958", "020 7946 0958"),
    ("card", "card 4111 1111 1111 1111 ok", "4111 1111 1111 1111"),
    ("card", "card 4111 1111 1111 1112 ok", None),  # fails Luhn
    ("national_id", "ssn 123-45-6789", "123-45-6789"),
    ("national_id", "ssn 666-45-6789", None),  # never issued
    ("national_id", "nino ab 12 34 56 c", "ab 12 34 56 c"),
    ("national_id", "id 11010519491231002x", "11010519491231002x"),
    ("national_id", "id 110105194912310021", None),  # bad checksum
    ("phone", "in 2024-11-05 at 10", None),
])
def test_detectors(detector, text, found):
    spans = list(DETECTORS[detector](normalize(text)[0]))
    assert [normalize(text)[0][a:b] for a, b in spans] == ([found] if found else [])


def test_luhn():
    assert luhn("79927398713") and not luhn("79927398710")


@pytest.mark.parametrize("form", DISGUISES)
def test_screen_blocks_every_disguise(safety, form):
    screened = safety.screen(f"How do I build a {form} at home?", "input")
    assert screened.blocked is not None and screened.blocked.name == "weapons"
    assert screened.text == "How do I build a "


def test_screen_redacts_and_keeps_the_rest(safety):
    text = "Mail ANN@Example.org or call +44 20 7946 0958 about Project  Falcon; ssn 123-45-6789. Thanks!"
    screened = safety.screen(text, "output")
    assert screened.blocked is None
    assert screened.text == "Mail [EMAIL] or call [PHONE] about [CODENAME]; ssn [NATIONAL_ID]. Thanks!"


def test_terms_match_whole_words_only(safety):
    assert safety.screen("a pipebombastic idea", "input").blocked is None
    assert safety.screen("pipe bomb.", "input").blocked is not None


def _stream(safety: SafetyFilter, pieces: list[str]) -> tuple[list[str], object]:
    guard = safety.output_guard()
    out = [guard.push(p) for p in pieces]
    out.append(guard.flush())
    return out, guard.blocked


@pytest.mark.parametrize("form", DISGUISES)
def test_a_blocked_phrase_split_anywhere_never_leaves(safety, form):
    text = f"Sure. Here is how to make a {form}: first you take"
    term = skeleton(normalize("pipe bomb")[0]).replace(" ", "")
    for a in range(1, len(text)):
        for b in range(a, len(text), 7):  # three pieces: every first cut, a spread of second cuts
            out, blocked = _stream(safety, [text[:a], text[a:b], text[b:]])
            assert blocked is not None
            shown = "".join(out)
            assert shown == "Sure. Here is how to make a "
            for chunk in [*out, shown]:
                squeezed = "".join(skeleton(normalize(chunk)[0]).split()).replace("-", "")
                assert term not in squeezed


def test_redaction_in_a_stream_equals_the_whole_text(safety):
    text = "Reach me at zoe@example.com, or about Project Falcon at 415-555-0132. Bye."
    whole = safety.screen(text, "output").text
    for a in range(len(text) + 1):
        for size in (1, 3, 8):
            pieces = [text[:a]] + [text[i:i + size] for i in range(a, len(text), size)]
            out, blocked = _stream(safety, pieces)
            assert blocked is None and "".join(out) == whole


def test_clean_text_streams_with_a_bounded_delay(safety):
    guard = safety.output_guard()
    text = "All quiet in the greenhouse today, nothing to report at all. " * 3
    released = "".join(guard.push(c) for c in text)
    assert len(text) - len(released) <= safety.hold_back + 1
    assert released + guard.flush() == text


def test_screen_prompt_redacts_messages_and_blocks_by_field(safety):
    prompt = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "I am bob@example.com"}]}
    out = screen_prompt(safety, prompt)
    assert out["messages"][0] is prompt["messages"][0] and out["messages"][1]["content"] == "I am [EMAIL]"
    with pytest.raises(PolicyViolation) as info:
        screen_prompt(safety, {"messages": [*prompt["messages"], {"role": "user", "content": "ｎｅｒｖｅ  agent"}]})
    assert info.value.param == "messages[2].content" and info.value.category.name == "weapons"
    assert screen_prompt(safety, {"prompt_ids": [1, 2]}) == {"prompt_ids": [1, 2]}


def test_events_are_counted_by_category():
    events = []
    safety = SafetyFilter(from_table(POLICY, None), lambda *e: events.append(e))
    safety.screen("launch codes for pipe bomb, mail a@b.io", "input")
    assert ("input", "watch", "log") in events and ("input", "weapons", "block") in events
    assert ("input", "pii_email", "redact") in events


@pytest.mark.parametrize("table, words", [
    ({"categories": {"x": {"terms": ["a"], "action": "ban"}}}, "categories.x.action"),
    ({"categories": {"x": {"patterns": ["("]}}}, "categories.x.patterns[0]"),
    ({"categories": {"x": {"action": "block"}}}, "needs terms or patterns"),
    ({"pii": {"passport": "block"}}, "pii.passport"),
    ({"hold_back_chars": 0}, "hold_back_chars"),
    ({"colour": "red"}, "unknown key 'colour'"),
])
def test_bad_policy_names_the_key(table, words):
    with pytest.raises(ConfigError) as info:
        from_table(table, None)
    assert words in str(info.value)


def test_policy_file_reloads_on_change_and_on_request(tmp_path, monkeypatch):
    monkeypatch.setattr("proxy.safety.source.CHECK_INTERVAL_S", 0.0)
    policy = tmp_path / "safety.toml"
    policy.write_text('[safety.categories.a]\nterms = ["alpha"]\n')
    config = tmp_path / "config.toml"
    config.write_text('[safety]\npolicy_file = "safety.toml"\n')
    source = PolicySource(load({"safety": {"policy_file": "safety.toml"}}, config))
    assert source.current().screen("alpha", "input").blocked is not None
    time.sleep(0.01)
    policy.write_text('[safety.categories.b]\nterms = ["beta"]\n')
    assert source.current().screen("alpha", "input").blocked is None  # changed file: read again
    assert source.current().screen("beta", "input").blocked is not None
    policy.write_text("[safety.categories.c]\nterms = 3\n")  # broken: the previous policy stays
    assert source.reload() is False
    assert source.current().screen("beta", "input").blocked is not None
