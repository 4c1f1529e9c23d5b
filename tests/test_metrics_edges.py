"""Edge cases of the metrics that mutation testing showed untested: other axes, NaN without warnings, the
seeds and defaults of the baselines and the bootstrap, numerically extreme softmax rows."""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iclgd.core import metrics as M


def test_cosine_along_another_axis():
    a = np.array([[1.0, 0.0, 3.0], [0.0, 2.0, 4.0]])  # columns (1, 0), (0, 2), (3, 4)
    b = np.array([[1.0, 1.0, 4.0], [1.0, 1.0, 3.0]])  # columns (1, 1), (1, 1), (4, 3)
    expected = [1 / math.sqrt(2), 1 / math.sqrt(2), 24 / 25]
    np.testing.assert_allclose(M.cosine(a, b, axis=0), expected)
    np.testing.assert_allclose(M.cosine_or_nan(a, b, axis=0), expected)


def test_mean_defined_defaults_to_the_first_axis():
    mean, n = M.mean_defined(np.array([[1.0, 2.0, np.nan], [3.0, np.nan, np.nan]]))
    np.testing.assert_array_equal(n, [2, 1, 0])
    np.testing.assert_array_equal(mean[:2], [2.0, 2.0])


def test_rec2ftp_accepts_0_1_floats_and_divides_by_zero_without_a_warning():
    assert M.rec2ftp(np.array([0.0, 0.0, 1.0]), np.array([1.0, 1.0, 1.0]), np.array([1.0, 0.0, 0.0])) == (0.5, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0/0 is not computed: the value is NaN by definition
        value, den = M.rec2ftp([True], [False], [True])
    assert den == 0 and math.isnan(value)


def test_baselines_are_seeded_reproducibly_and_default_to_seed_0():
    rng = np.random.default_rng(7)
    z, i = rng.standard_normal((5, 2, 6)), rng.standard_normal((5, 2, 6))
    for f in (M.simaou_uniform_baseline, M.simaou_gaussian_baseline):
        np.testing.assert_array_equal(f(z, i), f(z, i, seed=0))
        np.testing.assert_array_equal(f(z, i, seed=3), f(z, i, seed=3))
        assert not np.array_equal(f(z, i, seed=3), f(z, i, seed=4))
    icl = [rng.random((2, 9)) for _ in range(4)]
    np.testing.assert_array_equal(M.kendall_random_baseline(icl), M.kendall_random_baseline(icl, seed=0))
    np.testing.assert_array_equal(M.kendall_random_baseline(icl, seed=3), M.kendall_random_baseline(icl, seed=3))


def test_baselines_by_hand_with_their_random_vectors():
    """The baselines are cos(ΔICL, r) per example, mean over examples, per layer; ΔICL = ĥ_ICL − ĥ_ZSL."""
    z = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # (2 ex, 2 layers, 3)
    i = np.array([[[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]], [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    d = i / np.linalg.norm(i, axis=-1, keepdims=True) - z / np.linalg.norm(z, axis=-1, keepdims=True)
    for f, draw in ((M.simaou_uniform_baseline, lambda g: g.random((2, 2, 3))),
                    (M.simaou_gaussian_baseline, lambda g: g.standard_normal((2, 2, 3)))):
        r = draw(np.random.default_rng(11))
        cos = (d * r).sum(-1) / np.linalg.norm(d, axis=-1) / np.linalg.norm(r, axis=-1)
        np.testing.assert_allclose(f(z, i, seed=11), cos.mean(axis=0))


def test_softmax_rows_of_very_different_scale():
    x = np.array([[0.0, math.log(3.0)], [1000.0, 1000.0 + math.log(3.0)]])
    np.testing.assert_allclose(M.softmax(x), [[0.25, 0.75], [0.25, 0.75]])
    np.testing.assert_allclose(M.softmax(x.T, axis=0), [[0.25, 0.25], [0.75, 0.75]])
    x3 = np.array([[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0]])  # 2 × 3: a broadcasting slip shows
    np.testing.assert_allclose(M.softmax(x3), [[1 / 3] * 3, [0.25, 0.5, 0.25]])


def test_simam_delta_per_layer_averages_examples_not_layers():
    # 2 examples × 2 layers × 1 head × 2 tokens; ZSL 0: SimAM_Δ = cos(ICL, FT)
    z = [np.zeros((2, 1, 2)), np.zeros((2, 1, 2))]
    i = [np.array([[[1.0, 0.0]], [[1.0, 0.0]]]), np.array([[[1.0, 0.0]], [[1.0, 0.0]]])]
    f = [np.array([[[1.0, 0.0]], [[0.0, 1.0]]]), np.array([[[1.0, 1.0]], [[-1.0, 0.0]]])]
    # layer 0: (1 + 1/√2) / 2; layer 1: (0 − 1) / 2
    np.testing.assert_allclose(M.simam_delta_per_layer(z, i, f), [(1 + 2 ** -0.5) / 2, -0.5])


def test_bootstrap_ci_uses_its_arguments():
    v = list(np.random.default_rng(2).random(40))  # 40 values: the CI bounds are all but continuous
    default = M.bootstrap_ci(v)
    assert default == M.bootstrap_ci(v, n_boot=10_000, level=0.95, seed=0)
    assert all(M.bootstrap_ci(v) == default for _ in range(3))  # seeded: no run-to-run jitter
    assert M.bootstrap_ci(v, seed=1) != default
    assert M.bootstrap_ci(v, n_boot=300) != default
    _, lo50, hi50 = M.bootstrap_ci(v, level=0.5)
    assert default[1] < lo50 and hi50 < default[2]
    assert M.bootstrap_ci([2, 4]) == pytest.approx((3.0, 2.0, 4.0))  # integers are values too
    # the percentile method, by hand: a resampled mean of nine 0s and one 10 is K ~ Binomial(10, 0.1);
    # P(K = 0) = 0.35 > 2.5%, P(K ≤ 2) = 0.930 < 97.5% < P(K ≤ 3) = 0.987: the CI is [0, 3] (BCa gives another)
    assert M.bootstrap_ci([0.0] * 9 + [10.0]) == (1.0, 0.0, 3.0)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(2, 90), st.integers(0, 2**31 - 1))
def test_kendall_all_rows_at_once_equals_one_scipy_call_per_vector(n, L, T, seed):
    """kendall_per_example computes every (example, layer) row at once (from all pairs up to KENDALL_PAIRS_MAX
    values, in one scipy call above): the same τ-b, to the last bit, as one ``scipy.stats.kendalltau`` call per
    vector; ties (values drawn from a few levels), constant vectors and NaN (undefined) included."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    levels = int(rng.integers(2, 2 * T + 2))  # from many ties to almost none
    a = [rng.integers(0, levels, (L, T)).astype(float) / 7 for _ in range(n)]
    b = [rng.integers(0, levels, (L, T)).astype(float) / 7 for _ in range(n)]
    a[0][0] = 1.0  # constant: τ undefined
    if T > 2:
        b[-1][-1, 1] = np.nan
    got = M.kendall_per_example(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = np.array([[stats.kendalltau(x[l], y[l]).statistic for l in range(L)] for x, y in zip(a, b)])
    assert got.shape == (n, L) and np.isnan(got[0, 0])
    np.testing.assert_array_equal(got, want)  # NaN where scipy has NaN, equal floats elsewhere


def test_tables_show_a_ci_from_three_seeds_on():
    from iclgd.core.metrics import fmt_mean_ci

    assert "[" not in fmt_mean_ci([0.375, 0.375]) and fmt_mean_ci([0.375, 0.375]).startswith("0.375")
    assert "[" in fmt_mean_ci([0.3, 0.4, 0.5])


def test_softmax_of_masked_positions_and_of_a_row_with_nothing_visible():
    """A sliding window masks demonstration tokens with −inf: they get weight 0; a query that sees none of them has
    no attention over the demonstrations (NaN, left out by the means), without a floating-point warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = M.softmax(np.array([[0.0, -np.inf, np.log(3.0)], [-np.inf, -np.inf, -np.inf]]))
    np.testing.assert_allclose(p[0], [0.25, 0.0, 0.75])
    assert np.isnan(p[1]).all()
