"""Pure statistics for the accuracy benchmark: Wilson intervals, the exact McNemar test, validation selection.

No engine, no numpy/scipy: everything here is unit-tested on hand-made inputs (``tests/test_accuracy.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes out of n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def binom_two_sided(k: int, n: int) -> float:
    """Two-sided exact p of k (or fewer) of n fair coin flips going one way: 2 * P(X <= min(k, n - k)), capped at 1."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Paired exact McNemar test of two methods graded on the same items (``a[i]``, ``b[i]``: item i correct).

    Returns the accuracy difference a - b in points, the discordant counts (``a_only``: a right and b wrong) and the
    two-sided exact p (binomial on the discordant pairs; concordant items carry no information).
    """
    if len(a) != len(b):
        raise ValueError(f"paired test needs the same items: {len(a)} vs {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n = len(a)
    diff = 100.0 * (a_only - b_only) / n if n else float("nan")
    return {"diff_points": diff, "a_only": a_only, "b_only": b_only, "n": n,
            "p": binom_two_sided(a_only, a_only + b_only)}


def select_best_alpha(val_accuracy: Mapping[float, float]) -> float:
    """The fixed a with the highest validation accuracy; ties go to the smaller a (closer to the base)."""
    if not val_accuracy:
        raise ValueError("no fixed a to select from")
    return min(val_accuracy, key=lambda a: (-val_accuracy[a], a))


def select_best_label(val_accuracy: Mapping[str, float]) -> str:
    """The method with the highest validation accuracy; ties go to the first one in the mapping's order."""
    if not val_accuracy:
        raise ValueError("no method to select from")
    order = list(val_accuracy)
    return min(order, key=lambda m: (-val_accuracy[m], order.index(m)))
