"""Confidence intervals for the small counts a CPU run produces, so "0/3" reads as what it is.

The Wilson score interval (Wilson 1927) rather than the textbook normal one: it stays inside [0, 1] and
does not collapse to a width of zero at 0/n or n/n, which is where small runs live (0/3 successes is
consistent with a true rate anywhere from 0 to 0.56).
"""
from __future__ import annotations

import math
from statistics import NormalDist

Z95 = NormalDist().inv_cdf(0.975)  # 1.959963984540054, the two-sided 95% normal quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (lower, upper) of a proportion k/n; 95% with the default z."""
    if isinstance(k, bool) or isinstance(n, bool) or not (isinstance(k, int) and isinstance(n, int)):
        raise TypeError(f"k and n must be integers, got {k!r} and {n!r}")
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at k = 0 and k = n the bound is exactly 0 or 1; rounding would leave 1e-17 off it
    return (0.0 if k == 0 else max(0.0, center - half), 1.0 if k == n else min(1.0, center + half))


def difference_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """The 95% interval of the difference k1/n1 - k2/n2 of two independent proportions, from their Wilson
    intervals (Newcombe 1998, method 10, "hybrid score"). A change is real when it excludes 0. Asking whether
    the two Wilson intervals overlap instead is far more conservative: 3/48 against 13/48 overlap, yet their
    difference, +0.21 [0.06, 0.35], excludes 0."""
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = wilson_interval(k1, n1, z), wilson_interval(k2, n2, z)
    d = p1 - p2
    return d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


def paired_difference_interval(both: int, only_first: int, only_second: int, neither: int,
                               z: float = Z95) -> tuple[float, float]:
    """The 95% interval of p1 - p2 when both proportions are measured on the same n items (two models on the
    same histories, steps or tasks): the four cells of the paired table, items that are 1 for both, for the
    first only, for the second only, for neither. Newcombe (1998b, "Improved confidence intervals for the
    difference between binomial proportions based on paired data", method 10): the two Wilson intervals
    combined with the correlation of the pairs (phi, continuity-corrected), which the unpaired
    `difference_interval` ignores: two models that agree on most items differ more surely than their two
    shares alone say. Checked against Newcombe's published examples (tests/test_stats.py)."""
    cells = (both, only_first, only_second, neither)
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in cells) or not sum(cells):
        raise ValueError(f"need four counts >= 0, not all 0, got {cells}")
    n = sum(cells)
    k1, k2 = both + only_first, both + only_second
    p1, p2 = k1 / n, k2 / n
    (l1, u1), (l2, u2) = wilson_interval(k1, n, z), wilson_interval(k2, n, z)
    margins = k1 * (n - k1) * k2 * (n - k2)
    cross = both * neither - only_first * only_second
    corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = corrected / math.sqrt(margins) if margins else 0.0
    d = p1 - p2
    lower = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return d - lower, d + upper


def format_share(k: int, n: int) -> str:
    """`3/12 = 0.25 [0.09, 0.53]`: the count, the share and its Wilson 95% interval (`0/0` when n is 0)."""
    if not n:
        return f"{k}/{n}"
    lo, hi = wilson_interval(k, n)
    return f"{k}/{n} = {k / n:.2f} [{lo:.2f}, {hi:.2f}]"
