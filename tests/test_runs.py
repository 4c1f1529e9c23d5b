import json

import numpy as np
import pytest
import torch

from iclgd.core.models import tiny_configs
from iclgd.core.tasks import TASKS, load_task, load_task_spec, sample_demos
from iclgd.engine.scoring import EvalConfig, Prompts, build_prompts, evaluate, score_options


@pytest.fixture(scope="module")
def sst2(data_dir):
    return load_task(TASKS["sst2"], data_dir, n_test=6)


@pytest.mark.parametrize("name", list(tiny_configs()))
def test_prefix_reuse_equals_reencoding(name, tiny, sst2):
    lm = tiny(name)
    p = build_prompts(lm, TASKS["sst2"], sample_demos(sst2.demo_pool, 4, 1), sst2.eval_rows)
    a = score_options(lm, p, batch_size=4, reuse_prefix=True)
    b = score_options(lm, p, batch_size=4, reuse_prefix=False)
    assert np.isfinite(a).all()
    assert np.abs(a - b).max() <= 1e-4


def test_prediction_rule_is_mean_label_logprob(tiny):
    """Score a hand-made prompt with one full forward pass and compare with the engine."""
    lm = tiny("tiny-random-gpt2")
    prefix, query = [lm.bos_id, 10, 11, 12], [20, 21]
    options = [[30], [31, 32, 33]]
    p = Prompts(prefix, [(1, 3)], [query], options, [1])
    got = score_options(lm, p)
    for c, o in enumerate(options):
        seq = torch.tensor([prefix + query + o])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=seq).logits[0].double(), -1)
        start = len(prefix) + len(query)
        expected = np.mean([logp[start - 1 + j, t].item() for j, t in enumerate(o)])
        assert got[0, c] == pytest.approx(expected, abs=1e-5)


def test_single_token_options_take_one_row(tmp_path, tiny):
    """Options of one token are scored from the last query position; same numbers as one row each."""
    for name in ("d", "e"):  # demonstrations and test examples from two files (one file is refused)
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} item {i}", "label": i % 2}) + "\n"
                                                         for i in range(8)))
    (tmp_path / "s.json").write_text(json.dumps({"name": "ab", "template": "{text} ->", "label_words": ["a", "b"],
                                                 "answer_format": "{label}", "demo_file": "d.jsonl",
                                                 "eval_file": "e.jsonl"}))
    spec = load_task_spec(tmp_path / "s.json")
    data = load_task(spec, None)
    lm = tiny("tiny-random-llama")
    p = build_prompts(lm, spec, sample_demos(data.demo_pool, 3, 1), data.eval_rows)
    assert all(len(o) == 1 for o in p.option_ids)
    a = score_options(lm, p)
    p2 = Prompts(p.prefix_ids, p.demo_spans, p.query_ids, [o + [] for o in p.option_ids] + [[1, 2]], p.labels)
    b = score_options(lm, p2)[:, :2]  # a 2-token dummy option forces one row per option
    assert np.abs(a - b).max() <= 1e-5


def test_overflowing_demonstrations_are_dropped(tiny, sst2):
    lm = tiny("tiny-random-llama")
    demos = sample_demos(sst2.demo_pool, 20, 1)
    p = build_prompts(lm, TASKS["sst2"], demos, sst2.eval_rows, max_len=600)
    assert 0 < p.k_true < 20 and p.k_requested == 20
    longest = len(p.prefix_ids) + max(map(len, p.query_ids)) + max(map(len, p.option_ids))
    assert longest <= 600
    assert [d["idx"] for d in p.demos] == [d["idx"] for d in demos[: p.k_true]]


def test_evaluate_records(tiny, sst2):
    r = evaluate(tiny("tiny-random-gpt2"), sst2, EvalConfig(k=2, seed=1), progress=False)
    assert r["n"] == 6 and r["k_true"] == 2 and len(r["records"]) == 6
    preds = [rec["icl_pred"] for rec in r["records"]]
    assert preds == [int(np.argmax(rec["icl_logprobs"])) for rec in r["records"]]
    assert r["acc_icl"] == np.mean([rec["icl_pred"] == rec["label"] for rec in r["records"]])
