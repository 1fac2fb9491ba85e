"""The safety filter: a policy compiled to matchers, applied to a whole text (prompts, complete
answers) or incrementally to streamed output, holding back the tail that a blocked phrase
could still be completing so that no part of it is ever released."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .detectors import DETECTORS, Span
from .normalize import normalize, skeleton
from .policy import Category, SafetyConfig

EventSink = Callable[[str, str, str], None]  # (direction, category, action)
_CONTEXT_CHARS = 8  # released text kept to judge word boundaries at the start of the held text
_RANK = {name: i for i, name in enumerate(DETECTORS)}


@dataclass(frozen=True)
class Hit:
    category: Category
    start: int  # in the normalized text
    end: int


@dataclass(frozen=True)
class Screened:
    text: str  # the text with redactions applied (up to the block, when blocked)
    blocked: Category | None  # the category that blocked it


class SafetyFilter:
    def __init__(self, config: SafetyConfig, on_event: EventSink | None = None) -> None:
        self.config = config
        self.active = config.active
        # Whether answers need a guard at all (one holds streamed text back).
        self.checks_output = self.active and any(c.applies("output") for c in config.categories)
        self._on_event = on_event or (lambda direction, category, action: None)
        self._matchers: dict[str, list[tuple[Category, str, Callable[[str], list[Span]]]]] = {
            direction: [m for c in config.categories if c.applies(direction) for m in _compile(c)]
            for direction in ("input", "output")
        }
        longest = max((len(normalize(t)[0]) for c in config.categories for t in c.terms), default=0)
        self.hold_back = max(config.hold_back_chars, longest)

    def hits(self, basic: str, skel: str, direction: str) -> list[Hit]:
        """Every match in normalized text (`skel` is its skeleton view), earliest first."""
        out = []
        for category, view, find in self._matchers[direction]:
            out += [Hit(category, s, e) for s, e in find(skel if view == "skeleton" else basic)]
        # Of two matches of one span, the policy's own terms first, then detectors in DETECTORS order.
        return sorted(out, key=lambda h: (h.start, -h.end, _RANK.get(h.category.detector, -1)))

    def screen(self, text: str, direction: str) -> Screened:
        """Check a whole text: the first blocking category, or the text with redactions."""
        if not self.active:
            return Screened(text, None)
        basic, index = normalize(text)
        hits = self.hits(basic, skeleton(basic), direction)
        self.count(hits, direction)
        block = next((h for h in hits if h.category.action == "block"), None)
        end = len(text) if block is None else index[block.start]
        return Screened(redact(text, index, hits, 0, end), None if block is None else block.category)

    def output_guard(self) -> OutputGuard:
        return OutputGuard(self)

    def count(self, hits: list[Hit], direction: str) -> None:
        for hit in hits:
            self._on_event(direction, hit.category.name, hit.category.action)


def redact(text: str, index: list[int], hits: list[Hit], start: int, end: int) -> str:
    """text[start:end] with the redact hits that lie inside it replaced (earliest first; a hit
    overlapping one already replaced is skipped)."""
    out: list[str] = []
    pos = start
    for hit in hits:
        if hit.category.action != "redact":
            continue
        a, b = index[hit.start], index[hit.end - 1] + 1
        if a < pos or b > end:
            continue
        out += [text[pos:a], hit.category.replacement]
        pos = b
    out.append(text[pos:end])
    return "".join(out)


class OutputGuard:
    """Streamed output through the filter: push() returns the text that is safe to send now;
    once a blocking phrase is found, `blocked` names its category and nothing more is released."""

    def __init__(self, safety: SafetyFilter) -> None:
        self._filter = safety
        self._hold = safety.hold_back
        self._context = ""  # the end of what was released
        self._buf = ""  # not yet released
        self.blocked: Category | None = None

    def push(self, text: str) -> str:
        if self.blocked is not None or not text:
            return ""
        self._buf += text
        return self._release(final=False)

    def flush(self) -> str:
        """The rest, once the output has ended."""
        if self.blocked is not None or not self._buf:
            return ""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        ctx = len(self._context)
        whole = self._context + self._buf
        basic, index = normalize(whole)
        n = len(basic)
        hits = [h for h in self._filter.hits(basic, skeleton(basic), "output") if index[h.start] >= ctx]
        # A match touching the end may still grow or stop matching ("bomb" -> "bombastic").
        settled = hits if final else [h for h in hits if h.end < n]
        cut = len(whole)
        if not final:
            held = n - self._hold
            cut = ctx if held <= 0 else max(ctx, index[held] if held < n else len(whole))
            cut = _before_straddlers(cut, hits, index)
        block = next((h for h in settled if h.category.action == "block" and index[h.start] < cut), None)
        if block is not None:
            cut = index[block.start]
            self.blocked = block.category
        released = [h for h in settled if index[h.end - 1] < cut]
        self._filter.count(released if block is None else [*released, block], "output")
        out = redact(whole, index, released, ctx, cut)
        self._context = (self._context + whole[ctx:cut])[-_CONTEXT_CHARS:]
        self._buf = whole[cut:]
        return out


def _before_straddlers(cut: int, hits: list[Hit], index: list[int]) -> int:
    """Move the release point back to the start of any match it would cut in two."""
    moved = True
    while moved:
        moved = False
        for h in hits:
            a, b = index[h.start], index[h.end - 1] + 1
            if a < cut < b:
                cut, moved = a, True
    return cut


def _compile(category: Category) -> list[tuple[Category, str, Callable[[str], list[Span]]]]:
    """(category, view, finder) triples: terms on the skeleton view, patterns and detectors on
    the normalized one."""
    out = []
    if category.terms:
        out.append((category, "skeleton", _finder(re.compile(_terms_regex(category.terms)))))
    if category.patterns:
        out.append((category, "basic", _finder(re.compile("|".join(f"(?:{p})" for p in category.patterns), re.IGNORECASE))))
    if category.detector:
        detector = DETECTORS[category.detector]
        out.append((category, "basic", lambda text: list(detector(text))))
    return out


def _finder(pattern: re.Pattern[str]) -> Callable[[str], list[Span]]:
    return lambda text: [m.span() for m in pattern.finditer(text) if m.end() > m.start()]


_SEP = "\0"  # stands for the gap between two words of a term while the trie is built


def _terms_regex(terms: tuple[str, ...]) -> str:
    """Terms as one pattern on skeleton text: words separated by any non-word characters
    (`pipe-bomb`, `pipe  bomb`, `pipebomb`), whole words where a term starts or ends with a
    letter or digit. Terms are merged into a trie, so matching costs about one pass whatever
    their number (an alternation of many literals is tried literal by literal)."""
    groups: dict[tuple[bool, bool], list[str]] = {}
    for term in terms:
        words = skeleton(normalize(term)[0]).split()
        edges = (_word_edge(words[0][0]), _word_edge(words[-1][-1]))
        groups.setdefault(edges, []).append(_SEP.join(words))
    parts = []
    for (head, tail), keys in groups.items():
        body = _trie_regex(keys)
        parts.append(("(?<![a-z0-9])" if head else "") + f"(?:{body})" + ("(?![a-z0-9])" if tail else ""))
    return "|".join(parts)


def _word_edge(c: str) -> bool:
    return c.isascii() and c.isalnum()


def _trie_regex(keys: list[str]) -> str:
    trie: dict = {}
    for key in keys:
        node = trie
        for c in key:
            node = node.setdefault(c, {})
        node[""] = {}  # end of a key
    return _node_regex(trie)


def _node_regex(node: dict) -> str:
    ends = "" in node
    branches = [(r"[\W_]*" if c == _SEP else re.escape(c)) + _node_regex(child) for c, child in sorted(node.items()) if c]
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    return f"(?:{body})?" if ends else body


class PolicyViolation(Exception):
    """Input the policy blocks; `param` is the request field that held it."""

    def __init__(self, category: Category, param: str) -> None:
        super().__init__(f"the request was blocked by the content policy (category: {category.name})")
        self.category = category
        self.param = param


def screen_prompt(safety: SafetyFilter, prompt: dict[str, Any]) -> dict[str, Any]:
    """An engine prompt (`{"messages": [...]}`, `{"prompt": str}` or `{"prompt_ids": [...]}`) with
    the input policy applied: redactions made, or PolicyViolation for blocked text. Token-id
    prompts carry no text to check and pass as they are. For every front (HTTP, MQTT)."""
    if not safety.active:
        return prompt
    if "prompt" in prompt:
        screened = safety.screen(prompt["prompt"], "input")
        if screened.blocked is not None:
            raise PolicyViolation(screened.blocked, "prompt")
        return {**prompt, "prompt": screened.text}
    if "messages" not in prompt:
        return prompt
    messages = []
    for i, message in enumerate(prompt["messages"]):
        screened = safety.screen(message.get("content") or "", "input")
        if screened.blocked is not None:
            raise PolicyViolation(screened.blocked, f"messages[{i}].content")
        messages.append({**message, "content": screened.text} if screened.text != message.get("content") else message)
    return {**prompt, "messages": messages}
