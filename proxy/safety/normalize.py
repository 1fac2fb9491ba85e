"""Text as the safety filter compares it: NFKC (full-width and compatibility forms to plain
ones), case-folded, zero-width characters dropped, with a map from every normalized character
back to the original character it came from (to redact or release exact original spans).

Terms are matched on a further *skeleton* view in which common homoglyphs (Cyrillic and Greek
letters that look Latin) and digit/symbol substitutions map to the Latin letter they imitate;
the table is deliberately small (docs/tool-calling.md, "Safety filter"). The skeleton maps one
character to one, so both views share one index map."""

from __future__ import annotations

import functools
import unicodedata

# Invisible characters used to split words past filters: zero-width space/joiners, word joiner,
# soft hyphen, byte-order mark, Mongolian vowel separator.
ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\u00ad\ufeff\u180e")

_HOMOGLYPHS = {
    # Cyrillic (lower case: the text is case-folded first)
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d", "һ": "h", "ӏ": "l", "ԛ": "q", "ԝ": "w",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x", "ω": "w",
    # digits and symbols standing in for letters
    "0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s",
}
SKELETON = str.maketrans(_HOMOGLYPHS)


@functools.lru_cache(maxsize=8192)
def _char(c: str) -> str:
    return "" if c in ZERO_WIDTH else unicodedata.normalize("NFKC", c).casefold()


def normalize(text: str, offset: int = 0) -> tuple[str, list[int]]:
    """(normalized text, index in the original of each normalized character, plus `offset`).
    Character by character, so that each result character has one origin."""
    if text.isascii():  # the common case: case-folding ASCII is lower()
        return text.lower(), list(range(offset, offset + len(text)))
    out: list[str] = []
    index: list[int] = []
    for i, c in enumerate(text, offset):
        n = _char(c)
        out.append(n)
        index.extend([i] * len(n))
    return "".join(out), index


def skeleton(normalized: str) -> str:
    """The homoglyph-folded view of already normalized text (same length)."""
    return normalized.translate(SKELETON)
