import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from iclgd.cli import app
from iclgd.core import metrics as M
from iclgd.core.hooks import Recorder
from iclgd.core.models import load_model, qkv
from iclgd.core.tasks import TASKS, load_task, sample_demos
from iclgd.engine.capture import Observer
from iclgd.engine.scoring import build_prompts, score_options
from iclgd.experiments.compare import CompareConfig, compare_seed


@pytest.fixture(scope="module")
def sst2(data_dir):
    return load_task(TASKS["sst2"], data_dir, n_test=10)


@pytest.mark.parametrize("name,position", [("tiny-random-llama", "last"), ("tiny-random-gpt2", "label-token"),
                                           ("tiny-random-opt", "last"), ("tiny-random-gemma3", "last"),
                                           ("tiny-random-gemma2", "label-token"), ("tiny-random-phi3", "last"),
                                           ("tiny-random-olmo2", "last"), ("tiny-random-mistral", "last"),
                                           ("tiny-random-qwen3", "last"), ("tiny-random-gptj", "last"),
                                           ("tiny-random-stablelm", "last"), ("tiny-random-phi", "label-token"),
                                           ("tiny-random-falcon", "last"), ("tiny-random-falcon-gqa", "last"),
                                           ("tiny-random-bloom", "last"), ("tiny-random-bloom", "label-token")])
def test_captures_from_cached_batches_equal_a_plain_forward(name, position, sst2):
    """The observer reads the batched, prefix-cached pass; recompute from one uncached forward of the full prompt."""
    lm = load_model(name)
    p = build_prompts(lm, TASKS["sst2"], sample_demos(sst2.demo_pool, 3, 1), sst2.eval_rows[:4])
    demo_pos = [i for a, b in p.demo_spans for i in range(a, b)]
    obs = Observer(lm, demo_pos, position)
    score_options(lm, p, batch_size=3, observer=obs)
    for j in range(4):
        q_ids = p.query_ids[j] + (p.option_ids[0][:1] if position == "label-token" else [])
        ids = p.prefix_ids + q_ids
        with Recorder(lm) as rec, torch.no_grad():
            lm.model(input_ids=torch.tensor([ids]))
        P, pos = len(p.prefix_ids), len(ids) - 1
        for l in range(lm.n_layers):
            with torch.no_grad():
                q, k, _, scale = qkv(lm, l, rec.acts[f"attn_in.{l}"][0], torch.arange(len(ids)))
            H, Hkv = q.shape[0], k.shape[0]
            kk = k.repeat_interleave(H // Hkv, 0)
            cap = lm.softcap(l)  # Gemma-2 caps scores at ±cap
            capped = (lambda s: cap * torch.tanh(s / cap)) if cap else (lambda s: s)  # noqa: B023
            bias = lm.key_bias(l, torch.arange(len(ids)))  # ALiBi (BLOOM): what the softmax sees beside q·k
            bias = torch.zeros(H, len(ids)) if bias is None else bias.float()
            s_query = capped(torch.einsum("hd,htd->ht", q[:, pos], kk[:, P: P + len(p.query_ids[j])]) * scale
                             + bias[:, P: P + len(p.query_ids[j])])
            s_demo = capped(torch.einsum("hd,htd->ht", q[:, pos], kk[:, demo_pos]) * scale + bias[:, demo_pos]).sum(0)
            W = lm.window(l)
            if W is not None:  # tokens the sliding window hides from the prediction position
                s_demo[torch.tensor(demo_pos) <= pos - W] = -torch.inf
                assert (s_demo == -torch.inf).any()  # the prompts are longer than the tiny window (8)
            o = obs.obs[j]
            np.testing.assert_allclose(o.s_query[l], s_query.double().numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(o.s_demo[l], s_demo.double().numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(o.h[l], rec.acts[f"attn_out.{l}"][0, pos].double().numpy(), rtol=1e-4, atol=1e-5)


def test_compare_seed_on_tiny_model_is_consistent(sst2):
    lm = load_model("tiny-random-gpt2")
    r, records, phases = compare_seed(lm, sst2, CompareConfig(k=3, lr=0.05), seed=1, progress=False)
    L = lm.n_layers
    assert r["n"] == 10 and r["k_true"] == 3 and len(r["ft_losses"]) == 3
    for key in (("simaou",), ("simam", "icl_ft"), ("simam", "delta"), ("kendall", "token_qq")):
        v = r
        for k in key:
            v = v[k]
        assert len(v["per_layer"]) == L and -1 <= v["overall"] <= 1
    z = np.array([x["zsl_pred"] == x["label"] for x in records])
    f = np.array([x["ft_pred"] == x["label"] for x in records])
    i = np.array([x["icl_pred"] == x["label"] for x in records])
    value, den = M.rec2ftp(z, f, i)
    assert r["rec2ftp"]["denominator"] == den
    assert (np.isnan(value) and np.isnan(r["rec2ftp"]["value"])) or value == r["rec2ftp"]["value"]
    assert r["acc"]["ft"] == f.mean() and set(phases) >= {"zsl", "icl", "ft", "ft_zsl", "metrics_kendall",
                                                                 "metrics_similarities"}
    # the model is restored after FT: the same seed again gives the same numbers
    r2, _, _ = compare_seed(lm, sst2, CompareConfig(k=3, lr=0.05), seed=1, progress=False)
    assert json.dumps(r, sort_keys=True) == json.dumps(r2, sort_keys=True)


def test_lcgd_full_and_lr_search(sst2):
    lm = load_model("tiny-random-llama")
    r, _, _ = compare_seed(lm, sst2, CompareConfig(k=2, ft_mode="lcgd", ft_params="all", lr=0.01), 2, progress=False)
    assert r["acc"]["ft"] >= 0
    r, _, _ = compare_seed(lm, sst2, CompareConfig(k=2, lr_search=True, lr_grid=(1e-3, 1e-1), lr_holdout=6), 2,
                           progress=False)
    assert [g["lr"] for g in r["lr_search"]["grid"]] == [1e-3, 1e-1] and r["lr"] in (1e-3, 1e-1)
    assert r["lr_search"]["holdout_n"] == 6


def test_compare_cli_writes_results_deterministically(tmp_path):
    args = ["compare", "--model", "tiny-random-llama", "--task", "cb", "--k", "2", "--n-test", "6", "--seeds", "1,2",
            "--untrained"]
    runner = CliRunner()
    a = runner.invoke(app, args + ["--out", str(tmp_path / "a")])
    b = runner.invoke(app, args + ["--out", str(tmp_path / "b")])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert "Rec2FTP" in a.output and "[untrained]" in a.output
    da = json.loads((tmp_path / "a" / "results.json").read_text())
    db = json.loads((tmp_path / "b" / "results.json").read_text())
    da.pop("timing"), db.pop("timing")
    assert json.dumps(da, sort_keys=True) == json.dumps(db, sort_keys=True)
    assert da["aggregate"]["acc_icl"]["n_seeds"] == 2 and len(da["seeds"]) == 2 and da["untrained"]["seeds"]
    lo, hi = da["aggregate"]["simaou"]["ci95"]
    assert lo <= da["aggregate"]["simaou"]["mean"] <= hi
    recs = [json.loads(l) for l in (tmp_path / "a" / "records.jsonl").read_text().splitlines()]
    assert {"zsl_pred", "icl_pred", "ft_pred", "input", "demo_idx"} <= set(recs[0]) and "icl_prompt" not in recs[0]
    # every test example of each seed, of the model and of its untrained control, each with its input text and
    # the ids of the demonstrations its prompt held
    assert [r["condition"] for r in recs] == ["trained"] * 12 + ["untrained"] * 12
    for r in recs:
        s = next(x for x in (da["seeds"] if r["condition"] == "trained" else da["untrained"]["seeds"])
                 if x["seed"] == r["seed"])
        assert r["demo_idx"] == s["demo_idx"] and r["input"].endswith(" True, False, or Neither? Answer:")
    for png in ("simaou_layers.png", "simam_layers.png", "kendall_layers.png"):
        assert (tmp_path / "a" / png).stat().st_size > 1000


def test_records_hold_the_whole_prompt_on_request(tmp_path, sst2):
    """--record-prompts: each record's ICL prompt is the start token, its demonstrations (in order, each followed by
    the separator) and its own input, as the model's tokens decode; recorded in the configuration."""
    for cmd in ("compare", "eval"):
        out = tmp_path / cmd
        r = CliRunner().invoke(app, [cmd, "--model", "tiny-random-llama", "--task", "sst2", "--k", "3", "--n-test",
                                     "4", "--seeds", "5", *(["--no-untrained"] if cmd == "compare" else []),
                                     "--record-prompts", "--out", str(out)])
        assert r.exit_code == 0, r.output
        doc = json.loads((out / "results.json").read_text())
        assert doc["config"]["record_prompts"] is True
        recs = ([json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()] if cmd == "compare"
                else doc["results"][0]["records"])
        pool = {d["idx"]: d for d in sst2.demo_pool}
        spec = TASKS["sst2"]
        lm = load_model("tiny-random-llama")
        start = "" if lm.bos_id is None else lm.tokenizer.decode([lm.bos_id])
        for rec in recs:
            assert len(rec["demo_idx"]) == 3
            demos = "".join(spec.format_demo(pool[i]) + "\n" for i in rec["demo_idx"])  # the default separator
            assert rec["icl_prompt"] == start + demos + rec["input"]


@pytest.mark.parametrize("args,message", [
    (["--position", "middle"], "--position"), (["--ft-params", "q"], "--ft-params"), (["--seeds", "x"], "--seeds"),
])
def test_compare_bad_options(args, message):
    res = CliRunner().invoke(app, ["compare", "--model", "tiny-random-gpt2", *args])
    assert res.exit_code == 2 and message in res.output


def test_compare_runs_the_registry_functions(monkeypatch, data_dir):
    """The metric registry is what runs: each figure comes from its registered per-example function, and the
    aggregate over seeds lists each metric's registered baselines."""
    from iclgd.core import metrics as M
    from iclgd.core.models import build_tiny
    from iclgd.core.tasks import load_task, resolve_task
    from iclgd.experiments import compare as C

    assert all(C.RUN[n] is M.METRICS[n].function for n in C.RUN)
    monkeypatch.setitem(C.RUN, "simaou", lambda hz, hi, hf: np.full(hz.shape[:2], 0.25))
    lm = build_tiny("tiny-random-llama")
    data = load_task(resolve_task("sst2"), data_dir, 3)
    r, _, _ = C.compare_seed(lm, data, C.CompareConfig(k=2, kendall_n=2, updates_n=0), 1, progress=False)
    assert r["simaou"]["overall"] == pytest.approx(0.25) and r["simaou"]["per_layer"] == [0.25] * lm.n_layers
    agg = M.aggregate([r])
    assert agg["simaou"]["baselines"] == ["simaou_random_uniform", "simaou_random_gaussian"]


def test_a_condition_answering_one_class_is_flagged_printed_and_recorded(tmp_path, caplog):
    """Gemma-3 on SST-2 at k = 8 once answered one label 40 of 40 times: its accuracy was that label's share."""
    from iclgd.engine.scoring import one_class_warnings

    with caplog.at_level("WARNING", logger="iclgd"):
        got = one_class_warnings({"zsl": [19, 1], "icl": [40, 0], "ft": [18, 2]}, "task sst2, seed 1",
                                 ["negative", "positive"])
    assert len(got) == 2 and "ZSL answers 'negative' for 19 of 20" in got[0] and "ICL" in got[1]
    assert [r.getMessage() for r in caplog.records] == got
    assert one_class_warnings({"icl": [94, 6]}, "x", ["a", "b"]) == []  # 94% is not flagged
    res = CliRunner().invoke(app, ["eval", "--model", "tiny-random-gpt2", "--task", "sst2", "--k", "1",
                                   "--n-test", "20", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "results.json").read_text())
    counts = [doc["results"][0]["zsl_pred_counts"], doc["results"][0]["icl_pred_counts"]]
    flagged = [max(c) >= 0.95 * sum(c) for c in counts]
    assert len(doc["warnings"]) == sum(flagged)
    assert sum(flagged) == sum(1 for line in res.output.splitlines() if line.startswith("warning: "))
