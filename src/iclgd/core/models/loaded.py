"""The loaded model: an HF causal LM with its tokenizer and attention layout, and its per-layer projections."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from iclgd.core.errors import IclgdError
from iclgd.core.models.layout import AttentionLayout, _head_counts, get_path


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
    # the model's key/value cache holds, layer by layer, the keys and values qkv derives (set by check_layout); the
    # captures then read them from the scoring passes' cache instead of deriving them again
    cache_kv: bool = False

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
    def trained_len(self) -> int | None:
        """The length of the sequences the model was trained on, where its config records it (iclgd's world models
        write ``iclgd_trained_len``): prompts past it test length generalisation, not ICL. None: not recorded."""
        n = getattr(self.model.config, "iclgd_trained_len", None)
        return int(n) if n else None

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

    def apply_rotary(self, layer: int, x: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor],
                     y: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x`` (H, T, d_head) rotated by the family's own ``apply_rotary_pos_emb`` (from the modeling module of its
        attention class) with ``pe``, the rotary module's output: its first ``rot`` entries per head when the
        rotation is partial (StableLM, Phi, GPT-J's rotary_dim), the rest passed through, as the family does.
        ``y`` (H_kv, T, d_head) at the same positions: (x, y) both rotated, by one call of the family's function
        (which rotates a query and a key at once); without it that call's second slot gets one head of ``x``, not
        all of them again."""
        apply = getattr(sys.modules[type(self.attention(layer)).__module__], self.layout.rotary_apply)
        ts = [x] if y is None else [x, y]
        if self.layout.rotary_style == "pairs":  # GPT-J: (sin, cos) of rot/2 entries, applied on (B, T, H, rot)
            sin, cos = pe
            rot = 2 * sin.shape[-1]
            out = [apply(t[..., :rot].transpose(0, 1)[None], sin, cos)[0].transpose(0, 1) for t in ts]
        else:  # (cos, sin) of rot entries, applied on (B, H, T, rot) as apply(q, k, cos, sin)
            cos, sin = pe
            rot = cos.shape[-1]
            second = (x[:1] if y is None else y)[None, ..., :rot]
            out = [o[0] for o in apply(x[None, ..., :rot], second, cos, sin)][: len(ts)]
        out = [o if rot == t.shape[-1] else torch.cat([o, t[..., rot:]], dim=-1) for o, t in zip(out, ts)]
        return out[0] if y is None else tuple(out)


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
