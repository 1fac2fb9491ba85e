"""PII detectors: each finds spans in normalized text (full-width digits are plain digits by
then) and confirms them with a check where the format has one (Luhn for card numbers, the
checksum of Chinese resident IDs, the rules of US social security numbers)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

Span = tuple[int, int]

_EMAIL = re.compile(r"[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}")
# International (+CC ...) or national forms with separators; 9 to 15 digits, checked below.
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]?\d{2,4}){2,4}(?![\w])")
_CARD = re.compile(r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)")
_SSN = re.compile(r"(?<!\d)(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?!\d)")
_NINO = re.compile(r"(?<![a-z0-9])(?!bg|gb|kn|nk|nt|tn|zz)[a-ceghj-pr-tw-z][a-ceghj-npr-tw-z] ?\d{2} ?\d{2} ?\d{2} ?[a-d](?![a-z0-9])")
_CN_ID = re.compile(r"(?<!\d)\d{17}[\dx](?![\dx])")
_CN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


def luhn(number: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(number)):
        d = int(c)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _cn_id_ok(s: str) -> bool:
    check = "10x98765432"[sum(int(c) * w for c, w in zip(s[:17], _CN_WEIGHTS)) % 11]
    return s[17] == check


def _spans(pattern: re.Pattern[str], ok: Callable[[str], bool] = lambda s: True,
           needs: str = "0123456789") -> Callable[[str], Iterator[Span]]:
    """A detector: the pattern's matches that pass `ok`, looked for only in text holding one of
    `needs` (most streamed text has no digits and no `@`: skipping the regex is what keeps
    the filter cheap per token)."""
    def find(text: str) -> Iterator[Span]:
        if not any(c in text for c in needs):
            return
        for m in pattern.finditer(text):
            if ok(m.group()):
                yield m.span()

    return find


_NATIONAL = (_spans(_SSN), _spans(_NINO), _spans(_CN_ID, _cn_id_ok))

# Name -> finder, in precedence order: of two matches of one span, the earlier detector names it.
DETECTORS: dict[str, Callable[[str], Iterator[Span]]] = {
    "national_id": lambda text: (span for find in _NATIONAL for span in find(text)),
    "card": _spans(_CARD, lambda s: 13 <= len(_digits(s)) <= 19 and luhn(_digits(s))),
    "email": _spans(_EMAIL, needs="@"),
    "phone": _spans(_PHONE, lambda s: 9 <= len(_digits(s)) <= 15),
}
