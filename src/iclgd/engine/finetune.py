"""Finetuning as in the paper's code, and the controls its critics asked for.

- ``kv`` (the paper): only the attention key and value projections (weights and biases) of every
  layer are updated. For fused projections (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) the whole
  tensor is a parameter but the gradient of its query slice is zeroed, so those entries never move.
- ``all``: every parameter (full-model FT control).
Plain SGD (no momentum, no weight decay), constant learning rate, one epoch, batch size 1: one step
per demonstration, in the ICL prompt's order: W ← W − lr·∂L/∂W. In float16/bfloat16 the step is taken
on an fp32 master copy of each trained parameter and the model's weights are set to its rounding (the
paper trains in fp16 with fp32 master weights); a step written straight into bfloat16 weights loses
every change smaller than half their precision. Loss: the LM loss over all tokens of the demonstration
(input and label; BOS is the context, not a target), mean per token.
``gd`` mode backpropagates the usual loss; ``lcgd`` (layer-causal GD, Deutch et al. 2024) sends each
layer's output through the final norm and the unembedding for its own LM loss, with each layer's input
detached, and sums the losses, so no gradient crosses a layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iclgd.core.errors import IclgdError
from iclgd.core.hooks import Recorder
from iclgd.core.models import LoadedModel, get_path, qkv


def trainable_parameters(lm: LoadedModel, which: str = "kv") -> list[tuple[str, nn.Parameter, torch.Tensor | None]]:
    """(name, parameter, gradient mask or None) of what FT may change."""
    if which == "all":
        return [(n, p, None) for n, p in lm.model.named_parameters()]
    if which != "kv":
        raise IclgdError(f"--ft-params {which!r}: expected kv or all")
    return lm.kv_parameters()


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, n_target: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy; ids[0] (BOS) is context only. ``n_target``: over the last ``n_target``
    tokens only (a demonstration's label tokens: ``--ft-loss label``), the rest context; None: over every token
    (the paper's LM loss on the demonstrations)."""
    if n_target is None:
        return F.cross_entropy(logits[:-1].float(), ids[1:])
    return F.cross_entropy(logits[-n_target - 1:-1].float(), ids[-n_target:])


def lcgd_losses(lm: LoadedModel, ids: torch.Tensor, n_target: int | None = None) -> list[torch.Tensor]:
    """Per-layer LM losses with each block's input detached (layer causality); each layer's output read out as the
    model reads its last one (final norm, unembedding, and the final-logit soft-cap where the model has one)."""
    final_norm = get_path(lm.model, lm.layout.final_norm)
    with Recorder(lm, points=("block_out",), detach=False, edit={"block_in": torch.Tensor.detach}) as rec:
        lm.model.base_model(input_ids=ids[None], use_cache=False)
    return [lm_loss(lm.logits_of(final_norm(rec.acts[f"block_out.{l}"][0])), ids, n_target) for l in range(lm.n_layers)]


@dataclass
class FTRecord:
    """What the FT pass saw: per-step losses and, per layer, the queries/keys of every training token."""

    lr: float
    losses: list[float] = field(default_factory=list)
    scale: float = 1.0  # the attention score scale of the recorded queries (1/√d_head, or 1 for GPT-Neo)
    master_fp32: bool = False  # steps taken on fp32 master copies of low-precision parameters
    q_train: list[list[np.ndarray]] = field(default_factory=list)  # per demo: (L, H, T_i, hd)
    k_train: list[list[np.ndarray]] = field(default_factory=list)  # per demo: (L, H_kv, T_i, hd)

    def train_queries(self) -> np.ndarray:
        """(L, n_train_tokens, H, hd), demonstrations concatenated in order."""
        return np.concatenate([np.transpose(q, (0, 2, 1, 3)) for q in self.q_train], axis=1)

    def train_keys(self) -> np.ndarray:
        return np.concatenate([np.transpose(k, (0, 2, 1, 3)) for k in self.k_train], axis=1)


LOW_PRECISION = (torch.float16, torch.bfloat16)


def finetune(lm: LoadedModel, demo_ids: list[list[int]], lr: float, params: str = "kv", mode: str = "gd",
             record: bool = True, master_fp32: bool = True, label_lens: list[int] | None = None) -> FTRecord:
    """One epoch of batch-1 SGD over the demonstrations (in order), in place. ``demo_ids`` exclude BOS.
    ``label_lens``: the loss over each demonstration's last ``label_lens[i]`` tokens only (its label);
    None: over every token.

    Low-precision (float16/bfloat16) parameters are stepped on fp32 master copies (``master_fp32``, the
    paper's setup); with ``master_fp32=False`` low precision is refused rather than silently losing updates.
    """
    if mode not in ("gd", "lcgd"):
        raise IclgdError(f"--ft-mode {mode!r}: expected gd or lcgd")
    if not lr > 0:
        raise IclgdError(f"--lr {lr}: expected a positive learning rate")
    chosen = trainable_parameters(lm, params)
    low = sorted({str(p.dtype).removeprefix("torch.") for _, p, _ in chosen if p.dtype in LOW_PRECISION})
    if low and not master_fp32:
        raise IclgdError(f"finetuning {', '.join(low)} weights without fp32 master copies would lose every update "
                         "smaller than their precision; use --dtype float32 or keep the master copies")
    model = lm.model
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p, _ in chosen:
        p.requires_grad_(True)
    # what SGD steps: the parameter itself, or its fp32 master copy (low precision)
    stepped = [nn.Parameter(p.detach().float().clone()) if p.dtype in LOW_PRECISION else p for _, p, _ in chosen]
    opt = torch.optim.SGD(stepped, lr=lr, momentum=0.0, weight_decay=0.0)
    rec = FTRecord(lr, master_fp32=bool(low))
    dev = lm.input_device
    try:
        for i, d in enumerate(demo_ids):
            n_target = None if label_lens is None else label_lens[i]
            ids = torch.tensor(([] if lm.bos_id is None else [lm.bos_id]) + list(d), device=dev)
            opt.zero_grad(set_to_none=True)
            with Recorder(lm, points=("attn_in",)) as r:
                if mode == "gd":
                    loss = lm_loss(model(input_ids=ids[None], use_cache=False).logits[0], ids, n_target)
                else:
                    loss = torch.stack(lcgd_losses(lm, ids, n_target)).sum()
                if record:  # the training tokens' q/k as the model sees them at this step (before its update)
                    pos = torch.arange(len(ids))
                    with torch.no_grad():
                        qkvs = [qkv(lm, l, r.acts[f"attn_in.{l}"][0], pos, values=False) for l in range(lm.n_layers)]
                    qk = [x[:2] for x in qkvs]
                    rec.scale = float(qkvs[0][3])
                    rec.q_train.append(np.stack([q[:, 1:].double().cpu().numpy() for q, _ in qk]))
                    rec.k_train.append(np.stack([k[:, 1:].double().cpu().numpy() for _, k in qk]))
            if not torch.isfinite(loss):
                raise IclgdError(f"finetuning: loss became {loss.item()} at step {len(rec.losses) + 1} (lr {lr}); "
                                 "lower --lr")
            loss.backward()
            for (_, p, mask), s in zip(chosen, stepped):
                if mask is not None and p.grad is not None:
                    p.grad.mul_(mask)
                if s is not p:  # the step is taken on the master; the model's own gradient is spent
                    s.grad = None if p.grad is None else p.grad.float()
                    p.grad = None
            opt.step()
            with torch.no_grad():
                for (_, p, _), s in zip(chosen, stepped):
                    if s is not p:
                        p.copy_(s)  # the model's weights: the rounding of the fp32 master
            rec.losses.append(float(loss.item()))
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
    return rec


class Snapshot:
    """Saves the parameters FT may touch and puts them back (so one loaded model serves every seed)."""

    def __init__(self, lm: LoadedModel, params: str = "kv"):
        self.saved = [(p, p.detach().clone()) for _, p, _ in trainable_parameters(lm, params)]

    def changed(self) -> bool:
        """Whether any saved parameter now differs from its saved value."""
        return any(not torch.equal(p, v) for p, v in self.saved)

    def restore(self) -> None:
        with torch.no_grad():
            for p, v in self.saved:
                p.copy_(v)


REINIT = ("blocks", "all")


def reinit_untrained(lm: LoadedModel, seed: int = 0, what: str = "blocks") -> None:
    """Deutch et al.'s untrained control: re-initialise every weight inside the transformer blocks except
    the norms (attention and MLP), N(0, initializer_range²) weights and zero biases; embeddings, norms and
    unembedding keep their trained values (``what="blocks"``). ``what="all"`` also re-initialises the input
    embeddings (and so a tied unembedding) and any untied output embedding, N(0, initializer_range²): with the
    blocks near zero the residual stream is almost the embedding, so trained embeddings alone can answer above
    chance; this control removes that too."""
    from transformers.pytorch_utils import Conv1D

    if what not in REINIT:
        raise IclgdError(f"--untrained-reinit {what!r}: expected one of {', '.join(REINIT)}")
    std = getattr(lm.config, "initializer_range", 0.02) or 0.02
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if what == "all":
            emb, out = lm.model.get_input_embeddings(), lm.model.get_output_embeddings()
            for m in {id(emb): emb, **({id(out): out} if out is not None else {})}.values():
                if m.weight is not None:
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g).to(m.weight) * std)
        for block in lm.blocks():
            for m in block.modules():
                if isinstance(m, (nn.Linear, Conv1D)):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                    if m.bias is not None:
                        m.bias.zero_()
