"""Every metric on small arrays written out here, with the expected number computed by hand (per layer where the
metric is per layer). Each case is built so that a plausible wrong formula gives another number (noted inline)."""

import math

import numpy as np
import pytest

from iclgd.core import metrics as M


# ----------------------------------------------------------------------------- helpers


def test_cosine_or_nan_and_mean_defined():
    np.testing.assert_allclose(M.cosine_or_nan(np.array([[3.0, 4.0], [0.0, 0.0]]), np.array([[4.0, 3.0], [1.0, 0.0]])),
                               [24 / 25, np.nan])
    assert M.cosine(np.zeros(2), np.ones(2)) == 0.0  # the plain cosine keeps its 0 for a zero vector
    mean, n = M.mean_defined(np.array([[1.0, np.nan], [3.0, np.nan], [np.nan, np.nan]]), axis=0)
    np.testing.assert_array_equal(n, [2, 0])
    assert mean[0] == 2.0 and np.isnan(mean[1])


def test_softmax_and_sum_per_span_by_hand():
    np.testing.assert_allclose(M.softmax(np.array([0.0, math.log(3.0)])), [0.25, 0.75])
    np.testing.assert_allclose(M.softmax(np.array([[1000.0, 1000.0]])), [[0.5, 0.5]])  # shifted: no overflow
    np.testing.assert_allclose(M.sum_per_span(np.array([[1.0, 2.0, 4.0, 8.0]]), [(0, 1), (1, 4)]), [[1.0, 14.0]])


# ----------------------------------------------------------------------------- Rec2FTP


def test_rec2ftp_every_combination_by_hand():
    # (ZSL, FT, ICL) correct? ; the denominator is ZSL wrong ∧ FT right: rows 0-3; of those ICL right: rows 0-2
    rows = [(0, 1, 1), (0, 1, 1), (0, 1, 1), (0, 1, 0),
            (1, 1, 1), (0, 0, 1), (1, 0, 0), (0, 0, 0), (1, 1, 0), (1, 0, 1)]
    z, f, i = zip(*rows)
    value, den = M.rec2ftp(z, f, i)
    assert den == 4 and value == 0.75  # not 4/6 (ICL ∧ FT over FT right) nor 3/5 (over ZSL wrong ∧ ICL right)
    assert M.rec2ftp([1, 0], [1, 0], [1, 1]) == (pytest.approx(float("nan"), nan_ok=True), 0)


# ----------------------------------------------------------------------------- SimAOU


def test_simaou_per_layer_values_differ_and_a_zero_update_is_undefined():
    # example 0: layer 0 ZSL e1, ICL 3·e2, FT (2, 2) -> cos(π/8); layer 1 ZSL e1, ICL e2, FT (1, −1) -> −sin(π/8)
    # example 1: layer 0 FT = 5·ZSL (no change after normalising: undefined, left out); layer 1 as example 0's layer 0
    h_z = np.array([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
    h_i = np.array([[[0.0, 3.0], [0.0, 1.0]], [[0.0, 2.0], [0.0, 3.0]]])
    h_f = np.array([[[2.0, 2.0], [1.0, -1.0]], [[5.0, 0.0], [2.0, 2.0]]])
    c, s = math.cos(math.pi / 8), math.sin(math.pi / 8)
    per_ex = M.simaou_per_example(h_z, h_i, h_f)
    np.testing.assert_allclose(per_ex, [[c, -s], [np.nan, c]], atol=1e-12)
    # per layer: layer 0 rests on one example (0.92388), layer 1 on two ((−0.38268 + 0.92388) / 2 = 0.27060);
    # counting the undefined example as 0 would give 0.46194 for layer 0
    np.testing.assert_allclose(M.simaou_per_layer(h_z, h_i, h_f), [0.9238795325, 0.2705980501], atol=1e-9)


def test_simaou_uniform_baseline_is_the_cosine_with_a_positive_vector():
    """cos(ΔICL, u), u ~ U[0,1)^d: ≈ +√3/2 for ΔICL ∝ (1, …, 1) and ≈ −√3/2 for −(1, …, 1), per layer;
    a Gaussian u would give ≈ 0 and an all-zero u exactly 0."""
    d, n = 3000, 20
    ones = np.ones(d)
    h_z = np.stack([np.stack([-ones, ones])] * n)  # layer 0: ZSL −1, layer 1: ZSL +1
    h_i = -h_z  # ΔICL = ĥ_ICL − ĥ_ZSL = +2/√d·1 (layer 0), −2/√d·1 (layer 1)
    u = M.simaou_uniform_baseline(h_z, h_i, seed=5)
    np.testing.assert_allclose(u, [math.sqrt(3) / 2, -math.sqrt(3) / 2], atol=0.01)
    g = M.simaou_gaussian_baseline(h_z, h_i, seed=5)
    assert np.abs(g).max() < 0.02


# ----------------------------------------------------------------------------- SimAM


def test_simam_per_layer_by_hand():
    # 2 layers, 2 heads, 3 query tokens; two examples
    a0 = np.array([[[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]], [[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]]])
    b0 = np.array([[[2.0, 4.0, 6.0], [0.0, 1.0, 0.0]], [[3.0, 2.0, 1.0], [1.0, 1.0, 0.0]]])
    # layer 0: heads cos 1 and 0 -> 0.5; layer 1: cos 10/14 and 1/√2 -> 0.7106962
    a1 = np.array([[[1.0, -1.0], [2.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]])  # another example, another length
    b1 = -a1  # every head −1
    np.testing.assert_allclose(M.simam_per_layer([a0], [b0]), [0.5, (10 / 14 + 1 / math.sqrt(2)) / 2])
    np.testing.assert_allclose(M.simam_per_layer([a0, a1], [b0, b1]),
                               [(0.5 - 1) / 2, ((10 / 14 + 1 / math.sqrt(2)) / 2 - 1) / 2])


def test_simam_delta_depends_on_the_zsl_map():
    # head 0: ICL − ZSL = e1, FT − ZSL = e2 + e3 -> 0      (cos(ICL, FT) would be 4/√30 = 0.730)
    # head 1: ICL − ZSL = (1, 1, 0), FT − ZSL = (2, 2, 0) -> 1   (cos(ICL, FT) would be 12/(3√17) = 0.970)
    # head 2: FT = ZSL: undefined, left out (counting it as 0 would give 1/3)
    z = np.array([[[1.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 2.0, 3.0]]])
    i = np.array([[[2.0, 1.0, 0.0], [1.0, 2.0, 2.0], [0.0, 0.0, 1.0]]])
    f = np.array([[[1.0, 2.0, 1.0], [2.0, 3.0, 2.0], [1.0, 2.0, 3.0]]])
    assert M.simam_delta_per_layer([z], [i], [f])[0] == pytest.approx(0.5)
    assert M.simam_per_layer([i], [f])[0] != pytest.approx(0.5)
    # per layer and per example: a second layer where every head has FT = ZSL is undefined (NaN), not 0
    z2, i2, f2 = (np.concatenate([x, x], axis=0) for x in (z, i, f))  # (2 layers, 3 heads, 3 tokens)
    f2[1] = z2[1]
    per_ex = M.simam_delta_per_example([z2], [i2], [f2])
    assert per_ex.shape == (1, 2) and per_ex[0, 0] == pytest.approx(0.5) and np.isnan(per_ex[0, 1])


# ----------------------------------------------------------------------------- Kendall


def test_kendall_tau_b_by_hand_not_spearman():
    # layer 0: a = 1 2 3 4, b = 2 1 4 3: 4 concordant, 2 discordant pairs: τ = 2/6 = 1/3 (Spearman ρ = 0.6)
    # layer 1: b = 4 3 1 2: 1 concordant, 5 discordant: τ = −4/6 (Spearman ρ = −0.8)
    a = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    b = np.array([[2.0, 1.0, 4.0, 3.0], [4.0, 3.0, 1.0, 2.0]])
    np.testing.assert_allclose(M.kendall_per_layer([a], [b]), [1 / 3, -2 / 3])
    # ties: τ-b = (C − D) / √((n0 − n1)(n0 − n2)) = 5 / √(5·6) = 0.91287 (τ-a would be 5/6)
    t = M.kendall_per_layer([np.array([[1.0, 2.0, 2.0, 3.0]])], [np.array([[1.0, 2.0, 3.0, 4.0]])])
    assert t[0] == pytest.approx(5 / math.sqrt(30))


def test_kendall_per_layer_leaves_undefined_examples_out():
    a = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    b0 = np.array([[2.0, 1.0, 4.0, 3.0], [4.0, 3.0, 1.0, 2.0]])
    b1 = np.array([[7.0, 7.0, 7.0, 7.0], [1.0, 2.0, 3.0, 4.0]])  # layer 0 constant: τ undefined
    per_ex = M.kendall_per_example([a, a], [b0, b1])
    assert np.isnan(per_ex[1, 0]) and per_ex[1, 1] == 1.0
    # layer 0 rests on example 0 alone (1/3, not 1/6); layer 1 is (−2/3 + 1)/2
    np.testing.assert_allclose(M.kendall_per_layer([a, a], [b0, b1]), [1 / 3, 1 / 6])


def test_kendall_ft_side_logits_are_scale_squared_q_dot_q():
    # one layer, two heads of d = 2; two training tokens
    q_test = np.array([[[1.0, 0.0], [0.0, 2.0]]])
    q_train = np.array([[[[1.0, 1.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]])
    # token 0: head 0 1·1 + head 1 2·1 = 3; token 1: 0 + 0 = 0; scale 0.5 -> scale² · (3, 0) = (0.75, 0)
    np.testing.assert_allclose(M.ft_query_logits(q_test, q_train, 0.5), [[0.75, 0.0]])
    np.testing.assert_allclose(M.ft_query_logits(q_test, q_train, 0.5, paper=False), [[3.0, 0.0]])


def test_the_scale_changes_example_level_rankings_not_token_level():
    logits = np.array([[3.0, 0.0, 1.4, 1.4]])  # demonstration A = token 0, demonstration B = tokens 1-3
    spans = [(0, 1), (1, 4)]
    unscaled = M.sum_per_span(M.softmax(logits), spans)  # A 0.688 > B 0.312
    scaled = M.sum_per_span(M.softmax(0.25 * logits), spans)  # A 0.355 < B 0.645
    np.testing.assert_allclose(unscaled, [[0.6880, 0.3120]], atol=5e-4)
    np.testing.assert_allclose(scaled, [[0.3555, 0.6445]], atol=5e-4)
    assert np.array_equal(np.argsort(M.softmax(logits)), np.argsort(M.softmax(0.25 * logits)))


def test_kendall_random_baseline_is_near_zero():
    rng = np.random.default_rng(123)
    many = [rng.random((2, 40)) for _ in range(300)]
    assert np.abs(M.kendall_random_baseline(many, seed=9)).max() < 0.02
    same = M.kendall_per_layer(many, many)
    np.testing.assert_allclose(same, [1.0, 1.0])


# ----------------------------------------------------------------------------- several seeds


def test_bootstrap_ci_drops_nan_and_counts_nothing_as_nan():
    assert M.bootstrap_ci([0.2, float("nan")]) == (0.2, 0.2, 0.2)
    assert all(np.isnan(M.bootstrap_ci([float("nan")])))
    m, lo, hi = M.bootstrap_ci([0.0, 1.0, 2.0, 3.0, 4.0, float("nan")])
    assert m == 2.0 and 0.0 <= lo < 2.0 < hi <= 4.0
