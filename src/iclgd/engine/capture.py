"""Captures taken in the same forward passes as the predictions: what the ICL-vs-FT metrics need.

The tensors come from the hook points of :mod:`iclgd.core.hooks` (``attn_in`` and ``attn_out``); queries
and keys are rebuilt from ``attn_in`` with the adapter (:func:`iclgd.core.models.qkv`, checked against the
model's attention output in the dual-form tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from iclgd.core.hooks import Recorder
from iclgd.core.models import LoadedModel, qkv, repeat_kv


@dataclass
class Observation:
    """What one setting (ZSL, ICL or FT) shows at one test example's prediction position."""

    h: np.ndarray  # (L, d_model) attention output after the output projection
    s_query: np.ndarray  # (L, H, T_query) raw scores q·k·scale (soft-capped where the model caps) over the
    #                      test input's own tokens ("input-only")
    q: np.ndarray  # (L, H, d_head) the prediction position's query (unscaled)
    s_demo: np.ndarray | None = None  # (L, n_demo_tokens) scores over demonstration tokens, summed over heads;
    #                                   -inf where a sliding-window layer does not see the token
    # (L, H, T_after) raw scores over every position after the context up to the prediction position: the
    # official code's SimAM slice attn_map[:, :, -1, c_len:] ("after-context"); with --position label-token
    # it includes the appended label token itself, with --position last it equals s_query
    s_after: np.ndarray | None = None
    scale: float = 1.0  # the score scale (1/√d_head, Gemma's query_pre_attn_scalar^-½, 1 for GPT-Neo)

    def simam_scores(self, segment: str = "after-context") -> np.ndarray:
        """The scores SimAM compares: "after-context" (the official code, default) or "input-only"."""
        if segment == "after-context":
            return self.s_after
        if segment == "input-only":
            return self.s_query
        raise ValueError(f"SimAM segment {segment!r}: expected after-context or input-only")


@dataclass
class Observer:
    """Collects an :class:`Observation` per example during :func:`iclgd.engine.scoring.score_options`.

    ``demo_positions``: indices into the prefix of the demonstration tokens (BOS and separators excluded).
    ``position``: "last" = the last prompt token (whose logits decide); "label-token" = the first token
    of option 0 appended to the prompt (the official code's convention).
    """

    lm: LoadedModel
    demo_positions: list[int] = field(default_factory=list)
    position: str = "last"
    obs: dict[int, Observation] = field(default_factory=dict)
    _k_prefix: list[torch.Tensor] | None = None

    def set_prefix(self, rec: Recorder, P: int) -> None:
        """Keys of the prefix tokens per layer (H_kv, P, d_head), from the prefix pass."""
        pos = torch.arange(P)
        self._k_prefix = [qkv(self.lm, l, rec.acts[f"attn_in.{l}"][0], pos)[1] for l in range(self.lm.n_layers)]

    def take(self, rec: Recorder, example: int, row: int, pos: int, n_query: int, P: int) -> None:
        """Read example ``example`` from batch row ``row`` at in-row index ``pos``; the row starts at
        absolute position P (the prefix length) and its first ``n_query`` tokens are the test input."""
        hs, ss, sa, qs, ds = [], [], [], [], []
        positions = P + torch.arange(pos + 1)
        dpos = torch.tensor(self.demo_positions, dtype=torch.long)
        for l in range(self.lm.n_layers):
            x = rec.acts[f"attn_in.{l}"][row, : pos + 1]
            q, k, _, scale = qkv(self.lm, l, x, positions)
            H, Hkv = q.shape[0], k.shape[0]
            q_pred = q[:, pos]  # (H, hd)
            k_after = repeat_kv(k[:, : pos + 1], H // Hkv, dim=0)  # (H, T_after, hd): all after the context
            cap = self.lm.softcap(l)  # Gemma-2: the scores the softmax sees are cap·tanh(s / cap)
            capped = (lambda s: cap * torch.tanh(s / cap)) if cap else (lambda s: s)
            s_after = capped(torch.einsum("hd,htd->ht", q_pred, k_after) * scale).double().cpu().numpy()
            sa.append(s_after)
            ss.append(s_after[:, :n_query])  # the test input's own tokens only
            qs.append(q_pred.double().cpu().numpy())
            hs.append(rec.acts[f"attn_out.{l}"][row, pos].double().cpu().numpy())
            if len(dpos):
                kp = repeat_kv(self._k_prefix[l][:, dpos], H // Hkv, dim=0)  # (H, n_demo_tok, hd)
                sd = capped(torch.einsum("hd,htd->ht", q_pred, kp) * scale).sum(0).double().cpu().numpy()
                W = self.lm.window(l)
                if W is not None:  # the prediction position P + pos sees keys j > P + pos − W only
                    sd[dpos.numpy() <= P + pos - W] = -np.inf
                ds.append(sd)
        self.obs[example] = Observation(np.stack(hs), np.stack(ss), np.stack(qs), np.stack(ds) if ds else None,
                                        np.stack(sa), float(scale))
