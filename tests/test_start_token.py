"""The prompts' start token (--bos) and ZSL/ICL accuracy on a family outside the adapter table."""

import json

import pytest
import torch
from typer.testing import CliRunner

from iclgd.cli import app
from iclgd.core.errors import IclgdError
from iclgd.core.models import byte_tokenizer, load_model
from iclgd.engine.scoring import build_prompts
from iclgd.core.tasks import TASKS

ROWS = [{"text": "good film", "label": 1}, {"text": "bad", "label": 0}]


def _prompts(lm, demos=ROWS[:1]):
    return build_prompts(lm, TASKS["sst2"], demos, ROWS)


def test_start_token_default_override_and_none():
    lm = load_model("tiny-random-llama")
    tok = lm.tokenizer
    assert lm.start == "<bos>" and _prompts(lm).prefix_ids[0] == tok.bos_token_id  # the tokenizer's BOS
    lm.set_start("<eos>")
    p = _prompts(lm)
    assert lm.start == "<eos>" and p.prefix_ids[0] == tok.eos_token_id and p.demo_spans[0][0] == 1
    assert lm.start_deviations() == ["start token '<eos>' instead of the paper's '</s>'"]
    lm.set_start("none")
    p = _prompts(lm)
    assert lm.start == "none" and lm.bos_id is None
    assert p.demo_spans[0][0] == 0 and p.prefix_ids[0] != tok.eos_token_id  # the first demonstration opens the prompt
    assert _prompts(lm, demos=[]).prefix_ids == []
    with pytest.raises(IclgdError, match="--bos 'nope': not a single token"):
        lm.set_start("nope")


def test_eval_without_start_token_equals_explicit_scoring(tmp_path):
    """--bos none: ZSL scores come from query tokens alone (no cache to reuse), recorded as such."""
    res = CliRunner().invoke(app, ["eval", "--model", "tiny-random-gpt2", "--task", "cb", "--k", "2", "--n-test", "3",
                                   "--bos", "none", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["config"]["start_token"] == "none"
    assert "start token 'none' instead of the paper's '</s>'" in doc["deviations"]
    from iclgd.engine.scoring import score_options
    from iclgd.core.tasks import load_task, resolve_data_dir

    lm = load_model("tiny-random-gpt2", bos="none")
    data = load_task(TASKS["cb"], resolve_data_dir(None), 3)
    p = build_prompts(lm, TASKS["cb"], [], data.eval_rows)
    lp = score_options(lm, p)
    q, o = p.query_ids[0], p.option_ids[0]
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([q + o])).logits[0].double().log_softmax(-1)
    by_hand = torch.stack([logits[len(q) - 1 + j, t] for j, t in enumerate(o)]).mean().item()
    assert lp[0, 0] == pytest.approx(by_hand, abs=1e-6)
    assert [r["zsl_pred"] for r in doc["results"][0]["records"]] == lp.argmax(1).tolist()


@pytest.mark.parametrize("cmd", [["compare"], ["dual", "verify"], ["reproduce"]])
def test_commands_that_capture_refuse_no_start_token(cmd, tmp_path):
    res = CliRunner().invoke(app, [*cmd, "--model", "tiny-random-llama", "--bos", "none", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.output.startswith("error: --bos none: only `iclgd eval`")
    assert not (tmp_path / "o").exists()


def test_compare_records_the_start_token(tmp_path):
    res = CliRunner().invoke(app, ["compare", "--model", "tiny-random-llama", "--task", "cb", "--k", "2",
                                   "--n-test", "3", "--bos", "<eos>", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["config"]["start_token"] == "<eos>"
    assert doc["deviations"][0] == "start token '<eos>' instead of the paper's '</s>'"


def test_eval_runs_on_a_family_without_adapter_and_compare_refuses(tmp_path):
    """Persimmon's fused query_key_value does not say how its rows split, so no layout is derived: accuracy
    needs none, captures do."""
    import transformers as T

    cfg = T.PersimmonConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            vocab_size=259, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    res = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "m"), "--task", "cb", "--k", "2", "--n-test", "3"])
    assert res.exit_code == 0, res.output
    assert "cb" in res.output
    res = CliRunner().invoke(app, ["compare", "--model", str(tmp_path / "m"), "--task", "cb", "--k", "2",
                                   "--n-test", "3"])
    assert res.exit_code == 2 and "model type 'persimmon' is not supported" in res.output
