"""Summaries of measured samples: percentiles and medians, in milliseconds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Summary:
    """Distribution of a latency sample, in milliseconds."""

    n: int
    p50: float
    p99: float
    max: float
    min: float

    def as_dict(self) -> dict[str, float]:
        """A JSON-able dict."""
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo = math.floor(k)
    hi = math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize_ms(seconds: Sequence[float]) -> Summary:
    """Summarise a sample given in seconds, reported in milliseconds."""
    ms = [s * 1e3 for s in seconds]
    if not ms:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    return Summary(len(ms), percentile(ms, 50), percentile(ms, 99), max(ms), min(ms))


def median(values: Sequence[float]) -> float:
    """Median, NaN for no values."""
    return statistics.median(values) if values else math.nan
