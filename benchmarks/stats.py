"""Summary statistics shared by every benchmark: median and nearest-rank p95."""

from __future__ import annotations

import math
import statistics


def nearest_rank(xs: list[float], q: float) -> float:
    """The smallest value with at least ``q`` of the samples at or below it."""
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def summary(xs: list[float], scale: float = 1.0, nd: int = 4) -> dict:
    """n, median, nearest-rank p95, min, max of ``xs`` (times ``scale``, ``nd`` digits)."""
    if not xs:
        return {"n": 0}
    s = sorted(x * scale for x in xs)
    return {
        "n": len(s),
        "median": round(statistics.median(s), nd),
        "p95": round(nearest_rank(s, 0.95), nd),
        "min": round(s[0], nd),
        "max": round(s[-1], nd),
    }


def ratio(peer: float | None, ours: float | None) -> float | None:
    """peer / ours to one decimal (bigger: we are faster or smaller); None if either is missing."""
    if not peer or not ours:
        return None
    return round(peer / ours, 1)
