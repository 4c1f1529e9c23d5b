"""The Python API on a Hugging Face model object built in code: the same numbers as the CLI on that model saved
to a folder, the model object left as it was, tidy tables of a known shape, hook points by name."""

import json

import numpy as np
import pytest
import torch
import transformers as T
from typer.testing import CliRunner

import iclgd
from iclgd.cli import app
from iclgd.core.errors import IclgdError
from iclgd.core.io import read_json, restore
from iclgd.core.models import byte_tokenizer, tiny_configs


@pytest.fixture(scope="module")
def hf_model():
    """A random Llama-style causal LM and its tokenizer, as a researcher would hold them (not a registry name)."""
    torch.manual_seed(123)
    model = T.AutoModelForCausalLM.from_config(tiny_configs()["tiny-random-llama"])
    return model, byte_tokenizer()


@pytest.fixture(scope="module")
def folder(hf_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    hf_model[0].save_pretrained(d)
    hf_model[1].save_pretrained(d)
    return d


def _cli(*args):
    r = CliRunner().invoke(app, [*map(str, args)])
    assert r.exit_code == 0, r.output
    return r


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_numbers(a, b, skip=("config", "versions", "timing")):
    """Two results documents hold the same numbers (exactly), apart from where and how long they ran."""
    a = {k: v for k, v in a.items() if k not in skip}
    b = {k: v for k, v in b.items() if k not in skip}
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_evaluate_compare_and_dual_verify_on_an_object_equal_the_cli_on_its_folder(hf_model, folder, tmp_path,
                                                                                   data_dir):
    model, tok = hf_model
    before = _state(model)
    lm = iclgd.load_model(model, tok)
    assert lm.layout is not None and lm.device == "cpu" and lm.dtype == "float32"

    ev = iclgd.evaluate(lm, task="sst2", k=2, seeds=[1, 2], n_test=6, data_dir=data_dir)
    _cli("eval", "--model", folder, "--tasks", "sst2", "--k", 2, "--seeds", "1,2", "--n-test", 6,
         "--data-dir", data_dir, "--out", tmp_path / "eval")
    cli_ev = read_json(tmp_path / "eval" / "results.json")  # strict JSON: undefined values restored
    _same_numbers(ev.to_dict(), cli_ev)
    assert [r["seed"] for r in cli_ev["results"]] == [1, 2] and cli_ev["config"]["device"] == "cpu"

    cmp = iclgd.compare(lm, task="sst2", k=2, seeds=[1], n_test=5, untrained=True, data_dir=data_dir, kendall_n=4,
                        updates_n=3)
    _cli("compare", "--model", folder, "--tasks", "sst2", "--k", 2, "--seeds", 1, "--n-test", 5, "--untrained",
         "--kendall-n", 4, "--updates-n", 3, "--data-dir", data_dir, "--out", tmp_path / "cmp")
    cli_cmp = read_json(tmp_path / "cmp" / "results.json")
    _same_numbers(cmp.to_dict(), cli_cmp)
    assert cmp.to_dict()["untrained"]["seeds"]  # the control ran, on a copy
    cli_records = [restore(json.loads(l)) for l in (tmp_path / "cmp" / "records.jsonl").read_text().splitlines()]
    assert cmp.records["records.jsonl"] == cli_records

    dv = iclgd.dual_verify(lm, task="sst2", k=2, data_dir=data_dir)
    _cli("dual", "verify", "--model", folder, "--tasks", "sst2", "--k", 2, "--data-dir", data_dir,
         "--out", tmp_path / "dual")
    cli_dv = read_json(tmp_path / "dual" / "dual_verify.json")
    _same_numbers(dv.to_dict(), cli_dv)
    assert dv.ok and dv.to_dict()["summary"]["identity_max"] < 1e-5

    # the researcher's object is unchanged: weights (finetuning restored, the control a copy) and dtype
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert next(model.parameters()).dtype == torch.float32


def test_results_are_tidy_tables_and_round_trip_through_save_and_load(hf_model, tmp_path, data_dir):
    lm = iclgd.load_model(*hf_model)
    ev = iclgd.evaluate(lm, task="sst2", k=2, seeds=[1, 2, 3], n_test=4, data_dir=data_dir)
    df = ev.to_pandas()
    assert list(df.columns) == ["task", "seed", "condition", "layer", "metric", "value", "baseline"]
    assert len(df) == 3 * 3  # seeds x (zsl, icl, majority)
    zsl = df[df.condition == "zsl"].value.to_numpy()
    assert np.all(zsl == zsl[0])  # ZSL does not depend on the demonstration seed
    # an accuracy's baseline is the majority-class share of the same task and seed; the majority row has none
    for _, r in df[df.condition != "majority"].iterrows():
        assert r.baseline == df[(df.condition == "majority") & (df.seed == r.seed)].value.item()
    assert df[df.condition == "majority"].baseline.isna().all()
    ev.save(tmp_path / "ev")
    assert iclgd.EvalResult.load(tmp_path / "ev").to_dict() == json.loads(json.dumps(ev.to_dict()))
    with pytest.raises(IclgdError, match="results.json"):
        ev.save(tmp_path / "ev")  # an earlier run is never replaced silently
    cmp = iclgd.compare(lm, task="sst2", k=2, seeds=[1, 2], n_test=4, data_dir=data_dir, kendall_n=3, updates_n=2)
    t = cmp.to_pandas()
    simaou = t[t.metric == "simaou"]  # the untrained control runs by default, as in the CLI
    assert sorted(simaou.condition.unique()) == ["trained", "untrained"]
    simaou = simaou[simaou.condition == "trained"]
    assert sorted(simaou.layer.dropna().unique()) == [0, 1] and len(simaou) == 2 * (1 + lm.n_layers)
    overall = simaou[simaou.layer.isna()].set_index("seed").value
    for s, r in zip([1, 2], cmp.to_dict()["seeds"]):
        assert overall[s] == pytest.approx(r["simaou"]["overall"], nan_ok=True)
    # SimAOU's baseline column: the official uniform random baseline of the same seed and layer
    base = simaou[simaou.layer.isna()].set_index("seed").baseline
    for s, r in zip([1, 2], cmp.to_dict()["seeds"]):
        assert base[s] == pytest.approx(r["simaou"]["baseline_uniform"]["overall"], nan_ok=True)
    per_layer = simaou[simaou.layer == 1].set_index("seed").baseline
    assert per_layer[1] == pytest.approx(cmp.to_dict()["seeds"][0]["simaou"]["baseline_uniform"]["per_layer"][1])
    cmp.save(tmp_path / "cmp")
    again = iclgd.CompareResult.load(tmp_path / "cmp")
    assert again.to_dict() == json.loads(json.dumps(cmp.to_dict())) and again.records == cmp.records


def test_hook_points_by_name_from_python(hf_model):
    lm = iclgd.load_model(*hf_model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with iclgd.hooks.record(lm, ["attn_out.1", "block_out"]) as rec:
        out = lm.model(input_ids=ids, output_hidden_states=True)
    assert rec.keys() == ["attn_out.1", "block_out.0", "block_out.1"]
    assert rec["attn_out.1"].shape == (1, 4, 32)
    # block_out of layer 0 is the residual stream the model itself hands to layer 1
    torch.testing.assert_close(rec["block_out.0"], out.hidden_states[1], rtol=0, atol=0)
    with pytest.raises(KeyError, match="not recorded"):
        rec["attn_in.0"]
    with pytest.raises(IclgdError, match="layer 7"):
        iclgd.hooks.record(lm, ["attn_out.7"])


def test_api_refuses_bad_input_in_one_line(hf_model):
    model, tok = hf_model
    with pytest.raises(IclgdError, match="tokenizer"):
        iclgd.load_model(model, None)
    with pytest.raises(IclgdError, match="unknown option"):
        iclgd.compare(iclgd.load_model(model, tok), k=2, n_tset=3)
    with pytest.raises(IclgdError, match="appears twice"):
        iclgd.evaluate(iclgd.load_model(model, tok), seeds=[1, 1])


def test_the_public_api_is_documented_and_lazy():
    import subprocess
    import sys

    code = ("import sys, iclgd; assert 'torch' not in sys.modules; "
            "import pydoc; t = pydoc.render_doc(iclgd); "
            "assert all(w in t for w in ('load_model', 'evaluate', 'compare', 'dual_verify', 'to_pandas')); "
            "assert callable(iclgd.compare) and iclgd.Task.from_json and iclgd.metrics.simaou; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "ok", r.stderr
