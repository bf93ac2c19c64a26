"""The Wilson interval against values computed once with a reference implementation."""
import pytest

from eval_agent.stats import Z95, difference_interval, format_share, paired_difference_interval, wilson_interval

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


# statsmodels 0.15.0, statsmodels.stats.proportion.confint_proportions_2indep(k1, n1, k2, n2, method="newcomb",
# compare="diff"), computed once and copied here.
STATSMODELS_NEWCOMBE = {
    (13, 48, 3, 48): (0.05911313009205771, 0.3533894940049672),
    (5, 25, 0, 25): (0.026365806759727717, 0.3913095036954034),
    (20, 40, 1, 40): (0.2942164762626306, 0.6244277603437217),
    (22, 40, 20, 40): (-0.1619458559723326, 0.25576496975291807),
    (0, 3, 3, 3): (-1.0, -0.2059232824597782),
    (4, 21, 1, 21): (-0.06931792275730309, 0.35601515552318486),
    (1, 3, 0, 3): (-0.29050691643637855, 0.7923403991979523),
}


@pytest.mark.parametrize("counts", sorted(STATSMODELS_NEWCOMBE))
def test_difference_matches_statsmodels(counts):
    lo, hi = difference_interval(*counts)
    assert lo == pytest.approx(STATSMODELS_NEWCOMBE[counts][0], abs=1e-12)
    assert hi == pytest.approx(STATSMODELS_NEWCOMBE[counts][1], abs=1e-12)


def test_difference_excludes_zero_where_the_intervals_still_overlap():
    (_, base_hi), (sft_lo, _) = wilson_interval(3, 48), wilson_interval(13, 48)
    assert sft_lo < base_hi and difference_interval(13, 48, 3, 48)[0] > 0


# Newcombe (1998b), Statistics in Medicine 17:2635-2650, Table II: method 10 on his three paired examples,
# (both, first only, second only, neither) -> the interval to 4 decimals as published.
NEWCOMBE_PAIRED = {(36, 12, 2, 0): (0.0569, 0.3404), (18, 12, 2, 18): (0.0562, 0.3290), (53, 0, 0, 1): (-0.0729, 0.0729)}


@pytest.mark.parametrize("cells", sorted(NEWCOMBE_PAIRED))
def test_paired_difference_matches_newcombes_table(cells):
    lo, hi = paired_difference_interval(*cells)
    assert (round(lo, 4), round(hi, 4)) == NEWCOMBE_PAIRED[cells]


def test_paired_difference_by_hand():
    # 10 items: 2 right for both models, 5 for the first only, 1 for the second only, 2 for neither.
    # p1 = 7/10, p2 = 3/10, d = 0.4. Wilson 95%: 7/10 -> [0.39678, 0.89221], 3/10 -> [0.10779, 0.60322].
    # ad - bc = 2*2 - 5*1 = -1 < 0, so phi = -1 / sqrt(7*3*3*7) = -1/21 = -0.047619 (no correction below 0).
    # lower = 0.4 - sqrt(0.30322^2 + 2/21 * 0.30322 * 0.30322 + 0.30322^2) = 0.4 - 0.43891 = -0.03891
    # upper = 0.4 + sqrt(0.19221^2 + 2/21 * 0.19221 * 0.19221 + 0.19221^2) = 0.4 + 0.27822 = 0.67822
    lo, hi = paired_difference_interval(2, 5, 1, 2)
    assert lo == pytest.approx(-0.03891, abs=1e-5) and hi == pytest.approx(0.67822, abs=1e-5)
    # the unpaired interval of the same two shares ignores that the items are shared
    assert difference_interval(7, 10, 3, 10)[0] > lo


def test_paired_difference_is_antisymmetric_and_checks_its_counts():
    lo, hi = paired_difference_interval(4, 9, 2, 15)
    assert paired_difference_interval(4, 2, 9, 15) == pytest.approx((-hi, -lo))
    assert paired_difference_interval(0, 0, 0, 7) == pytest.approx((-wilson_interval(0, 7)[1], wilson_interval(0, 7)[1]))
    for bad in ((0, 0, 0, 0), (1, -1, 0, 0), (1.0, 0, 0, 0)):
        with pytest.raises(ValueError):
            paired_difference_interval(*bad)


def test_format_share():
    assert format_share(0, 3) == "0/3 = 0.00 [0.00, 0.56]" and format_share(5, 10) == "5/10 = 0.50 [0.24, 0.76]"
    assert format_share(0, 0) == "0/0"
