"""Finetuning that fits the model (issue 23): --ft-loss label takes the loss over the label tokens only,
and --lr-search picks the rate by held-out loss, reporting ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iclgd.core.models import build_tiny
from iclgd.core.tasks import load_task, resolve_task, sample_demos
from iclgd.engine.finetune import Snapshot, finetune
from iclgd.engine.scoring import build_prompts
from iclgd.experiments.compare import CompareConfig, _choose_lr, compare_deviations, compare_seed


def _one_demo(data_dir):
    lm = build_tiny("tiny-random-llama")
    data = load_task(resolve_task("sst2"), data_dir, 2)
    p = build_prompts(lm, data.spec, sample_demos(data.demo_pool, 2, 1), data.eval_rows)
    return lm, data, p


def test_label_tokens_are_the_answer_at_the_end_of_each_demonstration(data_dir):
    lm, data, p = _one_demo(data_dir)
    for (a, b), n, d in zip(p.demo_spans, p.demo_label_lens, p.demos):
        answer = lm.tokenizer(data.spec.format_answer(d["label"]), add_special_tokens=False)["input_ids"]
        assert 1 <= n < b - a and p.prefix_ids[b - n:b] == answer


def test_label_only_loss_equals_the_hand_computed_cross_entropy(data_dir):
    lm, _, p = _one_demo(data_dir)
    (a, b), n = p.demo_spans[0], p.demo_label_lens[0]
    demo = p.prefix_ids[a:b]
    ids = torch.tensor([lm.bos_id] + demo)
    with torch.no_grad():
        logp = F.log_softmax(lm.model(input_ids=ids[None]).logits[0].double(), -1)
    T = len(ids)
    by_hand = -np.mean([logp[t - 1, ids[t]].item() for t in range(T - n, T)])  # the label tokens' positions
    every = -np.mean([logp[t - 1, ids[t]].item() for t in range(1, T)])
    snap = Snapshot(lm, "kv")
    rec = finetune(lm, [demo], 1e-3, label_lens=[n], record=False)  # the loss is taken before the step
    snap.restore()
    rec_all = finetune(lm, [demo], 1e-3, record=False)
    snap.restore()
    assert rec.losses[0] == pytest.approx(by_hand, rel=1e-5) and rec_all.losses[0] == pytest.approx(every, rel=1e-5)
    assert abs(by_hand - every) > 1e-3  # the two objectives differ on this demonstration


def test_ft_loss_label_is_recorded_and_listed_as_a_deviation(data_dir):
    lm, data, _ = _one_demo(data_dir)
    cfg = CompareConfig(k=2, ft_loss="label", kendall_n=2, updates_n=0)
    r, _, _ = compare_seed(lm, data, cfg, 1, progress=False)
    r_all, _, _ = compare_seed(lm, data, CompareConfig(k=2, kendall_n=2, updates_n=0), 1, progress=False)
    assert r["ft_losses"] != r_all["ft_losses"]
    assert any("label tokens only" in d for d in compare_deviations(cfg))
    assert not any("label tokens only" in d for d in compare_deviations(CompareConfig()))


def test_lr_search_takes_the_lowest_held_out_loss_and_reports_ties(data_dir):
    lm, data, p = _one_demo(data_dir)
    demo_ids = [p.prefix_ids[a:b] for a, b in p.demo_spans]
    # rates so small that finetuning changes nothing measurable: every rate ties
    cfg = CompareConfig(k=2, lr_search=True, lr_grid=(1e-14, 1e-13), lr_holdout=8)
    lr, search = _choose_lr(lm, data, cfg, 1, p.demos, demo_ids)
    assert search["tied"] == [1e-14, 1e-13] and lr == 1e-14 and search["tie_break"] == "the smallest tied rate"
    assert all(g["changed_predictions"] == 0 for g in search["grid"])
    assert all(g["holdout_loss"] == pytest.approx(search["before_ft"]["holdout_loss"]) for g in search["grid"])
    # a grid whose rates differ in effect: the lowest held-out loss wins, no tie
    cfg = CompareConfig(k=2, lr_search=True, lr_grid=(1e-14, 3.0), lr_holdout=8)
    lr, search = _choose_lr(lm, data, cfg, 1, p.demos, demo_ids)
    losses = {g["lr"]: g["holdout_loss"] for g in search["grid"]}
    assert lr == min(losses, key=lambda r: losses[r] if losses[r] == losses[r] else np.inf)
    assert search["tied"] == [lr] and search["tie_break"] is None and search["criterion"] == "lowest held-out loss"


def test_untrained_control_reinit_all_also_resets_the_embeddings():
    from iclgd.engine.finetune import reinit_untrained

    a, b = build_tiny("tiny-random-llama"), build_tiny("tiny-random-llama")
    emb0 = a.model.get_input_embeddings().weight.clone()
    reinit_untrained(a, seed=1, what="blocks")
    reinit_untrained(b, seed=1, what="all")
    assert torch.equal(a.model.get_input_embeddings().weight, emb0)
    assert not torch.equal(b.model.get_input_embeddings().weight, emb0)
    std = b.config.initializer_range
    assert b.model.get_input_embeddings().weight.std().item() == pytest.approx(std, rel=0.1)
    with pytest.raises(Exception, match="--untrained-reinit"):
        reinit_untrained(a, what="some")
    assert CompareConfig(untrained_reinit="all").untrained_reinit == "all"


def test_silent_wrong_results_are_refused_label_ties_unknown_words_and_demos_from_the_eval_file(tmp_path, data_dir):
    """Issue 24 (silent wrong results): label words with the same token ids would always tie (label 0 wins),
    one mapped to the unknown token says nothing, and a demonstration file that is the evaluation file puts test
    examples with their labels into their own prompts. Each is one line naming the task."""
    import dataclasses
    import json

    from iclgd.core.errors import IclgdError
    from iclgd.core.tasks import load_task, load_task_spec
    from iclgd.engine.world import World, sized

    lm = build_tiny("tiny-random-llama")
    data = load_task(resolve_task("sst2"), data_dir, 2)
    same = dataclasses.replace(data.spec, label_words=["good", "good"])
    with pytest.raises(IclgdError, match="'good' and 'good' have the same token ids"):
        build_prompts(lm, same, [], data.eval_rows)
    w = World(sized("tiny").world)
    world_lm = type(lm)(lm.name, lm.model, w.tokenizer(), lm.layout, "test")
    unknown = dataclasses.replace(data.spec, template="{sentence}", label_words=["L0", "positively"])
    with pytest.raises(IclgdError, match="'positively' maps to the unknown token"):
        build_prompts(world_lm, unknown, [], [{"text": "w001", "label": 0}])
    spec = json.loads(json.dumps({"name": "mine", "template": "Review: {sentence} Sentiment:",
                                  "label_words": ["bad", "good"], "fields": {"sentence": "text"},
                                  "demo_file": str(data_dir / "sst2" / "dev.jsonl"),
                                  "eval_file": str(data_dir / "sst2" / "dev.jsonl")}))
    (tmp_path / "mine.json").write_text(json.dumps(spec))
    with pytest.raises(IclgdError, match="its demonstration file is its evaluation file"):
        load_task(load_task_spec(tmp_path / "mine.json"), None, 2)


@pytest.mark.real_data  # the real SST-2 rows are what overflow a 256-token byte-level context
def test_compare_refuses_a_context_that_holds_no_demonstration(data_dir):
    """Found trying the API as a user would: a model object with a 256-token context and a byte-level tokenizer
    fits no SST-2 demonstration beside its longest test prompt; compare ended in a numpy traceback (nothing to
    concatenate in Kendall). Now one line naming the task and the context."""
    import transformers as T

    from iclgd.api import load_model
    from iclgd.core.errors import IclgdError

    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=300, n_positions=256,
                                           bos_token_id=None, eos_token_id=None))
    lm = load_model(model, build_tiny("tiny-random-gpt2").tokenizer)
    data = load_task(resolve_task("sst2"), data_dir, 4)
    with pytest.raises(IclgdError, match="task sst2: not one of the 2 demonstrations fits in the context \\(256 tokens"):
        compare_seed(lm, data, CompareConfig(k=2), 1, progress=False)
