"""Statistics for campaign lift: two proportions, their difference, and checks on the split.

* Absolute lift CI: Newcombe's hybrid score interval (method 10), built from Wilson intervals
  of each rate; it keeps its coverage with small counts and rates near 0, where the textbook
  Wald interval does not.
* p-value: two-sided pooled two-proportion z-test.
* Relative lift CI: log risk ratio with the Katz standard error.
* Sample-ratio mismatch: chi-square test of the observed split against the designed one,
  over two arms (treatment, holdout) or any number (holdout and each A/B/n variant).
* Multiple comparisons: Holm–Bonferroni step-down adjusted p-values (controls the
  family-wise error rate, uniformly more powerful than plain Bonferroni).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

Z95 = 1.959963984540054


def wilson(x: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = x / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Lift:
    treated_n: int
    treated_x: int
    control_n: int
    control_x: int
    absolute: float
    absolute_low: float
    absolute_high: float
    relative: float | None
    relative_low: float | None
    relative_high: float | None
    p_value: float

    @property
    def treated_rate(self) -> float:
        return self.treated_x / self.treated_n if self.treated_n else 0.0

    @property
    def control_rate(self) -> float:
        return self.control_x / self.control_n if self.control_n else 0.0

    @property
    def significant(self) -> bool:
        return self.p_value < 0.05


def lift(treated_x: int, treated_n: int, control_x: int, control_n: int) -> Lift:
    """Lift of the treated rate over the control rate with 95% intervals and a p-value."""
    if treated_n <= 0 or control_n <= 0:
        raise ValueError("both groups need at least one person")
    if not (0 <= treated_x <= treated_n and 0 <= control_x <= control_n):
        raise ValueError("conversions must be between 0 and the group size")
    p1, p2 = treated_x / treated_n, control_x / control_n
    l1, u1 = wilson(treated_x, treated_n)
    l2, u2 = wilson(control_x, control_n)
    d = p1 - p2
    # Clamped: at the extremes, rounding can push a bound a hair past ±1.
    low = max(-1.0, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2))
    high = min(1.0, d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))
    pooled = (treated_x + control_x) / (treated_n + control_n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / treated_n + 1 / control_n))
    p_value = 1.0 if se == 0 else float(2 * stats.norm.sf(abs(d) / se))
    rel = rel_low = rel_high = None
    if treated_x > 0 and control_x > 0:
        rr = p1 / p2
        se_log = math.sqrt(1 / treated_x - 1 / treated_n + 1 / control_x - 1 / control_n)
        rel = rr - 1
        rel_low = math.exp(math.log(rr) - Z95 * se_log) - 1
        rel_high = math.exp(math.log(rr) + Z95 * se_log) - 1
    return Lift(
        treated_n, treated_x, control_n, control_x, d, low, high, rel, rel_low, rel_high, p_value
    )


def sample_ratio_p(treated_n: int, control_n: int, holdout_share: float) -> float:
    """p-value that the observed split came from the designed holdout share (low = mismatch)."""
    total = treated_n + control_n
    if total == 0:
        return 1.0
    expected = [total * (1 - holdout_share), total * holdout_share]
    return float(stats.chisquare([treated_n, control_n], expected).pvalue)


SRM_ALPHA = 0.001  # the usual sample-ratio-mismatch threshold: a broken split, not bad luck


def sample_ratio_arms_p(observed: list[int], shares: list[float]) -> float:
    """p-value that ``observed`` counts (one per arm) came from the designed ``shares``.

    A chi-square goodness-of-fit test with ``len(observed) - 1`` degrees of freedom; the
    shares are normalised, so weights in any unit do. Arms designed to get nobody must get
    nobody: one who got people anyway is a certain mismatch (p = 0).
    """
    if len(observed) != len(shares) or len(observed) < 2:
        raise ValueError("one share per arm, and at least two arms")
    if any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ValueError("shares must be non-negative with a positive sum")
    total = sum(observed)
    if total == 0:
        return 1.0
    weight = sum(shares)
    if any(s == 0 and o > 0 for o, s in zip(observed, shares, strict=True)):
        return 0.0
    pairs = [(o, total * s / weight) for o, s in zip(observed, shares, strict=True) if s > 0]
    if len(pairs) < 2:
        return 1.0
    obs, exp = [o for o, _ in pairs], [e for _, e in pairs]
    return float(stats.chisquare(obs, exp).pvalue)


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given.

    Sorted ascending, the i-th smallest (from 0) is multiplied by ``m - i``, made monotone
    non-decreasing and capped at 1; a hypothesis is rejected at level α when its adjusted
    p-value is below α, which keeps the family-wise error rate at α.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class MeanDifference:
    """Difference of two means (e.g. revenue per customer) with a 95% Welch interval."""

    treated_mean: float
    control_mean: float
    difference: float
    low: float
    high: float
    p_value: float


def mean_difference(
    treated_n: int,
    treated_sum: float,
    treated_sumsq: float,
    control_n: int,
    control_sum: float,
    control_sumsq: float,
) -> MeanDifference:
    """Welch's t interval and test from counts, sums and sums of squares (as a warehouse gives).

    Revenue per customer is heavily skewed (most spend nothing); Welch's interval does not
    assume equal variances and, with the group sizes of a campaign, the t approximation holds.
    """
    if treated_n < 2 or control_n < 2:
        raise ValueError("both groups need at least two people")
    m1, m2 = treated_sum / treated_n, control_sum / control_n
    v1 = max(0.0, (treated_sumsq - treated_n * m1 * m1) / (treated_n - 1))
    v2 = max(0.0, (control_sumsq - control_n * m2 * m2) / (control_n - 1))
    a, b = v1 / treated_n, v2 / control_n
    d = m1 - m2
    se = math.sqrt(a + b)
    if se == 0:
        return MeanDifference(m1, m2, d, d, d, 1.0 if d == 0 else 0.0)
    df = (a + b) ** 2 / (a * a / (treated_n - 1) + b * b / (control_n - 1))
    t = float(stats.t.ppf(0.975, df))
    p = float(2 * stats.t.sf(abs(d) / se, df))
    return MeanDifference(m1, m2, d, d - t * se, d + t * se, p)
