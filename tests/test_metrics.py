import numpy as np
import pytest

from iclgd.core import metrics as M


def test_rec2ftp_truth_table():
    # example:      0     1     2     3      (ZSL wrong & FT right: examples 0, 1, 2; ICL right on 0, 2)
    zsl = [False, False, False, True]
    ft = [True, True, True, True]
    icl = [True, False, True, True]
    value, den = M.rec2ftp(zsl, ft, icl)
    assert den == 3 and value == pytest.approx(2 / 3)
    assert np.isnan(M.rec2ftp([True], [True], [True])[0])


def test_simaou_identical_updates_is_one_and_opposite_is_minus_one():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((5, 3, 8))
    i = z + rng.standard_normal((5, 3, 8))
    np.testing.assert_allclose(M.simaou_per_layer(z, i, i), np.ones(3), atol=1e-12)
    # FT pushes the normalised output away from ICL's direction (ĥ_FT ∝ 2ĥ_ZSL − ĥ_ICL): a negative SimAOU
    zu = z / np.linalg.norm(z, axis=-1, keepdims=True)
    iu = i / np.linalg.norm(i, axis=-1, keepdims=True)
    assert (M.simaou_per_layer(z, i, 2 * zu - iu) < 0).all()


def test_simaou_hand_case():
    """d = 2, one example, one layer: ZSL e1, ICL e2, FT (e1 + e2)/√2 after normalisation."""
    z = np.array([[[1.0, 0.0]]])
    i = np.array([[[0.0, 3.0]]])
    f = np.array([[[2.0, 2.0]]])
    d_icl, d_ft = np.array([-1, 1.0]), np.array([1 / np.sqrt(2) - 1, 1 / np.sqrt(2)])
    expected = d_icl @ d_ft / np.linalg.norm(d_icl) / np.linalg.norm(d_ft)
    assert M.simaou_per_layer(z, i, f)[0] == pytest.approx(expected)
    assert expected == pytest.approx(np.cos(np.pi / 8), abs=1e-12)


def test_simaou_baselines_near_zero_for_gaussian_and_positive_for_uniform():
    rng = np.random.default_rng(1)
    z, i = rng.standard_normal((400, 2, 64)), rng.standard_normal((400, 2, 64))
    assert np.abs(M.simaou_gaussian_baseline(z, i)).max() < 0.02
    assert M.simaou_uniform_baseline(z, i).shape == (2,)


def test_simam_and_delta_hand_cases():
    a = [np.array([[[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]]])]  # 1 layer, 2 heads, 3 query tokens
    b = [np.array([[[2.0, 4.0, 6.0], [0.0, 1.0, 0.0]]])]  # head 0 parallel (cos 1), head 1 orthogonal (cos 0)
    assert M.simam_per_layer(a, b)[0] == pytest.approx(0.5)
    z = [np.zeros((1, 2, 3))]
    assert M.simam_delta_per_layer(z, a, b)[0] == pytest.approx(0.5)
    assert M.simam_delta_per_layer(b, a, a)[0] == pytest.approx(1.0)


def test_kendall_reversed_ranking_is_minus_one_and_same_is_one():
    a = [np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])]  # 2 layers
    b = [np.array([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])]
    np.testing.assert_allclose(M.kendall_per_layer(a, b), [-1.0, 1.0])
    rng = np.random.default_rng(123)  # not the baseline's own seed (0), or the "random" vectors coincide
    many = [rng.random((1, 50)) for _ in range(200)]
    assert abs(M.kendall_random_baseline(many)[0]) < 0.02


def test_sum_per_span_and_softmax():
    x = np.arange(6.0)
    np.testing.assert_allclose(M.sum_per_span(x, [(0, 2), (2, 6)]), [1.0, 14.0])
    np.testing.assert_allclose(M.softmax(np.zeros(4)), np.full(4, 0.25))


def test_bootstrap_ci():
    mean, lo, hi = M.bootstrap_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and 1.0 <= lo < 2.5 < hi <= 4.0
    assert M.bootstrap_ci([0.3]) == (0.3, 0.3, 0.3)
    assert M.bootstrap_ci([1.0, 2.0]) == M.bootstrap_ci([1.0, 2.0])  # seeded
