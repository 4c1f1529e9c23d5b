"""compare checked against independent recomputation: Rec2FTP counted by hand from the records, the paper's SimAM
segment (label token included), ΔW_ICL vs ΔW_FT against `dual.compare_updates`, a finetuning that changed nothing,
and the deviations listed in every results file and report."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from iclgd.engine import dual
from iclgd.core.hooks import Recorder
from iclgd.engine.capture import Observer
from iclgd.cli import app
from iclgd.experiments.compare import CompareConfig, FT_DEMOS_DEVIATION, compare_seed
from iclgd.engine.finetune import finetune
from iclgd.core.models import load_model, qkv
from iclgd.engine.scoring import build_prompts, score_options
from iclgd.core.tasks import TASKS, load_task, sample_demos


@pytest.fixture(scope="module")
def sst2(data_dir):
    return load_task(TASKS["sst2"], data_dir, n_test=8)


def test_rec2ftp_counted_by_hand_from_the_records(sst2):
    lm = load_model("tiny-random-llama")
    r, records, _ = compare_seed(lm, sst2, CompareConfig(k=3, lr=0.5, updates_n=0), seed=1, progress=False)
    den = num = 0
    for x in records:  # ZSL wrong, FT right: did ICL get it too?
        if x["zsl_pred"] != x["label"] and x["ft_pred"] == x["label"]:
            den += 1
            num += x["icl_pred"] == x["label"]
    assert r["rec2ftp"]["denominator"] == den
    if den:
        assert r["rec2ftp"]["value"] == num / den
    else:
        assert np.isnan(r["rec2ftp"]["value"])
    assert r["updates"] is None  # --updates-n 0: nothing computed, nothing recorded


def test_simam_segment_is_everything_after_the_context_label_token_included(sst2):
    lm = load_model("tiny-random-gpt2")
    p = build_prompts(lm, TASKS["sst2"], sample_demos(sst2.demo_pool, 2, 1), sst2.eval_rows[:3])
    obs = Observer(lm, [], "label-token")
    score_options(lm, p, batch_size=2, observer=obs)
    P = len(p.prefix_ids)
    for j in range(3):
        nq = len(p.query_ids[j])
        ids = p.prefix_ids + p.query_ids[j] + p.option_ids[0][:1]
        with Recorder(lm) as rec, torch.no_grad():
            lm.model(input_ids=torch.tensor([ids]))
        o = obs.obs[j]
        assert o.s_after.shape[-1] == nq + 1 and o.s_query.shape[-1] == nq
        for l in range(lm.n_layers):
            with torch.no_grad():
                q, k, _, scale = qkv(lm, l, rec.acts[f"attn_in.{l}"][0], torch.arange(len(ids)))
            s = (torch.einsum("hd,htd->ht", q[:, -1], k[:, P:]) * scale).double().numpy()  # after the context
            np.testing.assert_allclose(o.s_after[l], s, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(o.simam_scores(), o.s_after)  # the paper's segment is the default
        np.testing.assert_array_equal(o.simam_scores("after-context"), o.s_after)
        np.testing.assert_array_equal(o.simam_scores("input-only"), o.s_after[..., :nq])
        with pytest.raises(ValueError, match="SimAM segment 'all'"):
            o.simam_scores("all")


def test_updates_equal_dual_compare_updates_on_each_example(sst2):
    """The compare run's ΔW_ICL-vs-ΔW_FT numbers, per layer and head, equal `iclgd dual compare-updates` on a
    before/after pair of models and the same ICL prompt."""
    lm = load_model("tiny-random-llama")
    cfg = CompareConfig(k=2, lr=0.5, updates_n=2)
    r, _, _ = compare_seed(lm, sst2, cfg, seed=1, progress=False)
    u = r["updates"]
    assert u["n_examples"] == 2 and len(u["cos_dW"]["per_layer"]) == lm.n_layers
    before, after = load_model("tiny-random-llama"), load_model("tiny-random-llama")
    from iclgd.core.tasks import sample_demos as sd

    icl = build_prompts(before, sst2.spec, sd(sst2.demo_pool, 2, 1), sst2.eval_rows)
    finetune(after, [icl.prefix_ids[a:b] for a, b in icl.demo_spans], 0.5)
    per_ex = []
    for j in range(2):
        ids = icl.prefix_ids + icl.query_ids[j]
        rows = dual.compare_updates(before, after, ids, (1, len(icl.prefix_ids)))
        per_ex.append(rows)
    H = max(x["head"] for x in per_ex[0]) + 1
    for key in ("cos_dW", "cos_effect_on_q"):
        a = np.array([[x[key] for x in rows] for rows in per_ex]).reshape(2, lm.n_layers, H)
        np.testing.assert_allclose(u["per_head"][key], a.mean(0), atol=2e-5)
        np.testing.assert_allclose(u[key]["per_layer"], a.mean(axis=(0, 2)), atol=2e-5)
    ratio = np.array([[x["norm_ratio_ft_over_icl"] for x in rows] for rows in per_ex]).reshape(2, lm.n_layers, H)
    np.testing.assert_allclose(u["norm_ratio_ft_over_icl"]["per_layer"],
                               np.median(ratio.transpose(1, 0, 2).reshape(lm.n_layers, -1), axis=1), rtol=1e-4)
    # the random-update baseline is near 0 where the real update is not
    assert abs(u["cos_dW_random"]["overall"]) < 0.2


def test_update_stats_by_hand():
    # one head, d = 2: ΔW_ICL = [[1, 0], [0, 0]], ΔW_FT = [[1, 1], [0, 0]] -> cos 1/√2, norm ratio √2;
    # q = (0, 1): ΔW_ICL q = 0 -> the effect cosine is undefined (NaN); q = (1, 0): effects (1, 0), (1, 0) -> 1
    icl = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    ft = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    st = dual.update_stats(icl, ft, torch.tensor([[0.0, 1.0]]))
    assert st["cos_dW"].item() == pytest.approx(2 ** -0.5) and st["norm_ratio_ft_over_icl"].item() == pytest.approx(2 ** 0.5)
    assert torch.isnan(st["cos_effect_on_q"]).all()
    st = dual.update_stats(icl, ft, torch.tensor([[1.0, 0.0]]), torch.Generator().manual_seed(0))
    assert st["cos_effect_on_q"].item() == pytest.approx(1.0) and "cos_dW_random" in st
    # a zero ΔW_FT: undefined, not orthogonal; grouped KV: one KV matrix serves two query heads
    st = dual.update_stats(icl, torch.zeros_like(ft), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert st["cos_dW"].shape == (2,) and torch.isnan(st["cos_dW"]).all()


def test_the_random_baseline_is_distributed_as_the_cosine_with_a_gaussian_update():
    """random_cos draws cos(R, a) from its exact law (no R): against drawing R itself, a two-sample KS test at
    D = 4, 64 and 4096 (d_head² of a 64-wide head) does not tell them apart, while the law of another dimension is."""
    from scipy.stats import ks_2samp

    g = torch.Generator().manual_seed(3)
    n = 4000
    for D in (4, 64, 4096):
        a = torch.randn(D, generator=g, dtype=torch.float64).expand(n, D)
        direct = dual._cos_nan(torch.randn(n, D, generator=g, dtype=torch.float64), a).numpy()
        drawn = dual.random_cos(torch.rand(n, generator=g, dtype=torch.float64), D).numpy()
        assert ks_2samp(direct, drawn).pvalue > 1e-3, D
        assert abs(drawn.std() * D ** 0.5 - 1) < 0.1 and abs(drawn.mean()) < 4 / (n * D) ** 0.5
        wrong = dual.random_cos(torch.rand(n, generator=g, dtype=torch.float64), D // 4).numpy()
        assert ks_2samp(direct, wrong).pvalue < 1e-6  # the test can tell a wrong dimension
    z = dual.random_cos(torch.rand(3, generator=g, dtype=torch.float64), 5, torch.tensor([True, False, True]))
    assert torch.isnan(z[1]) and not torch.isnan(z[[0, 2]]).any()  # no direction to compare with: undefined


def test_update_stats_over_all_layers_at_once_equal_one_call_per_layer():
    """compare takes the ΔW statistics of every layer in one call (leading dimensions batched): the same figures as
    one call per layer, and the random baseline drawn in one call equals the per-layer draws in sequence."""
    g = torch.Generator().manual_seed(1)
    L, Hkv, H, d = 3, 2, 4, 8
    icl, ft = (torch.randn(L, Hkv, d, d, generator=g, dtype=torch.float64) for _ in range(2))
    q = torch.randn(L, H, d, generator=g, dtype=torch.float64)
    ft[1, 0] = 0  # an undefined head stays undefined
    all_at_once = dual.update_stats(icl, ft, q, torch.Generator().manual_seed(7))
    g7 = torch.Generator().manual_seed(7)
    per_layer = [dual.update_stats(icl[l], ft[l], q[l], g7) for l in range(L)]
    for key, v in all_at_once.items():
        assert v.shape == (L, H)
        ref = torch.stack([p[key] for p in per_layer])
        assert torch.allclose(v, ref, atol=1e-12, equal_nan=True), key
    assert torch.isnan(all_at_once["cos_dW"][1, :2]).all()


def test_a_finetuning_that_changed_nothing_is_marked_and_undefined(sst2):
    lm = load_model("tiny-random-llama")
    r, _, _ = compare_seed(lm, sst2, CompareConfig(k=2, lr=1e-30, updates_n=2), seed=1, progress=False)
    assert r["ft_changed"] == {"params": False, "predictions": 0, "attn_outputs": 0, "nothing": True}
    assert np.isnan(r["simaou"]["overall"]) and r["simaou"]["n_layers"] == 0
    assert r["simaou"]["n_examples_per_layer"] == [0] * lm.n_layers
    assert np.isnan(r["simam"]["delta"]["overall"]) and np.isnan(r["updates"]["cos_dW"]["overall"])
    assert not np.isnan(r["simaou"]["baseline_uniform"]["overall"])  # the baseline does not need FT
    r2, _, _ = compare_seed(lm, sst2, CompareConfig(k=2, lr=0.5, updates_n=0), seed=1, progress=False)
    assert r2["ft_changed"]["params"] and not r2["ft_changed"]["nothing"]
    assert r2["simaou"]["n_examples_per_layer"] == [8] * lm.n_layers
    from iclgd.core.metrics import aggregate

    agg = aggregate([r, r2])
    assert agg["simaou"]["n_seeds"] == 1 and agg["simaou"]["n_seeds_run"] == 2
    assert agg["simaou"]["mean"] == r2["simaou"]["overall"]


def test_kendall_ft_side_scale_option(sst2):
    lm = load_model("tiny-random-llama")
    a, _, _ = compare_seed(lm, sst2, CompareConfig(k=3, lr=0.5, updates_n=0), seed=1, progress=False)
    b, _, _ = compare_seed(lm, sst2, CompareConfig(k=3, lr=0.5, updates_n=0, kendall_scale="none"), seed=1,
                           progress=False)
    assert a["kendall"]["example_qq"] == b["kendall"]["example_qq_unscaled"]
    assert a["kendall"]["example_qq_unscaled"] == b["kendall"]["example_qq_unscaled"]
    assert a["kendall"]["ft_logits"].startswith("scale^2") and b["kendall"]["ft_logits"].startswith("q.q")


def test_results_and_report_list_the_deviations_and_the_control_seed(tmp_path):
    args = ["compare", "--model", "tiny-random-llama", "--task", "cb", "--k", "2", "--n-test", "4", "--seeds", "1,2",
            "--untrained", "--updates-n", "2", "--out", str(tmp_path)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "results.json").read_text())
    assert FT_DEMOS_DEVIATION in d["deviations"]
    assert [c["untrained_init_seed"] for c in d["untrained"]["seeds"]] == [1, 2]
    assert d["config"]["simam_segment"] == "after-context" and d["config"]["kendall_scale"] == "paper"
    assert (tmp_path / "updates_layers.png").stat().st_size > 1000
    assert "cos ΔW | rand" in res.output
    fixed = CliRunner().invoke(app, args[:-1] + [str(tmp_path / "fixed"), "--untrained-seed", "0"])
    df = json.loads((tmp_path / "fixed" / "results.json").read_text())
    assert [c["untrained_init_seed"] for c in df["untrained"]["seeds"]] == [0, 0], fixed.output
    assert any("seed 0 for every run seed" in x for x in df["deviations"])


def test_report_lists_the_ft_demos_deviation():
    from iclgd.report import deviations

    unit = {"unit": {"kind": "compare", "params": {"task": "cb", "k": 32}}, "result": {"lr": 0.08, "k_true": 19},
            "deviations": [FT_DEMOS_DEVIATION]}
    out = deviations({"model": "smollm2-135m", "seeds": [1], "k": 32, "tasks": ["cb"]}, {"u": unit})
    assert any(x.startswith("FT demonstrations") for x in out)


@pytest.mark.parametrize("args,message", [
    (["--simam-segment", "all"], "--simam-segment"), (["--kendall-scale", "x"], "--kendall-scale"),
    (["--untrained-seed", "3", "--no-untrained"], "--untrained-seed"), (["--updates-n", "-1"], "--updates-n"),
])
def test_new_options_reject_bad_values(args, message):
    res = CliRunner().invoke(app, ["compare", "--model", "tiny-random-gpt2", "--task", "cb", "--n-test", "2", *args])
    assert res.exit_code == 2 and message in res.output and "error:" in res.output
