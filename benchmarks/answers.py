"""Final-number extraction for GSM-style answers, robust to the formats small models actually produce."""

from __future__ import annotations

import math
import re

_NUM = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
_PATTERNS = [
    re.compile(r"####\s*(" + _NUM + ")"),
    re.compile(r"\\boxed\{\s*(" + _NUM + r")\s*\}"),
    re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:|=)?\s*[:=]?\s*\**\s*(" + _NUM + ")", re.IGNORECASE),
]
_ANY = re.compile(_NUM)


def to_number(s: str) -> float | None:
    s = s.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        x = float(s)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def extract_answer(text: str) -> float | None:
    """The final number of a solution: an explicit marker (####, \\boxed{}, "the answer is") wins, the LAST such
    marker if several; otherwise the last number in the text."""
    for pat in _PATTERNS:
        hits = pat.findall(text)
        if hits:
            return to_number(hits[-1])
    nums = _ANY.findall(text)
    return to_number(nums[-1]) if nums else None


def is_correct(text: str, gold: float | str) -> bool:
    pred = extract_answer(text)
    g = to_number(str(gold)) if not isinstance(gold, float) else gold
    return pred is not None and g is not None and abs(pred - g) < 1e-6 * max(1.0, abs(g))
