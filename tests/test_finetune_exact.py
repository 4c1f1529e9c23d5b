"""Finetuning checked against independent computations: the SGD step, the order of the demonstrations, the
queries recorded before each update, low precision with fp32 master weights, and the untrained control."""

import numpy as np
import pytest
import torch

import iclgd.engine.finetune as FT
from iclgd.core.models import qkv as qkv_all
from iclgd.core.errors import IclgdError
from iclgd.engine.finetune import Snapshot, finetune, lm_loss, reinit_untrained, trainable_parameters
from iclgd.core.models import load_model

D1, D2, D3 = [10, 11, 12, 13, 14], [20, 21, 22], [30, 31, 32, 33]


def _kv(lm):
    return [p.detach().clone() for _, p, _ in trainable_parameters(lm)]


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
def test_one_step_is_minus_lr_times_the_gradient(name):
    """W1 = W0 − lr · ∂L/∂W0, with the gradient taken here by autograd on the K/V weights (masked for fused ones)."""
    lm = load_model(name)
    chosen = trainable_parameters(lm)
    W0 = [p.detach().clone() for _, p, _ in chosen]
    ids = torch.tensor([lm.bos_id] + D1)
    for _, p, _ in chosen:
        p.requires_grad_(True)
    logits = lm.model(input_ids=ids[None], use_cache=False).logits[0]
    # the loss by hand: mean cross-entropy of tokens 1.. given their prefixes
    logp = torch.log_softmax(logits[:-1].float(), -1)
    loss = -logp[torch.arange(len(D1)), ids[1:]].mean()
    grads = torch.autograd.grad(loss, [p for _, p, _ in chosen])
    for _, p, _ in chosen:
        p.requires_grad_(False)
    lr = 0.3
    rec = finetune(lm, [D1], lr=lr)
    assert rec.losses == [pytest.approx(loss.item(), rel=1e-6)]
    moved = 0
    for (n, p, mask), w0, g in zip(chosen, W0, grads):
        g = g * mask if mask is not None else g
        torch.testing.assert_close(p.detach(), w0 - lr * g, rtol=0, atol=1e-6, msg=n)
        moved += int(torch.count_nonzero(p.detach() - w0))
    assert moved > 0


def test_lm_loss_excludes_bos_as_a_target():
    logits = torch.zeros(3, 5)
    logits[0, 2] = logits[1, 4] = 10.0  # position 0 predicts token 2, position 1 predicts token 4
    ids = torch.tensor([1, 2, 4])
    expected = -(torch.log_softmax(logits[0], -1)[2] + torch.log_softmax(logits[1], -1)[4]) / 2
    assert lm_loss(logits, ids).item() == pytest.approx(expected.item(), rel=1e-6)


def test_demonstration_order_matters_and_is_the_given_order():
    a, b = load_model("tiny-random-llama"), load_model("tiny-random-llama")
    ra = finetune(a, [D1, D2], lr=0.5)
    rb = finetune(b, [D2, D1], lr=0.5)
    assert any(not torch.equal(x, y) for x, y in zip(_kv(a), _kv(b)))
    # the recorded training tokens come demonstration by demonstration, in the given order
    assert [q.shape[2] for q in ra.q_train] == [len(D1), len(D2)]
    assert [q.shape[2] for q in rb.q_train] == [len(D2), len(D1)]


def _queries(lm, demo):
    ids = torch.tensor([lm.bos_id] + demo)
    from iclgd.core.hooks import Recorder

    with Recorder(lm, points=("attn_in",)) as r, torch.no_grad():
        lm.model(input_ids=ids[None], use_cache=False)
        pos = torch.arange(len(ids))
        return np.stack([qkv_all(lm, l, r.acts[f"attn_in.{l}"][0], pos)[0][:, 1:].double().numpy()
                         for l in range(lm.n_layers)])


def test_queries_are_recorded_before_each_update():
    """Step 2's queries are those of the model after step 1 only: not the initial model, not the final one."""
    lm = load_model("tiny-random-llama")
    q1_initial = _queries(lm, D1)
    q2_initial = _queries(lm, D2)
    rec = finetune(lm, [D1, D2], lr=0.5)
    q2_final = _queries(lm, D2)
    np.testing.assert_allclose(rec.q_train[0], q1_initial, rtol=1e-5, atol=1e-6)
    one = load_model("tiny-random-llama")
    finetune(one, [D1], lr=0.5)
    q2_after_step1 = _queries(one, D2)
    np.testing.assert_allclose(rec.q_train[1], q2_after_step1, rtol=1e-5, atol=1e-6)
    assert not np.allclose(rec.q_train[1], q2_initial, rtol=1e-5, atol=1e-6)
    assert not np.allclose(rec.q_train[1], q2_final, rtol=1e-5, atol=1e-6)
    # the FT side of Kendall: (L, tokens, H, d) in demonstration order, and the scale of the recorded queries
    Q = rec.train_queries()
    np.testing.assert_array_equal(Q[:, : len(D1)], np.transpose(rec.q_train[0], (0, 2, 1, 3)))
    np.testing.assert_array_equal(Q[:, len(D1):], np.transpose(rec.q_train[1], (0, 2, 1, 3)))
    assert rec.scale == pytest.approx(lm.head_counts()[2] ** -0.5)


def _update(lm, W0):
    return torch.cat([(p.detach().float() - w.float()).flatten() for (_, p, _), w in zip(trainable_parameters(lm), W0)])


def test_bfloat16_keeps_an_fp32_master_and_the_update_is_not_lost(monkeypatch):
    """30 steps each below bfloat16's precision: the fp32 master accumulates them as fp32 SGD does."""
    demos, lr = [D1, D2, D3] * 10, 1e-4
    ref = load_model("tiny-random-llama", dtype="bfloat16")
    assert next(ref.model.parameters()).dtype == torch.bfloat16
    W0 = _kv(ref)
    ref.model.float()  # the same (bfloat16-valued) start, trained in fp32
    finetune(ref, demos, lr=lr)
    ideal = [p.detach().bfloat16() for _, p, _ in trainable_parameters(ref)]
    ideal_changed = sum(int((a != b).sum()) for a, b in zip(ideal, W0))
    n = sum(w.numel() for w in W0)
    r = _update(ref, W0)

    def run():
        lm = load_model("tiny-random-llama", dtype="bfloat16")
        rec = finetune(lm, demos, lr=lr)
        got = _kv(lm)
        assert all(w.dtype == torch.bfloat16 for w in got)
        agree = sum(int((a == b).sum()) for a, b in zip(got, ideal)) / n
        changed = sum(int((a != b).sum()) for a, b in zip(got, W0))
        x = _update(lm, W0)
        return rec, agree, changed, float(x.norm() / r.norm())

    rec, agree, changed, ratio = run()
    assert rec.master_fp32
    assert agree > 0.98 and abs(changed - ideal_changed) < 0.05 * ideal_changed and 0.9 < ratio < 1.1
    # the control: steps written straight into the bfloat16 weights lose most of the update
    monkeypatch.setattr(FT, "LOW_PRECISION", ())
    rec, agree, changed, ratio = run()
    assert not rec.master_fp32 and agree < 0.9 and changed < 0.5 * ideal_changed


def test_low_precision_without_master_is_refused():
    lm = load_model("tiny-random-llama", dtype="bfloat16")
    with pytest.raises(IclgdError, match="master"):
        finetune(lm, [D1], lr=0.1, master_fp32=False)
    fp32 = load_model("tiny-random-llama")
    assert not finetune(fp32, [D1], lr=0.1, master_fp32=False).master_fp32


def test_snapshot_reports_change():
    lm = load_model("tiny-random-llama")
    snap = Snapshot(lm)
    assert not snap.changed()
    finetune(lm, [D1], lr=0.1)
    assert snap.changed()
    snap.restore()
    assert not snap.changed()


def test_untrained_control_reinitialises_every_layer_and_follows_its_seed():
    from torch import nn

    lm = load_model("tiny-random-llama")
    trained = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    reinit_untrained(lm, seed=3)
    std = lm.config.initializer_range
    linear = {n for b_i, b in enumerate(lm.blocks()) for n, m in b.named_modules() if isinstance(m, nn.Linear)}
    assert linear
    for l, block in enumerate(lm.blocks()):
        for n, m in block.named_modules():
            if isinstance(m, nn.Linear):
                w = m.weight.detach()
                full = next(k for k, p in lm.model.named_parameters() if p is m.weight)
                assert not torch.equal(w, trained[full]), f"layer {l} {n} kept its trained weights"
                assert abs(w.std().item() - std) < 0.35 * std, f"layer {l} {n}: std {w.std().item()}"
                if m.bias is not None:
                    assert torch.count_nonzero(m.bias) == 0
    for n, p in lm.model.named_parameters():  # embeddings, norms, unembedding: the trained values
        if "norm" in n or "embed" in n or "lm_head" in n:
            assert torch.equal(p, trained[n]), n
    w3 = _kv(lm)
    reinit_untrained(lm, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(w3, _kv(lm)))
    reinit_untrained(lm, seed=4)
    assert all(not torch.equal(a, b) for a, b in zip(w3, _kv(lm)))


def test_fused_gpt2_mask_is_zero_on_queries_and_one_on_keys_values():
    lm = load_model("tiny-random-gpt2")
    d = lm.head_counts()[0] * lm.head_counts()[2]
    for name, p, mask in trainable_parameters(lm):
        expected = torch.zeros_like(p)
        expected[..., d:] = 1.0  # Conv1D columns [q | k | v]: the step moves k and v at full rate, q not at all
        assert torch.equal(mask, expected), name


def test_snapshot_of_all_parameters_restores_them_all():
    lm = load_model("tiny-random-gpt2")
    emb = lm.model.get_input_embeddings().weight.detach().clone()
    snap = Snapshot(lm, "all")
    finetune(lm, [D1], lr=0.5, params="all")
    assert not torch.equal(lm.model.get_input_embeddings().weight, emb)
    snap.restore()
    assert torch.equal(lm.model.get_input_embeddings().weight, emb)


@pytest.mark.parametrize("init_range,expected_std", [(0.05, 0.05), (0.0, 0.02)])
def test_untrained_control_uses_the_configs_initializer_range_and_seed_0_by_default(init_range, expected_std):
    lm = load_model("tiny-random-llama")
    lm.config.initializer_range = init_range
    reinit_untrained(lm)
    w = lm.attention(0).k_proj.weight.detach().clone()
    assert abs(w.std().item() - expected_std) < 0.25 * expected_std
    reinit_untrained(lm, seed=0)
    assert torch.equal(lm.attention(0).k_proj.weight, w)


def test_refusal_names_the_dtype():
    lm = load_model("tiny-random-llama", dtype="float16")
    with pytest.raises(IclgdError, match=r"^finetuning float16 weights without fp32 master"):
        finetune(lm, [D1], lr=0.1, master_fp32=False)
