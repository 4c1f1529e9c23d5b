import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iclgd.core.models import tiny_configs
from iclgd.engine import dual
from iclgd.engine.dual import HeadKV, dual_matrices, gd_dual_forward, linear_attention, relaxed_attention, sgd_linear


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- hand-computed cases


def test_identity1_hand_computed_2x2():
    """W0 = I, x' = (1, 2), target 0, MSE ½‖y−t‖², lr 0.1: e = −0.1·(1, 2), ΔW = e x'ᵀ; query x = (1, 1)."""
    W0 = torch.eye(2, dtype=torch.float64)
    X = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    run = sgd_linear(W0, X, torch.zeros(1, 2, dtype=torch.float64), lr=0.1)
    torch.testing.assert_close(run.W, torch.tensor([[0.9, -0.2], [-0.2, 0.6]], dtype=torch.float64))
    torch.testing.assert_close(run.E, torch.tensor([[-0.1, -0.2]], dtype=torch.float64))
    x = torch.tensor([1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(gd_dual_forward(W0, run, x), torch.tensor([0.7, 0.4], dtype=torch.float64))
    torch.testing.assert_close(run.W @ x, torch.tensor([0.7, 0.4], dtype=torch.float64))


def test_identity2_hand_computed_2x2():
    """One demo token (k'=(1,0), v'=(0,1)) and one query-side token (k=(0,1), v=(1,0)), q = (2, 3).

    W_ZSL = v kᵀ = [[0,1],[0,0]], ΔW_ICL = v' k'ᵀ = [[0,0],[1,0]];
    (W_ZSL + ΔW_ICL) q = (3, 2) = 2·v' + 3·v, the relaxed attention; ΔW_ICL q = (0, 2).
    """
    d = torch.float64
    kv = HeadKV(k=torch.tensor([[[1.0, 0], [0, 1]]], dtype=d), v=torch.tensor([[[0.0, 1], [1, 0]]], dtype=d),
                q=torch.tensor([[2.0, 3]], dtype=d), scale=1.0)
    W_zsl, dW = dual_matrices(kv, torch.tensor([True, False]))
    torch.testing.assert_close(W_zsl[0], torch.tensor([[0.0, 1], [0, 0]], dtype=d))
    torch.testing.assert_close(dW[0], torch.tensor([[0.0, 0], [1, 0]], dtype=d))
    torch.testing.assert_close(relaxed_attention(kv)[0], torch.tensor([3.0, 2], dtype=d))
    torch.testing.assert_close(dW[0] @ kv.q[0], torch.tensor([0.0, 2], dtype=d))


# ----------------------------------------------------------------------------- properties


@settings(max_examples=120, deadline=None)
@given(d_in=st.integers(1, 8), d_out=st.integers(1, 6), n=st.integers(1, 12), steps=st.integers(1, 3),
       bs=st.integers(1, 12), loss=st.sampled_from(["mse", "ce"]), dtype=st.sampled_from([torch.float64, torch.float32]),
       seed=st.integers(0, 2**16))
def test_identity1_gd_is_linear_attention(d_in, d_out, n, steps, bs, loss, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    X = torch.randn(n, d_in, generator=g, dtype=dtype)
    t = (torch.randint(0, d_out, (n,), generator=g) if loss == "ce" else torch.randn(n, d_out, generator=g, dtype=dtype))
    run = sgd_linear(W0, X, t, lr=0.05, steps=steps, batch_size=bs, loss=loss)
    x = torch.randn(5, d_in, generator=g, dtype=dtype)
    tol = 1e-5 if dtype == torch.float64 else 1e-3
    assert rel(gd_dual_forward(W0, run, x), x @ run.W.T) <= tol
    assert run.E.shape == (n * steps, d_out)


@settings(max_examples=100, deadline=None)
@given(heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4), (6, 3)]), hd=st.sampled_from([2, 4, 8]),
       d=st.integers(2, 12), T=st.integers(2, 20), n_demo=st.integers(0, 19), bias=st.booleans(), rotary=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**16))
def test_identity2_relaxed_attention_splits(heads, hd, d, T, n_demo, bias, rotary, dtype, seed):
    """W_V[X';X](W_K[X';X])ᵀq = (W_ZSL + ΔW_ICL)q with biases, GQA and rotary keys, against a literal
    concatenated-matrix computation."""
    H, Hkv = heads
    n_demo = min(n_demo, T - 1)
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x = r(T, d)
    Wk, Wv, Wq = r(Hkv * hd, d), r(Hkv * hd, d), r(H * hd, d)
    bk, bv, bq = (r(Hkv * hd), r(Hkv * hd), r(H * hd)) if bias else (0, 0, 0)
    k = (x @ Wk.T + bk).view(T, Hkv, hd).transpose(0, 1)
    v = (x @ Wv.T + bv).view(T, Hkv, hd).transpose(0, 1)
    q = (x[-1] @ Wq.T + bq).view(H, hd)
    if rotary:
        ang = torch.rand(T, hd // 2, generator=g, dtype=dtype) * 6.3
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        k = dual.apply_rotary(k, cos, sin)
        q = dual.apply_rotary(q, cos[-1], sin[-1])
    kv = HeadKV(k, v, q, 1.0)
    is_demo = torch.zeros(T, dtype=torch.bool)
    is_demo[1: 1 + n_demo] = True
    W_zsl, dW = dual_matrices(kv, is_demo)
    got = torch.einsum("hde,he->hd", W_zsl + dW, q)
    for h in range(H):
        g_ = h // (H // Hkv)
        V_all, K_all = v[g_].T, k[g_].T  # (hd, T): columns are W_V x_i, W_K x_i for i in [X'; X]
        literal = V_all @ (K_all.T @ q[h])
        tol = 1e-5 if dtype == torch.float64 else 1e-3
        assert rel(got[h], literal) <= tol
        assert rel(linear_attention(v[g_], k[g_], q[h]), literal) <= tol


# ----------------------------------------------------------------------------- real layers


@pytest.mark.parametrize("name", list(tiny_configs()))
def test_identity2_on_every_layer_of_tiny_models(name):
    from iclgd.core.models import load_model

    lm = load_model(name)
    fp64 = lm.model_type != "xglm"  # XGLM's own attention code cannot run in float64 (transformers' mask constant)
    lm.model.to(torch.float64 if fp64 else torch.float32)
    ids = list(range(3, 45))
    rows = dual.verify_layers(lm, ids, (1, 30))
    tol = 1e-5 if fp64 else 1e-3
    assert {r["layer"] for r in rows} == set(range(lm.n_layers))
    assert max(r["identity_rel_err"] for r in rows) <= tol
    # our q/k/v (projections, biases, rotary, GQA) reproduce the model's own attention output
    assert max(r["recon_rel_err"] for r in rows) <= (1e-6 if fp64 else 1e-4)


def test_delta_w_ft_zero_without_change_and_local_to_the_changed_layer():
    from iclgd.core.models import load_model

    before = load_model("tiny-random-llama")
    before.model.double()
    ids = list(range(3, 30))
    same = dual.compare_updates(before, before, ids, (1, 15))
    assert max(r["norm_ratio_ft_over_icl"] for r in same) == 0.0
    after = copy.deepcopy(before)
    with torch.no_grad():
        after.projections(1).Wv.add_(0.1)  # change V of the last layer only
    rows = dual.compare_updates(before, after, ids, (1, 15))
    assert all(r["norm_ratio_ft_over_icl"] == 0.0 for r in rows if r["layer"] == 0)
    assert all(r["norm_ratio_ft_over_icl"] > 0.0 for r in rows if r["layer"] == 1)


def test_dual_verify_cli(tmp_path):
    import json

    from typer.testing import CliRunner

    from iclgd.cli import app

    res = CliRunner().invoke(app, ["dual", "verify", "--model", "tiny-random-gpt2", "--k", "3", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "dual_verify.json").read_text())
    assert d["summary"]["within_tolerance"] and len(d["per_layer"]) == 2 and len(d["rows"]) == 2 * 4
    assert (tmp_path / "dual_verify.png").stat().st_size > 1000
    bad = CliRunner().invoke(app, ["dual", "verify", "--model", "tiny-random-gpt2", "--layers", "7"])
    assert bad.exit_code == 2 and "--layers" in bad.output
