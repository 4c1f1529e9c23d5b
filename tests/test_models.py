import pytest
import torch

from iclgd.core.errors import IclgdError
from iclgd.core.models import ADAPTERS, adapter_for, load_model, tiny_configs

TINY = list(tiny_configs())


def test_every_adapter_has_a_tiny_model():
    assert {tiny_configs()[n].model_type for n in TINY} == set(ADAPTERS)


@pytest.mark.parametrize("name", TINY)
def test_projections_reproduce_the_modules_own_qkv(name, tiny):
    """The adapter's q/k/v weights, applied to the attention input, give the q/k/v the model computes.

    Checked through the value path: with all attention on one token (a 1-token sequence), the
    attention output before o_proj equals v of that token, so o(v) must equal the module output.
    """
    lm = tiny(name)
    captured = {}
    attn = lm.attention(0)

    def keep(key):
        def hook(module, args, output):
            captured[key] = output[0] if isinstance(output, tuple) else output  # returns None: output unchanged
        return hook

    h = attn.register_forward_hook(keep("out"))
    h2 = lm.attention_norm(0).register_forward_hook(keep("in"))
    with torch.no_grad():
        lm.model(input_ids=torch.tensor([[5]]))
    h.remove(), h2.remove()
    p = lm.projections(0)
    xin = captured["in"].reshape(-1)
    v = xin @ p.Wv.T + (p.bv if p.bv is not None else 0)
    H, Hkv, hd = lm.head_counts()
    v = v.view(Hkv, hd).repeat_interleave(H // Hkv, dim=0).reshape(-1)
    out = v @ p.Wo.T + (p.bo if p.bo is not None else 0)
    torch.testing.assert_close(out, captured["out"][0, 0], rtol=1e-5, atol=1e-6)
    assert p.Wq.shape == (H * hd, xin.numel()) and p.Wk.shape == (Hkv * hd, xin.numel())


def test_unsupported_layout_names_the_model_type(tmp_path):
    import transformers as T

    T.MistralConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(IclgdError, match="model type 'mistral' is not supported"):
        load_model(str(tmp_path))
    with pytest.raises(IclgdError, match="'mamba'"):
        adapter_for("mamba")


def test_unknown_model_name():
    with pytest.raises(IclgdError, match="unknown model"):
        load_model("no-such-model")


@pytest.mark.parametrize("name", TINY)
def test_kv_parameters_and_their_masks_move_keys_and_values_only(name):
    """A step along every K/V parameter (masked as finetuning masks it) changes every key and value
    weight the adapter reads and no query weight: the fused layouts' slicing and masks agree."""
    lm = load_model(name)  # not the cached one: its weights change here
    p0 = lm.projections(0)
    Wq, bq, Wk, Wv = (t.clone() if t is not None else None for t in (p0.Wq, p0.bq, p0.Wk, p0.Wv))
    with torch.no_grad():
        for _, p, mask in lm.kv_parameters():
            p.add_(torch.ones_like(p) if mask is None else mask)
    p1 = lm.projections(0)
    assert torch.equal(p1.Wq, Wq) and (bq is None or torch.equal(p1.bq, bq))
    assert (p1.Wk != Wk).all() and (p1.Wv != Wv).all()
