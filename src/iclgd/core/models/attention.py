"""The attention maths: queries, keys and values rebuilt from the attention's input, the check that a derived
layout reproduces the model's own attention, and how grouped KV heads reach torch's attention kernel on CPU."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import torch

from iclgd.core.errors import IclgdError
from iclgd.core.models.layout import get_path
from iclgd.core.models.loaded import LoadedModel


def repeat_kv(x, n_rep: int, dim: int):
    """Grouped-query attention: key/value head j serves query heads j·n_rep … (j+1)·n_rep − 1, so each
    KV head is repeated ``n_rep`` times along ``dim`` (a torch tensor or a numpy array)."""
    if isinstance(x, np.ndarray):
        return np.repeat(x, n_rep, axis=dim)
    return x.repeat_interleave(n_rep, dim=dim)


FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"  # read by transformers' SDPA attention at every call


@contextmanager
def native_gqa(lm: LoadedModel):
    """Within it, transformers' SDPA attention hands a model on CPU its grouped key/value heads as they are
    (``enable_gqa``) instead of first copying each KV head to every query head it serves (``repeat_kv``).
    transformers does so only without an attention mask, because CUDA's fast kernels take no mask with grouped heads;
    torch's CPU kernel takes both. A padded batch after a cached prefix then no longer copies the whole cache for
    each head group (SmolLM2, 3 KV heads for 9: the ICL pass 1.5× faster, benchmarks/bench_roofline.py), and the
    outputs are the same floats (tests/test_scoring_engine.py). A value the environment set is left alone; on a GPU
    nothing changes. What applies is in :func:`gqa_state` (every results file records it)."""
    if lm.input_device.type != "cpu" or FORCE_GQA in os.environ:
        yield
        return
    os.environ[FORCE_GQA] = "1"
    try:
        yield
    finally:
        os.environ.pop(FORCE_GQA, None)


def gqa_state() -> str:
    """How scoring passes grouped KV heads to the attention kernel, for the results' provenance."""
    if FORCE_GQA in os.environ:
        return f"as the environment sets it ({FORCE_GQA}={os.environ[FORCE_GQA]})"
    return (f"on CPU as they are (enable_gqa; iclgd sets {FORCE_GQA}=1 while it scores); on a GPU transformers' "
            "choice (repeat_kv under a mask)")


def qkv(lm: LoadedModel, layer: int, x: torch.Tensor, position_ids: torch.Tensor, q_rows: torch.Tensor | None = None,
        values: bool = True, keys: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]:
    """Queries (H, T, d_head), keys and values (H_kv, T, d_head) of every position, from the attention's
    input ``x`` (T, d_model), as the layer computes them: the derived projections with their biases, the
    q/k norms (per head, or over the whole projection for OLMo-2) and, for rotary models, the model's own
    rotary module. Queries are *not* multiplied by the score scale, which is returned separately
    (:meth:`LoadedModel.scale`: 1/√d_head, Gemma's query_pre_attn_scalar^-½, 1 for GPT-Neo).
    ``q_rows``: the queries of these rows of ``x`` only, (H, len(q_rows), d_head) (every step is per token, so
    they equal those rows of all queries), sparing the largest projection where only a few queries are read.
    ``values=False``: no values (None), where only scores are read. ``keys=False``: the queries only (keys and
    values None), where the keys are read from the model's own cache (``lm.cache_kv``, see :func:`check_layout`).
    """
    p = lm.projections(layer)
    H, Hkv, hd = p.n_heads, p.n_kv_heads, p.head_dim
    x = x.to(p.Wq.dtype)
    xq, pos_q = (x, position_ids) if q_rows is None else (x[q_rows], position_ids[q_rows])
    lay = lm.layout
    norm_q, norm_k = [get_path(lm.attention(layer), n) for n in lay.qk_norm] if lay.qk_norm else (None, None)

    def lin(x, W, b):
        return x @ W.T + (b if b is not None else 0)

    def heads(t, n, norm):  # (T, n·d_head) -> (n, T, d_head), through the family's q/k norm where it has one
        if norm is not None and not lay.qk_norm_per_head:  # OLMo-2: over the whole projection, before the head split
            t = norm(t)
        t = t.view(len(t), n, hd)
        if norm is not None and lay.qk_norm_per_head:  # Gemma-3, Qwen3: over each head's d_head entries
            t = norm(t)
        return t.transpose(0, 1)

    q = heads(lin(xq, p.Wq, p.bq), H, norm_q)
    k = heads(lin(x, p.Wk, p.bk), Hkv, norm_k) if keys else None
    v = lin(x, p.Wv, p.bv).view(len(x), Hkv, hd).transpose(0, 1) if values and keys else None
    if lay.rotary:
        pe = lm.rotary(x[None], position_ids[None].to(x.device), layer) if keys else None  # at the keys' positions
        if keys and q_rows is None:  # queries and keys at the same positions: one call rotates both
            q, k = lm.apply_rotary(layer, q, pe, k)
        else:
            q = lm.apply_rotary(layer, q, lm.rotary(xq[None], pos_q[None].to(x.device), layer))
            k = lm.apply_rotary(layer, k, pe) if keys else None
    return q, k, v, lm.scale(layer)


@torch.no_grad()
def check_layout(lm: LoadedModel, n_tokens: int = 6) -> float:
    """A derived layout must reproduce the model's own attention: on ``n_tokens`` tokens, the heads' output
    at the last position of every layer (the input of its output projection) against softmax attention
    from :func:`qkv` (with the layer's scale, soft-capping, sliding window and grouped KV heads).
    Returns the worst relative error; refuses with one line above the dtype's tolerance, so a family whose
    structure is misread (a rotary function of another signature, rows in another order) never yields
    silent numbers."""
    from transformers import DynamicCache

    from iclgd.core.hooks import Recorder  # hooks imports this package: imported at use

    dev = lm.input_device
    # the attention's input and the heads' outputs (the output projection's input) of every layer, and the cache
    with Recorder(lm, points=("attn_in", "attn_heads")) as rec:
        ids = [t % lm.model.config.vocab_size for t in range(3, 3 + n_tokens)]
        try:
            try:
                out = lm.model(input_ids=torch.tensor([ids], device=dev), use_cache=True, cache=DynamicCache())
            except Exception:  # noqa: BLE001 - a model that keeps no cache: checked without one (cache_kv False)
                out = lm.model(input_ids=torch.tensor([ids], device=dev), use_cache=False)
        except Exception as e:  # noqa: BLE001 - any failure of the probe is a layout that cannot be used
            raise IclgdError(f"model type {lm.model_type!r}: a forward pass to check its derived layout failed "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    seen = rec.acts

    def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
        got, want = got.double(), want.double()
        return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()

    cache_layers = getattr(getattr(out, "cache", None), "layers", None) or []
    worst, cache_worst = 0.0, 0.0 if len(cache_layers) == lm.n_layers else float("inf")
    for l in range(lm.n_layers):
        x = seen[f"attn_in.{l}"][0].double()
        try:
            q, k, v, scale = qkv(lm, l, x.to(lm.projections(l).Wq.dtype), torch.arange(n_tokens, device=dev))
        except Exception as e:  # noqa: BLE001
            raise IclgdError(f"model type {lm.model_type!r}: its derived attention layout fails on layer {l} "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        H, Hkv = q.shape[0], k.shape[0]
        if cache_worst < float("inf"):  # what the model cached, against the keys and values derived here
            pairs = list(zip((cache_layers[l].keys, cache_layers[l].values), (k, v)))
            shaped = all(getattr(c, "shape", None) == (1, *t.shape) for c, t in pairs)
            cache_worst = max(cache_worst, *(rel_err(c[0], t) for c, t in pairs)) if shaped else float("inf")
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
        true = seen[f"attn_heads.{l}"][0, -1].double().reshape(-1)
        worst = max(worst, rel_err(mine, true))
    dtype = lm.projections(0).Wq.dtype
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    # the captures read the keys and values of the scoring passes from the model's cache where it holds, layer by
    # layer, what qkv derives (up to the rounding of another product kernel); elsewhere they derive them again
    lm.cache_kv = cache_worst <= (1e-5 if dtype in (torch.float32, torch.float64) else 1e-2)
    if not worst <= tol:
        raise IclgdError(f"model type {lm.model_type!r}: the attention layout derived from its modules does not "
                         f"reproduce its attention (relative error {worst:.2g} > {tol:g}); "
                         "an entry in iclgd.core.models.OVERRIDES is needed")
    return worst
