"""Captures taken in the same forward passes as the predictions: what the ICL-vs-FT metrics need.

The tensors come from the hook points of :mod:`iclgd.core.hooks` (``attn_in`` and ``attn_out``) and from the
pass's own key/value cache: queries are rebuilt from ``attn_in`` with the adapter (:func:`iclgd.core.models.qkv`,
checked against the model's attention output in the dual-form tests); keys and values are read from the cache where
it holds, layer by layer, what :func:`qkv` derives (``lm.cache_kv``, checked at load by
:func:`iclgd.core.models.check_layout`; every tiny family) and derived from ``attn_in`` too elsewhere.

A batch is captured at once: per layer, the queries of the prediction positions only and one score product; then
every layer's tensors of the batch go to the host in one transfer, in fp32 (computed in fp32 whatever the model
dtype; an fp64 model keeps fp64). Only what a metric reads is kept: the attention output and the scores after the
context for every example; the query only for the first ``keep_q`` examples (the ΔW comparison and Kendall use no
more), the scores over the demonstration tokens only for the first ``keep_demo`` (Kendall), the keys and values of
the row's tokens only for the first ``keep_kv`` and of the prefix with ``keep_prefix_kv`` (W_ZSL and ΔW_ICL for the
ΔW comparison).

The attention outputs and scores, which every example has, go to a :class:`CaptureStore`: an anonymous temporary
file (in ``$TMPDIR``), so host memory does not grow with the test set; the metrics read them back in chunks.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import MutableMapping
from dataclasses import dataclass, field

import numpy as np
import torch

from iclgd.core.hooks import Recorder
from iclgd.core.models import LoadedModel, qkv

ALL = 1 << 62  # keep a capture for every example
Q_ROWS_MIN = 16  # see Observer.take_batch


@dataclass
class Observation:
    """What one setting (ZSL, ICL or FT) shows at one test example's prediction position (fp32 arrays; fp64 for an
    fp64 model)."""

    h: np.ndarray  # (L, d_model) attention output after the output projection
    # (L, H, T_after) raw scores q·k·scale (soft-capped where the model caps) over every position after the
    # context up to the prediction position: the official code's SimAM slice attn_map[:, :, -1, c_len:]
    # ("after-context"); with --position label-token it includes the appended label token itself
    s_after: np.ndarray
    n_query: int  # the test input's own tokens: the first n_query entries of s_after ("input-only")
    q: np.ndarray | None = None  # (L, H, d_head) the prediction position's query (unscaled); first keep_q only
    s_demo: np.ndarray | None = None  # (L, n_demo_tokens) scores over demonstration tokens, summed over heads;
    #                                   -inf where a sliding-window layer does not see the token; first keep_demo only
    scale: float = 1.0  # the score scale (1/√d_head, Gemma's query_pre_attn_scalar^-½, 1 for GPT-Neo)
    # (L, H_kv, pos + 1, d_head) each: the keys and values of the row's tokens up to the prediction position, the
    # prefix's being in Observer.prefix_kv (W_ZSL, Eq. 6, of the example's prompt); first keep_kv only
    kv: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def s_query(self) -> np.ndarray:
        """(L, H, n_query) the scores over the test input's own tokens (a view of ``s_after``)."""
        return self.s_after[:, :, : self.n_query]

    def simam_scores(self, segment: str = "after-context") -> np.ndarray:
        """The scores SimAM compares: "after-context" (the official code, default) or "input-only"."""
        if segment == "after-context":
            return self.s_after
        if segment == "input-only":
            return self.s_query
        raise ValueError(f"SimAM segment {segment!r}: expected after-context or input-only")


def _spill_error(e: OSError) -> Exception:
    """The captures' spill file in the temporary folder could not be written: one line naming TMPDIR."""
    from iclgd.core.errors import disk_error

    return disk_error(e, tempfile.gettempdir(), setting="TMPDIR") or e


class CaptureStore(MutableMapping):
    """Example index -> :class:`Observation`, with the large arrays (``h``, ``s_after``: per example
    L·(d_model + H·T) floats, for every example) in an anonymous temporary file that the OS deletes when it is
    closed or the process ends, and the small ones (``q``, ``s_demo``, ``kv``: only for the first examples) in memory.
    Host memory stays flat in the number of examples; disk use is 4·L·(d_model + H·T) bytes per example in fp32.
    Reading an example back gives an equal Observation."""

    def __init__(self):
        try:
            self._file = tempfile.TemporaryFile(prefix="iclgd-captures-")
        except OSError as e:
            raise _spill_error(e) from None
        self._end = 0  # bytes written
        self._index: dict[int, tuple] = {}  # example -> (offset, dtype, h shape, s_after shape, n_query, q, s_demo,
        #                                      scale, kv)

    def __setitem__(self, i: int, o: Observation) -> None:
        h, s = np.ascontiguousarray(o.h), np.ascontiguousarray(o.s_after, dtype=o.h.dtype)
        data = h.tobytes() + s.tobytes()
        try:  # unbuffered, at its offset: a short or failed write is an error here, never a short read later
            done = 0
            while done < len(data):
                n = os.pwrite(self._file.fileno(), data[done:], self._end + done)
                if n <= 0:
                    raise OSError(errno.ENOSPC, "No space left on device")
                done += n
        except OSError as e:
            raise _spill_error(e) from None
        self._index[i] = (self._end, h.dtype, h.shape, s.shape, o.n_query, o.q, o.s_demo, o.scale, o.kv)
        self._end += h.nbytes + s.nbytes

    def __getitem__(self, i: int) -> Observation:
        off, dtype, sh, ss, n_query, q, s_demo, scale, kv = self._index[i]
        nh = int(np.prod(sh))
        size = (nh + int(np.prod(ss))) * np.dtype(dtype).itemsize
        flat = np.frombuffer(bytearray(os.pread(self._file.fileno(), size, off)), dtype=dtype)
        return Observation(flat[:nh].reshape(sh), flat[nh:].reshape(ss), n_query, q, s_demo, scale, kv)

    def __delitem__(self, i: int) -> None:  # the bytes stay in the file until it is closed
        del self._index[i]

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def close(self) -> None:
        self._file.close()


@dataclass
class Observer:
    """Collects an :class:`Observation` per example during :func:`iclgd.engine.scoring.score_options`.

    ``demo_positions``: indices into the prefix of the demonstration tokens (BOS and separators excluded).
    ``position``: "last" = the last prompt token (whose logits decide); "label-token" = the first token
    of option 0 appended to the prompt (the official code's convention). ``keep_q`` / ``keep_demo`` / ``keep_kv``:
    how many examples (in test-set order) keep their query / their demonstration scores / their tokens' keys and
    values. ``keep_prefix_kv``: keep the prefix's keys and values (``prefix_kv``; also kept when ``keep_kv``).
    """

    lm: LoadedModel
    demo_positions: list[int] = field(default_factory=list)
    position: str = "last"
    keep_q: int = ALL
    keep_demo: int = ALL
    keep_kv: int = 0
    keep_prefix_kv: bool = False
    obs: MutableMapping[int, Observation] = field(default_factory=CaptureStore)
    # per layer the prefix's keys and values (H_kv, P, d_head) on the host: ΔW_ICL (Eq. 7) over the demonstrations'
    # span, or the start token's part of W_ZSL (Eq. 6)
    prefix_kv: list[tuple[np.ndarray, np.ndarray]] | None = None
    _k_prefix: list[torch.Tensor] | None = None

    @torch.no_grad()
    def set_prefix(self, rec: Recorder, P: int, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                   ) -> None:
        """From the prefix pass: the keys of the demonstration tokens per layer (H_kv, n_demo_tokens, d_head), and
        with ``keep_prefix_kv``/``keep_kv`` every prefix token's keys and values on the host. ``prefix_kv``: the
        pass's cache, per layer (keys, values) (1, H_kv, P, d_head), read where it holds what :func:`qkv` derives
        (``lm.cache_kv``); else they are derived from ``attn_in``."""
        keep = self.keep_prefix_kv or self.keep_kv > 0
        self._k_prefix = [] if self.demo_positions else None
        self.prefix_kv = [] if keep else None
        if not (self.demo_positions or keep):
            return
        x0 = rec.acts["attn_in.0"]
        pos = torch.arange(P, device=x0.device)
        dpos = torch.tensor(self.demo_positions, dtype=torch.long, device=x0.device)
        cached = self.lm.cache_kv and prefix_kv is not None
        for l in range(self.lm.n_layers):
            if cached:
                k, v = prefix_kv[l][0][0], prefix_kv[l][1][0]  # (H_kv, P, d_head), as the model cached them
            else:
                _, k, v, _ = qkv(self.lm, l, rec.acts[f"attn_in.{l}"][0], pos)
            if self.demo_positions:
                self._k_prefix.append(k[:, dpos])
            if keep:
                acc = torch.promote_types(k.dtype, torch.float32)
                self.prefix_kv.append((k.to(acc).cpu().numpy(), v.to(acc).cpu().numpy()))

    def take_batch(self, rec: Recorder, items: list[tuple[int, int, int, int]], P: int, cache=None) -> None:
        """Read every item ``(example, row, pos, n_query)`` of one batch: example ``example`` from batch row ``row``
        at in-row index ``pos``; rows start at absolute position P (the prefix length) and their first
        ``n_query`` tokens are the test input. ``cache``: the batch's transformers cache after its forward pass
        (each layer's keys and values (rows, H_kv, P + T, d_head)); where it holds what :func:`qkv` derives
        (``lm.cache_kv``) the keys and values are read from it and only the prediction positions' queries are
        computed, else all are derived from ``attn_in``."""
        lm = self.lm
        x0 = rec.acts["attn_in.0"]
        dev = x0.device
        rows = torch.tensor([r for _, r, _, _ in items], device=dev)
        pos = torch.tensor([p for _, _, p, _ in items], device=dev)
        B, T = len(items), int(pos.max()) + 1
        keep_q = [j for j, (i, _, _, _) in enumerate(items) if i < self.keep_q]
        keep_d = [j for j, (i, _, _, _) in enumerate(items) if i < self.keep_demo] if self._k_prefix else []
        keep_kv = [j for j, (i, _, _, _) in enumerate(items) if i < self.keep_kv]
        positions = (P + torch.arange(T, device=dev)).repeat(B)  # rows are right-padded: the same positions each
        dpos = torch.tensor(self.demo_positions, device=dev)
        flat_pred = torch.arange(B, device=dev) * T + pos  # each row's prediction position in the flattened batch
        # at least Q_ROWS_MIN query rows (repeats of the first, dropped after): MKL sums a product of 5 to 11 rows in
        # an order that depends on the thread count (measured, MKL 2024.2), so a sharded run with one thread per
        # process would differ from one process in the last bits
        pad = max(0, Q_ROWS_MIN - B)
        q_rows = torch.cat([flat_pred, flat_pred[:1].expand(pad)])
        q_src = torch.cat([rows, rows[:1].expand(pad)]), torch.cat([pos, pos[:1].expand(pad)])  # the same rows
        from_cache = lm.cache_kv and cache is not None
        hs, ss, qs, ds, ks, vs = [], [], [], [], [], []
        for l in range(lm.n_layers):
            # the query of each row's prediction position only: (H, B, hd); keys and values (H_kv, B, T, hd)
            if from_cache:
                q_pred, _, _, scale = qkv(lm, l, rec.acts[f"attn_in.{l}"][q_src], P + q_src[1], keys=False)
                k, v = (t[rows, :, P: P + T].transpose(0, 1) for t in (cache.layers[l].keys, cache.layers[l].values))
            else:
                x = rec.acts[f"attn_in.{l}"][rows, :T].reshape(B * T, -1)  # (B·T, d_model)
                q_pred, k, v, scale = qkv(lm, l, x, positions, q_rows=q_rows, values=bool(keep_kv))
                k = k.reshape(k.shape[0], B, T, -1)
                v = None if v is None else v.reshape(v.shape[0], B, T, -1)
            q_pred = q_pred[:, :B]
            H, Hkv, hd = q_pred.shape[0], k.shape[0], q_pred.shape[-1]
            acc = torch.promote_types(q_pred.dtype, torch.float32)  # fp32 for half precision (fp64 kept for fp64)
            q_pred = q_pred.to(acc)
            k = k.to(acc)
            if keep_kv:
                ks.append(k[:, keep_kv].transpose(0, 1))  # (B_kv, H_kv, T, hd)
                vs.append(v[:, keep_kv].to(acc).transpose(0, 1))
            # query heads by the KV head that serves them (grouped-query attention: head g·rep + r reads KV head g),
            # so each KV head's keys are multiplied as they are, not first copied to every head of its group
            q_grp = q_pred.reshape(Hkv, H // Hkv, B, hd)  # (H_kv, rep, B, hd)
            cap = lm.softcap(l)  # Gemma-2: the scores the softmax sees are cap·tanh(s / cap)
            capped = (lambda s: cap * torch.tanh(s / cap)) if cap else (lambda s: s)
            # (B, H, T): every position after the context; a row's positions past its own pos are cut on the host
            bias = lm.key_bias(l, P + torch.arange(T, device=dev))  # ALiBi (BLOOM): (H, T), else None
            bias = 0 if bias is None else bias.to(acc)
            ss.append(capped(torch.einsum("grbd,gbtd->bgrt", q_grp, k).reshape(B, H, T) * scale + bias))
            hs.append(rec.acts[f"attn_out.{l}"][rows, pos].to(acc))  # (B, d_model)
            qs.append(q_pred[:, keep_q].transpose(0, 1))  # (B_q, H, hd)
            if keep_d:
                kp = self._k_prefix[l].to(acc)  # (H_kv, n_demo_tok, hd)
                bd = lm.key_bias(l, dpos)
                bd = 0 if bd is None else bd.to(acc)
                s_d = torch.einsum("grbd,gtd->bgrt", q_grp[:, :, keep_d], kp).reshape(len(keep_d), H, -1)
                sd = capped(s_d * scale + bd).sum(1)  # (B_d, n_demo)
                W = lm.window(l)
                if W is not None:  # the prediction position P + pos sees keys j > P + pos − W only
                    sd = sd.masked_fill(dpos[None] <= (P + pos[keep_d] - W)[:, None], -torch.inf)
                ds.append(sd)
        parts = [torch.stack(hs, 1), torch.stack(ss, 1), torch.stack(qs, 1)] + ([torch.stack(ds, 1)] if ds else [])
        if keep_kv:
            parts += [torch.stack(ks, 1), torch.stack(vs, 1)]  # (B_kv, L, H_kv, T, hd) each
        flat = torch.cat([t.reshape(-1) for t in parts]).cpu().numpy()  # one device-to-host transfer per batch
        host, at = [], 0
        for t in parts:
            host.append(flat[at: at + t.numel()].reshape(t.shape))
            at += t.numel()
        Hh, S, Q = host[:3]
        D = host[3] if ds else None
        Kk, Vk = host[-2:] if keep_kv else (None, None)
        jq, jd = {j: n for n, j in enumerate(keep_q)}, {j: n for n, j in enumerate(keep_d)}
        jkv = {j: n for n, j in enumerate(keep_kv)}
        for j, (i, _, p, nq) in enumerate(items):
            kv = (Kk[jkv[j], :, :, : p + 1].copy(), Vk[jkv[j], :, :, : p + 1].copy()) if j in jkv else None
            self.obs[i] = Observation(Hh[j], S[j, :, :, : p + 1], nq,
                                      Q[jq[j]].copy() if j in jq else None,
                                      D[jd[j]].copy() if j in jd else None, float(scale), kv)
