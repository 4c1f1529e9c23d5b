"""Attention layouts derived from module structure: what each family's attention looks like and where it lives.

:func:`derive_layout` reads the layout from a model's modules and config; what cannot be read is one line of
:data:`OVERRIDES`.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn

from iclgd.core.errors import IclgdError


@dataclass(frozen=True)
class AttentionLayout:
    """Where attention lives in one model (dotted attribute paths) and how it computes, as
    :func:`derive_layout` reads it from the module structure and config.

    Per-layer facts that a config decides (the score scale, a sliding window, logit soft-capping)
    are read from the attention module at use (:meth:`LoadedModel.scale`, ``window``, ``softcap``).
    """

    family: str  # the config's model_type
    blocks: str  # the ModuleList of transformer blocks, from the *ForCausalLM root
    attn: str  # the self-attention module inside a block (its input is the hook point ``attn_in``)
    q: str | None  # projections inside ``attn`` (nn.Linear, weight (out, in)) ...
    k: str | None
    v: str | None
    o: str
    fused: str | None = None  # ... or one fused projection, laid out as ``fused_kind``
    fused_kind: str | None = None  # "gpt2_conv1d": Conv1D [q|k|v] columns; "neox": rows (head, 3, head_dim);
    #                                "concat": rows [q (H·hd) | k (H_kv·hd) | v (H_kv·hd)] (Phi-3)
    qk_norm: tuple[str, str] | None = None  # q/k norm modules inside ``attn`` (Gemma-3, Qwen3, OLMo-2) ...
    qk_norm_per_head: bool = True  # ... over each head (Gemma-3, Qwen3), or the whole projection (OLMo-2)
    final_norm: str | None = None  # the norm before the unembedding, from the root
    rotary: str | None = None  # the model's rotary-embedding module, from the root (None: no rotary) ...
    rotary_apply: str = "apply_rotary_pos_emb"  # ... applied by this function of the family's modeling module
    rotary_by_layer_type: bool = False  # the rotary module takes the layer's type (Gemma-3: local/global bases)
    # how the family's apply function is called: "halves" apply(q, k, cos, sin) on (B, H, T, rot) and rotates the
    # two halves of each head (Llama, NeoX); "pairs" apply(x, sin, cos) on (B, T, H, rot) and rotates interleaved
    # pairs (GPT-J, whose module returns (sin, cos)). Partial rotary (StableLM, Phi, GPT-J's rotary_dim): the first
    # ``rot`` entries of a head rotate, rot read from the module's output
    rotary_style: str = "halves"
    scale: float | None = None  # score scale when the module does not say (GPT-Neo: 1, no 1/√d)
    local_window: bool = False  # GPT-Neo: local layers (attention_type 'local') see config.window_size keys
    attention_interface: bool = True  # calls ALL_ATTENTION_FUNCTIONS (else: module hooks only)
    softcap: bool = False  # logit soft-capping configured (Gemma-2): SDPA cannot, eager attention does
    alibi: bool = False  # ALiBi (BLOOM): scores get slope_h · (key position), built by the family's build_alibi_tensor

    @property
    def attn_implementation(self) -> str:
        """SDPA where the family calls transformers' AttentionInterface (eager with soft-capping); else its own code."""
        return "sdpa" if self.attention_interface and not self.softcap else "eager"

    @property
    def momentum(self) -> bool:
        """Momentum attention registers through AttentionInterface, so the family must call it."""
        return self.attention_interface


# What cannot be read from the module structure: one entry per fact, with its reason.
OVERRIDES: dict[str, dict] = {
    # GPT-Neo famously does not divide scores by sqrt(head_dim), and its module keeps no `scaling`;
    # its local layers are a boolean mask buffer, marked only by attention_type == "local"
    "gpt_neo": dict(scale=1.0, local_window=True),
    # a fused nn.Linear does not say how its rows are ordered: NeoX interleaves them per head
    "gpt_neox": dict(fused_kind="neox"),
    # Falcon's query_key_value: per KV group its query heads then one key and one value head (the new
    # decoder architecture), [q heads | k | v] with one KV head (multi-query), else per head as NeoX
    # BLOOM: query_key_value rows per head as NeoX; no rotary, but ALiBi position biases on the scores
    "bloom": dict(fused_kind="neox", alibi=True),
    "falcon": dict(fused_kind=lambda c: "grouped" if c.new_decoder_architecture else "concat" if c.multi_query
                   else "neox",
                   n_kv_heads=lambda c: c.num_kv_heads if c.new_decoder_architecture else 1 if c.multi_query
                   else c.num_attention_heads),
}

_Q, _K, _V = ("q_proj", "query", "q", "wq"), ("k_proj", "key", "k", "wk"), ("v_proj", "value", "v", "wv")
_O = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o")
_FUSED = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "qkv", "W_pack")
_FUSED_CONCAT = ("qkv_proj", "Wqkv", "W_pack")  # nn.Linear named so: rows [q | k | v] (Phi-3, MPT, Baichuan)
_QK_NORMS = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"))
_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "layer_norm", "final_norm")


def _is_projection(mod) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(mod, (nn.Linear, Conv1D))


def _child(mod: nn.Module, names) -> str | None:
    return next((n for n in names if _is_projection(getattr(mod, n, None))), None)


def _n_layers(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def _plain(fn):
    """The function itself: from transformers 5.25 (with the ``kernels`` package it requires) a modeling module's
    functions such as ``apply_rotary_pos_emb`` can be ``nn.Module`` slots for hub kernels, callable alike, whose
    ``forward`` is the original function (their own signature is ``(*args, **kwargs)``)."""
    return fn.forward if isinstance(fn, nn.Module) else fn


def derive_layout(model: nn.Module) -> AttentionLayout:
    """The attention layout of a causal LM, read from its modules (weights may be on the meta device).

    Blocks: the ModuleList with one entry per layer; attention: the module of a block that owns
    separable q/k/v projections (or a fused one) and an output projection; rotary: the model's
    ``*RotaryEmbedding`` module and the ``apply_rotary_pos_emb`` of the attention's modeling module;
    q/k norms by name, per head or over the whole projection by their size; the rest from
    :data:`OVERRIDES`. Refuses with one line naming what is missing.
    """
    from transformers.pytorch_utils import Conv1D

    config = model.config
    family = config.model_type

    def refuse(what: str):
        return IclgdError(f"model type {family!r} is not supported: {what}, so iclgd cannot derive its attention "
                          "layout (captures, finetuning and the dual form need it; `iclgd eval` does not)")

    L = _n_layers(config)
    blocks = next((n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == L and L), None)
    if blocks is None:
        raise refuse(f"no list of {L} transformer blocks found")
    block = get_path(model, blocks)[0]
    attn = None
    for name, m in block.named_modules():
        has_qkv = all(_child(m, names) for names in (_Q, _K, _V)) or _child(m, _FUSED)
        if name and has_qkv and _child(m, _O):
            attn = name
            break
    if attn is None:
        raise refuse("no self-attention module with separable q/k/v and output projections "
                     f"(looked for children {'/'.join(_Q[:1] + _K[:1] + _V[:1] + _O[:1])} or a fused "
                     f"{'/'.join(_FUSED)} in each block)")
    am = get_path(block, attn)
    over = OVERRIDES.get(family, {})
    fused = None if all(_child(am, names) for names in (_Q, _K, _V)) else _child(am, _FUSED)
    fused_kind = None
    if fused:
        fused_kind = over.get("fused_kind")
        fused_kind = fused_kind(config) if callable(fused_kind) else fused_kind
        fused_kind = ("gpt2_conv1d" if isinstance(getattr(am, fused), Conv1D) else fused_kind
                      or ("concat" if fused in _FUSED_CONCAT else None))
        if fused_kind is None:
            raise refuse(f"its fused projection {attn}.{fused} does not say how its rows split into q, k and v "
                         "(an entry in iclgd.core.models.OVERRIDES would)")
    qk_norm = next((pair for pair in _QK_NORMS if all(isinstance(getattr(am, n, None), nn.Module) for n in pair)),
                   None)
    per_head = True
    if qk_norm:
        w = getattr(getattr(am, qk_norm[0]), "weight", None)
        if w is None:
            raise refuse(f"its q/k norm {qk_norm[0]} has no weight to tell whether it normalises per head")
        per_head = w.numel() == _head_dim(config)
    parent_path, _, _ = blocks.rpartition(".")
    parent = get_path(model, parent_path) if parent_path else model
    final_norm = next((f"{parent_path}.{n}" if parent_path else n for n in _FINAL_NORMS
                       if isinstance(getattr(parent, n, None), nn.Module)), None)
    rotary = next((n for n, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    by_type, style = False, "halves"
    if rotary is not None:
        if rotary.startswith(blocks + "."):
            raise refuse("its rotary embedding lives inside each attention module, not in the model")
        if not hasattr(sys.modules[type(am).__module__], "apply_rotary_pos_emb"):
            raise refuse("its modeling module has no apply_rotary_pos_emb for its rotary embedding")
        by_type = "layer_type" in inspect.signature(get_path(model, rotary).forward).parameters
        names = list(inspect.signature(_plain(sys.modules[type(am).__module__].apply_rotary_pos_emb)).parameters)
        if names[:3] == ["tensor", "sin", "cos"]:
            style = "pairs"
        elif names[:4] == ["q", "k", "cos", "sin"]:
            style = "halves"
        else:
            raise refuse(f"its apply_rotary_pos_emb takes ({', '.join(names)}), a convention iclgd does not know")
    return AttentionLayout(
        family=family, blocks=blocks, attn=attn,
        q=None if fused else _child(am, _Q), k=None if fused else _child(am, _K), v=None if fused else _child(am, _V),
        o=_child(am, _O), fused=fused, fused_kind=fused_kind, qk_norm=qk_norm, qk_norm_per_head=per_head,
        final_norm=final_norm, rotary=rotary, rotary_by_layer_type=by_type, rotary_style=style, scale=over.get("scale"),
        local_window=over.get("local_window", False), alibi=bool(over.get("alibi", False)),
        attention_interface=bool(getattr(type(model), "_supports_attention_backend", False)),
        softcap=bool(getattr(config, "attn_logit_softcapping", None)),
    )


def _head_dim(config) -> int:
    return _head_counts(config)[2]


def _head_counts(config) -> tuple[int, int, int]:
    c = config
    n_heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None) or getattr(c, "num_heads", None)
    n_heads = n_heads or getattr(c, "attention_heads")
    kv_rule = OVERRIDES.get(getattr(c, "model_type", None), {}).get("n_kv_heads")
    n_kv = kv_rule(c) if kv_rule else getattr(c, "num_key_value_heads", None) or n_heads
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or getattr(c, "d_model")
    head_dim = getattr(c, "head_dim", None) or hidden // n_heads
    return int(n_heads), int(n_kv), int(head_dim)


def layout_for_config(config) -> AttentionLayout:
    """Derive the layout from a model built on the meta device (no weights, no memory), before loading."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise IclgdError(f"model type {config.model_type!r} is not supported: transformers has no causal LM for "
                         f"it ({str(e).splitlines()[0]})") from None
    return derive_layout(model)


@functools.lru_cache(maxsize=None)
def adapter_for(model_type: str) -> AttentionLayout:
    """The layout of a family, derived from its tiny test config (or transformers' default config)."""
    from transformers import AutoConfig

    from iclgd.core.models.tiny import tiny_configs  # above this module (its models are built with layouts)

    tiny = next((c for c in tiny_configs().values() if c.model_type == model_type), None)
    if tiny is None:
        try:
            tiny = AutoConfig.for_model(model_type)
        except ValueError:
            raise IclgdError(f"model type {model_type!r} is not supported: transformers does not know it") from None
    return layout_for_config(tiny)


# dtypes a family's transformers code cannot run in, with why (checked before any weights load)
DTYPE_LIMITS = {
    "xglm": {"float64": "transformers' XGLM attention clamps its scores with a float32 constant, which float64's "
                        "minimum overflows (use float32)"},
}


def check_dtype(model_type: str, dtype: str, name: str) -> None:
    """One line if the family ``model_type`` cannot run in ``dtype`` (see DTYPE_LIMITS)."""
    why = DTYPE_LIMITS.get(model_type, {}).get(dtype)
    if why:
        raise IclgdError(f"--dtype {dtype}: {name} (a {model_type!r} model) cannot run in it: {why}")


def supported_families() -> list[str]:
    """The families iclgd tests (one tiny config each); others are derived the same way when loaded."""
    from iclgd.core.models.tiny import tiny_configs

    return sorted({c.model_type for c in tiny_configs().values()})


def momentum_families() -> list[str]:
    return [t for t in supported_families() if adapter_for(t).momentum]


def get_path(root: nn.Module, dotted: str) -> nn.Module:
    mod = root
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod
