"""The Wilson interval against values computed once with a reference implementation."""
import pytest

from eval_agent.stats import Z95, overlap, wilson_interval

# statsmodels 0.15.0, statsmodels.stats.proportion.proportion_confint(k, n, alpha=0.05, method="wilson"),
# computed once and copied here (statsmodels is not a dependency of the project).
STATSMODELS_WILSON = {
    (0, 3): (0.0, 0.5614970317550455),
    (3, 3): (0.43850296824495444, 1.0),
    (5, 10): (0.23659309051256394, 0.7634069094874361),
    (0, 1): (0.0, 0.7934506856227627),
    (1, 12): (0.014865094404917095, 0.35387991114111705),
    (7, 24): (0.14914648196960875, 0.4916769366449665),
    (31, 100): (0.22779697212376035, 0.40626055719489407),
    (0, 54): (0.0, 0.06641358809089641),
}


@pytest.mark.parametrize("k,n", sorted(STATSMODELS_WILSON))
def test_matches_statsmodels(k, n):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(STATSMODELS_WILSON[k, n][0], abs=1e-12)
    assert hi == pytest.approx(STATSMODELS_WILSON[k, n][1], abs=1e-12)


def test_properties():
    assert Z95 == pytest.approx(1.959963984540054)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    lo, hi = wilson_interval(3, 7)
    assert lo < 3 / 7 < hi
    assert wilson_interval(3, 7, z=1.0)[1] < hi  # a narrower z, a narrower interval
    # symmetric: k successes in n is n - k failures
    assert wilson_interval(2, 9)[0] == pytest.approx(1 - wilson_interval(7, 9)[1])


@pytest.mark.parametrize("k,n", [(0, 0), (4, 3), (-1, 3), (1.0, 3), (True, 3)])
def test_bad_counts(k, n):
    with pytest.raises((ValueError, TypeError)):
        wilson_interval(k, n)


def test_overlap():
    assert overlap((0.0, 0.56), (0.44, 1.0)) and overlap((0.2, 0.3), (0.3, 0.4))
    assert not overlap((0.0, 0.1), (0.2, 0.9)) and not overlap((0.2, 0.9), (0.0, 0.1))
