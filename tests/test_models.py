import pytest
import torch

from iclgd.core.errors import IclgdError
from iclgd.core.hooks import Recorder
from iclgd.core.models import OVERRIDES, adapter_for, load_model, supported_families, tiny_configs

TINY = list(tiny_configs())


def test_layouts_are_derived_for_eighteen_families_with_few_overrides():
    """Every tiny family's layout comes from its modules; only four families have facts listed by hand."""
    fams = supported_families()
    assert len(fams) >= 18 and {"mistral", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt2", "gpt_neo",
                                "opt", "xglm", "llama", "qwen2", "gpt_neox", "gptj", "stablelm", "phi",
                                "falcon", "bloom"} <= set(fams)
    assert set(OVERRIDES) == {"gpt_neo", "gpt_neox", "falcon", "bloom"}
    assert adapter_for("bloom").alibi and not adapter_for("falcon").alibi and adapter_for("bloom").fused_kind == "neox"
    assert adapter_for("gptj").rotary_style == "pairs" and adapter_for("phi").rotary_style == "halves"
    from iclgd.core.models import layout_for_config

    falcon = {n: layout_for_config(tiny_configs()[n]).fused_kind for n in ("tiny-random-falcon", "tiny-random-falcon-gqa")}
    assert falcon == {"tiny-random-falcon": "concat", "tiny-random-falcon-gqa": "grouped"}
    lay = {f: adapter_for(f) for f in fams}
    assert (lay["phi3"].fused, lay["phi3"].fused_kind) == ("qkv_proj", "concat")
    assert (lay["gpt2"].fused_kind, lay["gpt_neox"].fused_kind) == ("gpt2_conv1d", "neox")
    assert lay["gemma3_text"].qk_norm == ("q_norm", "k_norm") and lay["gemma3_text"].qk_norm_per_head
    assert lay["gemma3_text"].rotary_by_layer_type and lay["gemma3_text"].rotary == "model.rotary_emb"
    assert lay["olmo2"].qk_norm and not lay["olmo2"].qk_norm_per_head  # over the whole projection
    assert lay["qwen3"].qk_norm_per_head and lay["llama"].qk_norm is None
    assert lay["gemma2"].softcap and lay["gemma2"].attn_implementation == "eager"
    assert lay["gpt_neo"].attn == "attn.attention" and not lay["gpt_neo"].attention_interface
    assert lay["opt"].blocks == "model.decoder.layers" and lay["opt"].final_norm == "model.decoder.final_layer_norm"


def test_per_layer_scale_window_and_softcap_come_from_the_modules(tiny):
    g2, g3, mi, neo = (tiny(f"tiny-random-{n}") for n in ("gemma2", "gemma3", "mistral", "gpt-neo"))
    assert g3.scale(0) == g2.scale(1) == 24 ** -0.5  # query_pre_attn_scalar, not head_dim (16)
    assert tiny("tiny-random-llama").scale(0) == 8 ** -0.5 and neo.scale(0) == 1.0
    assert [g3.window(l) for l in range(2)] == [8, None] and g3.windowed_layers() == [0]
    assert [mi.window(l) for l in range(2)] == [8, 8] and tiny("tiny-random-qwen2").windowed_layers() == []
    assert [neo.window(l) for l in range(2)] == [None, 4096]  # GPT-Neo's local layer
    assert g2.softcap(0) == 5.0 and g3.softcap(0) is None


@pytest.mark.parametrize("name", TINY)
def test_projections_reproduce_the_modules_own_qkv(name, tiny):
    """The adapter's q/k/v weights, applied to the attention input, give the q/k/v the model computes.

    Checked through the value path: with all attention on one token (a 1-token sequence), the
    attention output before o_proj equals v of that token, so o(v) must equal the module output.
    """
    lm = tiny(name)
    with torch.no_grad(), Recorder(lm, points=("attn_in", "attn_out")) as rec:
        lm.model(input_ids=torch.tensor([[5]]))
    captured = {"in": rec.acts["attn_in.0"], "out": rec.acts["attn_out.0"]}
    p = lm.projections(0)
    xin = captured["in"].reshape(-1)
    v = xin @ p.Wv.T + (p.bv if p.bv is not None else 0)
    H, Hkv, hd = lm.head_counts()
    v = v.view(Hkv, hd).repeat_interleave(H // Hkv, dim=0).reshape(-1)
    out = v @ p.Wo.T + (p.bo if p.bo is not None else 0)
    torch.testing.assert_close(out, captured["out"][0, 0], rtol=1e-5, atol=1e-6)
    assert p.Wq.shape == (H * hd, xin.numel()) and p.Wk.shape == (Hkv * hd, xin.numel())


def test_underivable_layout_names_the_model_type_and_what_is_missing(tmp_path):
    import transformers as T

    T.PersimmonConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(IclgdError, match="model type 'persimmon' is not supported: its fused projection "
                                         "self_attn.query_key_value does not say how its rows split") as e:
        load_model(str(tmp_path))
    assert "\n" not in str(e.value)
    with pytest.raises(IclgdError, match="'mamba' is not supported: no self-attention module with separable"):
        adapter_for("mamba")
    with pytest.raises(IclgdError, match="'no-such-type' is not supported: transformers does not know it"):
        adapter_for("no-such-type")


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


def _built(cfg):
    import transformers as T

    from iclgd.core.models import LoadedModel, byte_tokenizer, derive_layout

    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    m = T.AutoModelForCausalLM.from_config(cfg).eval()
    return LoadedModel(cfg.model_type, m, byte_tokenizer(), derive_layout(m), "built in the test")


def test_every_tiny_familys_cache_holds_the_keys_and_values_its_layout_derives():
    """The load-time check finds, for every tiny family, that the model's key/value cache holds layer by layer what
    ``qkv`` derives, so the captures read them from it (tests/test_scale.py checks what they read); a model loaded
    in bfloat16 too."""
    assert all(load_model(name).cache_kv for name in TINY)
    assert load_model("tiny-random-llama", dtype="bfloat16").cache_kv


def test_check_layout_accepts_more_derived_families_and_refuses_misread_ones():
    """Starcoder2, Gemma and OLMo are derived with no entry and reproduce their own attention, and so do GPT-J, Phi
    and StableLM, which rotate a slice of each head (GPT-J in interleaved pairs); a misread rotary convention or
    a forgotten q/k norm is refused in one line."""
    import dataclasses

    import transformers as T

    from iclgd.core.models import check_layout

    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=259)
    for cfg in (T.Starcoder2Config(num_key_value_heads=2, **kw), T.OlmoConfig(**kw),
                T.GemmaConfig(num_key_value_heads=1, head_dim=8, **kw)):
        assert check_layout(_built(cfg)) <= 1e-5
    for cfg in (T.PhiConfig(**kw), T.StableLmConfig(num_key_value_heads=2, **kw),
                T.GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=259, rotary_dim=4)):
        lm = _built(cfg)
        assert check_layout(lm) <= 1e-5
        wrong = "halves" if lm.layout.rotary_style == "pairs" else "pairs"
        lm.layout = dataclasses.replace(lm.layout, rotary_style=wrong)
        with pytest.raises(IclgdError, match=f"model type '{cfg.model_type}': "):
            check_layout(lm)
    lm = load_model("tiny-random-qwen3")  # a misread layout (its q/k norms forgotten) is caught by the numbers
    lm.layout = dataclasses.replace(lm.layout, qk_norm=None)
    with pytest.raises(IclgdError, match=r"does not reproduce its attention \(relative error 0\.\d+ > 0\.001\)"):
        check_layout(lm)
