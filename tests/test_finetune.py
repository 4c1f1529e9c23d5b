import pytest
import torch

from iclgd.core.errors import IclgdError
from iclgd.core.models import load_model, tiny_configs
from iclgd.engine.finetune import Snapshot, finetune, lcgd_losses, reinit_untrained, trainable_parameters

DEMOS = [[10, 11, 12, 13, 14], [20, 21, 22], [30, 31, 32, 33]]


@pytest.mark.parametrize("name", list(tiny_configs()))
def test_ft_touches_only_keys_and_values(name):
    lm = load_model(name)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    kv_before = [lm.projections(l) for l in range(lm.n_layers)]
    kv_before = [(p.Wq.clone(), p.Wk.clone(), p.Wv.clone()) for p in kv_before]
    rec = finetune(lm, DEMOS, lr=0.5)
    assert len(rec.losses) == 3
    kv_names = set()
    for _, p, _ in trainable_parameters(lm, "kv"):
        kv_names |= {n for n, q in lm.model.named_parameters() if q is p}
    for n, p in lm.model.named_parameters():
        if n not in kv_names:
            assert torch.equal(p, before[n]), f"{n} changed"
    for l in range(lm.n_layers):
        proj = lm.projections(l)
        Wq, Wk, Wv = kv_before[l]
        assert torch.equal(proj.Wq, Wq), f"layer {l}: query weights changed"  # also inside a fused tensor
        assert not torch.equal(proj.Wk, Wk) and not torch.equal(proj.Wv, Wv)
    assert rec.train_queries().shape[:2] == (lm.n_layers, sum(map(len, DEMOS)))


def test_snapshot_restores_bit_identically():
    lm = load_model("tiny-random-gpt2")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    snap = Snapshot(lm)
    finetune(lm, DEMOS, lr=0.5)
    snap.restore()
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_lcgd_gradients_do_not_cross_layers():
    lm = load_model("tiny-random-llama")
    ids = torch.tensor([lm.bos_id, 5, 6, 7, 8, 9])
    k0 = lm.attention(0).k_proj.weight
    k0.requires_grad_(True)
    losses = lcgd_losses(lm, ids)
    # the last layer's loss does not reach layer 0 ...
    (g_last,) = torch.autograd.grad(losses[-1], k0, allow_unused=True)
    assert g_last is None or torch.count_nonzero(g_last) == 0
    # ... so the summed LCGD gradient of layer 0 is its own loss's gradient
    (g_sum,) = torch.autograd.grad(torch.stack(lcgd_losses(lm, ids)).sum(), k0)
    (g_own,) = torch.autograd.grad(lcgd_losses(lm, ids)[0], k0)
    torch.testing.assert_close(g_sum, g_own, rtol=0, atol=0)
    # and ordinary GD does let the last loss reach layer 0
    logits = lm.model(input_ids=ids[None]).logits[0]
    from iclgd.engine.finetune import lm_loss

    (g_gd,) = torch.autograd.grad(lm_loss(logits, ids), k0)
    assert torch.count_nonzero(g_gd) > 0
    k0.requires_grad_(False)


def test_lcgd_and_all_params_run():
    lm = load_model("tiny-random-gpt2")
    emb = lm.model.get_input_embeddings().weight.clone()
    finetune(lm, DEMOS, lr=0.1, mode="lcgd")
    assert torch.equal(lm.model.get_input_embeddings().weight, emb)
    finetune(lm, DEMOS, lr=0.1, params="all")
    assert not torch.equal(lm.model.get_input_embeddings().weight, emb)


def test_nan_loss_is_a_one_line_error():
    lm = load_model("tiny-random-gpt2")
    with pytest.raises(IclgdError, match="lower --lr"):
        finetune(lm, DEMOS * 3, lr=1e30)
    with pytest.raises(IclgdError, match="--ft-mode"):
        finetune(lm, DEMOS, lr=0.1, mode="adam")


def test_untrained_control_keeps_embeddings_and_norms():
    lm = load_model("tiny-random-llama")
    emb = lm.model.get_input_embeddings().weight.clone()
    norm = lm.blocks()[0].input_layernorm.weight.clone()
    k = lm.attention(0).k_proj.weight.clone()
    reinit_untrained(lm, seed=3)
    assert torch.equal(lm.model.get_input_embeddings().weight, emb) and torch.equal(lm.blocks()[0].input_layernorm.weight, norm)
    assert not torch.equal(lm.attention(0).k_proj.weight, k)


@pytest.mark.parametrize("name,cap", [("tiny-random-gemma2", 0.05), ("tiny-random-llama", None)])
def test_lcgd_last_layer_loss_is_the_models_own_loss_soft_cap_included(name, cap):
    """LCGD reads each layer out as the model reads its last one: the last layer's loss equals the model's own LM
    loss, with Gemma-2's final-logit soft-cap (a small cap, so that forgetting it shows)."""
    import torch

    from iclgd.engine.finetune import lcgd_losses, lm_loss

    lm = load_model(name, dtype="float64")
    lm.model.config.final_logit_softcapping = cap
    ids = torch.arange(3, 20)
    with torch.no_grad():
        own = lm_loss(lm.model(input_ids=ids[None]).logits[0], ids)
        last = lcgd_losses(lm, ids)[-1]
        plain = lm_loss(lm.model.get_output_embeddings()(lm.model.base_model(input_ids=ids[None]).last_hidden_state)[0], ids)
    assert abs(float(last) - float(own)) < 1e-9
    if cap:
        assert abs(float(plain) - float(own)) > 1e-4  # without the cap the loss is another number
