"""Lift statistics against published reference values and their own invariants."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from closedloop.measure.stats import lift, sample_ratio_p, wilson


@pytest.mark.parametrize(
    ("x1", "n1", "x2", "n2", "low", "high"),
    [
        # Newcombe (1998), Statistics in Medicine 17:873-890, Table II, method 10.
        (56, 70, 48, 80, 0.0524, 0.3339),
        (9, 10, 3, 10, 0.1705, 0.8090),
    ],
)
def test_newcombe_interval_matches_published_values(
    x1: int, n1: int, x2: int, n2: int, low: float, high: float
) -> None:
    result = lift(x1, n1, x2, n2)
    assert result.absolute_low == pytest.approx(low, abs=5e-4)
    assert result.absolute_high == pytest.approx(high, abs=5e-4)


def test_wilson_matches_published_value() -> None:
    # Newcombe (1998), Table I: 81/263 → 0.2553 to 0.3662 (score method).
    low, high = wilson(81, 263)
    assert low == pytest.approx(0.2553, abs=5e-4) and high == pytest.approx(0.3662, abs=5e-4)


@given(
    st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
    st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
)
def test_interval_contains_estimate_and_p_value_is_a_probability(
    t: tuple[int, int], c: tuple[int, int]
) -> None:
    r = lift(t[0], t[1], c[0], c[1])
    assert r.absolute_low <= r.absolute + 1e-12 <= r.absolute_high + 2e-12
    assert r.absolute_low >= -1.0 and r.absolute_high <= 1.0
    assert 0.0 <= r.p_value <= 1.0


def test_p_value_and_significance() -> None:
    assert lift(300, 1000, 200, 1000).significant
    assert not lift(21, 100, 20, 100).significant


def test_bad_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least one person"):
        lift(0, 0, 1, 10)
    with pytest.raises(ValueError, match="between 0 and the group size"):
        lift(11, 10, 1, 10)


def test_sample_ratio_mismatch() -> None:
    assert sample_ratio_p(800, 200, 0.2) > 0.5
    assert sample_ratio_p(900, 100, 0.2) < 1e-6


COUNTS = st.integers(1, 300).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n)))


@given(COUNTS, COUNTS, st.integers(2, 20))
def test_newcombe_interval_narrows_with_more_people(
    t: tuple[int, int], c: tuple[int, int], k: int
) -> None:
    # The same rates from k times as many people: a narrower interval (never wider).
    small = lift(t[0], t[1], c[0], c[1])
    large = lift(t[0] * k, t[1] * k, c[0] * k, c[1] * k)
    assert large.absolute == pytest.approx(small.absolute)
    width = small.absolute_high - small.absolute_low
    assert large.absolute_high - large.absolute_low < width
    assert large.absolute_low <= large.absolute + 1e-12 <= large.absolute_high + 2e-12


@given(COUNTS, COUNTS)
def test_relative_interval_contains_its_estimate(t: tuple[int, int], c: tuple[int, int]) -> None:
    r = lift(t[0], t[1], c[0], c[1])
    if r.relative is not None:
        assert r.relative_low is not None and r.relative_high is not None
        assert r.relative_low <= r.relative * (1 + 1e-9) + 1e-12
        assert r.relative <= r.relative_high * (1 + 1e-9) + 1e-12


VALUES = st.lists(
    st.floats(0, 1000, allow_nan=False).map(lambda x: round(x, 2)), min_size=2, max_size=60
)


@given(VALUES, VALUES)
def test_welch_interval_matches_scipy(a: list[float], b: list[float]) -> None:
    import numpy as np

    from closedloop.measure.stats import mean_difference

    xa, xb = np.array(a), np.array(b)
    r = mean_difference(
        len(a), float(xa.sum()), float((xa**2).sum()), len(b), float(xb.sum()), float((xb**2).sum())
    )
    assert r.low <= r.difference + 1e-9 and r.difference <= r.high + 1e-9
    assert 0.0 <= r.p_value <= 1.0
    if xa.var() > 1e-6 and xb.var() > 1e-6:
        ref = stats.ttest_ind(xa, xb, equal_var=False)
        ci = ref.confidence_interval(0.95)
        assert r.p_value == pytest.approx(ref.pvalue, rel=1e-4, abs=1e-6)
        assert r.low == pytest.approx(ci.low, rel=1e-4, abs=1e-4)
        assert r.high == pytest.approx(ci.high, rel=1e-4, abs=1e-4)


def test_welch_needs_two_people_a_side() -> None:
    from closedloop.measure.stats import mean_difference

    with pytest.raises(ValueError, match="at least two"):
        mean_difference(1, 1.0, 1.0, 5, 1.0, 1.0)
