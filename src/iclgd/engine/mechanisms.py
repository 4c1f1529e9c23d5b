"""The rival accounts of ICL, measured on the same prompts as the implicit-GD metrics (docs/mechanisms.md).

- **Task vector** (Hendel et al. 2023, "In-Context Learning Creates Task Vectors"): θ_L, the residual stream entering
  block L at the last position of an ICL prompt (the demonstrations and a dummy query), replaces the residual at the
  last position of a zero-shot prompt of a new query; ICL is "compressed" into θ_L if that recovers ICL's accuracy.
  Here θ_L is the mean over ``n_dummy`` dummy queries (rows of the demonstration split outside the demonstrations),
  and L is chosen on a dev split.
- **Function vector** (Todd et al. 2024, "Function Vectors in Large Language Models"): per head (l, h), its mean
  output ā_{l,h} at the last position of clean ICL prompts (through its slice of W_O, in the residual space); its
  causal indirect effect CIE(l, h): the gain in probability of the correct label's first token when the head's
  output at the last position of a label-shuffled prompt is set to its clean mean. The function vector
  v = Σ_{(l,h) ∈ top-h by CIE} ā_{l,h} is added to the residual entering block L at the last position of zero-shot
  prompts. Todd et al. take ten heads for GPT-J; here h and L are chosen on a dev split.
- **Link to the GD account**: at each layer, the cosine between what the demonstrations change in the attention
  output at the last position (ICL minus ZSL, the effect the task vector carries) and ΔW_ICL q, the dual form's
  account of that change (Eq. 7, through W_O).

Every function runs on any model iclgd derives a layout for: hidden states are read and edited at the named hook
points (``block_in``, ``attn_in``, ``attn_heads``, ``attn_out``; :mod:`iclgd.core.hooks`), keys and values come from
the model's own cache, queries from :func:`iclgd.core.models.qkv`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import numpy as np
import torch

from iclgd.core.hooks import Recorder
from iclgd.core.models import LoadedModel, qkv, repeat_kv
from iclgd.engine import dual
from iclgd.engine.scoring import (Prompts, _log_probs, _pad_right, encode_prefix, head_weights, option_scores,
                                  prefix_cache)

# ----------------------------------------------------------------------------- reading and patching


@torch.no_grad()
def last_position_acts(lm: LoadedModel, prompts: Prompts, examples: list[int], points=("block_in",),
                       batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Each point's tensor at the last query position of each example's prompt (prefix + query, no option), every
    layer: ``{point: (n, L, width)}`` in float32 (float64 for a float64 model). The prefix runs once; its keys and
    values are reused for every batch."""
    base, dev, P = lm.model.base_model, lm.input_device, len(prompts.prefix_ids)
    prefix_kv = encode_prefix(lm, prompts.prefix_ids)
    t_max = max(len(prompts.query_ids[i]) for i in examples)
    cache = prefix_cache(prefix_kv, min(batch_size, len(examples)), t_max)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    out: dict[str, list[torch.Tensor]] = {p: [] for p in points}
    for b in range(0, len(examples), batch_size):
        batch = examples[b: b + batch_size]
        ids, mask = _pad_right([prompts.query_ids[i] for i in batch], pad)
        ids, mask = ids.to(dev), mask.to(dev)
        full = torch.cat([torch.ones(len(batch), P, dtype=torch.long, device=dev), mask], dim=1)
        last = torch.tensor([len(prompts.query_ids[i]) - 1 for i in batch], device=dev)
        rows = torch.arange(len(batch), device=dev)
        with Recorder(lm, points=tuple(points)) as rec:
            base(input_ids=ids, attention_mask=full, cache=cache.start(len(batch)), use_cache=True)
        for p in points:
            x = torch.stack([rec.acts[f"{p}.{l}"][rows, last] for l in range(lm.n_layers)], dim=1)
            out[p].append(x.to(torch.promote_types(x.dtype, torch.float32)))
    return {p: torch.cat(v) for p, v in out.items()}


def _edit_last(positions: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]):
    """An edit for a hook point: the rows' tensors at ``positions`` (one per row) replaced by ``fn`` of them."""
    def edit(x: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[0], device=x.device)
        x = x.clone()
        x[rows, positions.to(x.device)] = fn(x[rows, positions.to(x.device)]).to(x.dtype)
        return x
    return edit


@torch.no_grad()
def score_patched(lm: LoadedModel, prompts: Prompts, examples: list[int], layer: int | None = None,
                  vec: torch.Tensor | None = None, mode: str = "replace", batch_size: int = 8) -> np.ndarray:
    """Option scores (n, C), the mean log-probability of each option's tokens as :func:`~iclgd.engine.scoring.
    score_options` computes them, with the residual entering block ``layer`` at the last query position replaced by
    ``vec`` (d_model,) (``mode="replace"``: the task vector) or plus ``vec`` (``"add"``: the function vector).
    ``layer=None``: unpatched. Every row runs whole (prefix, query, option): for the short zero-shot prompts here."""
    if mode not in ("replace", "add"):
        raise ValueError(f"mode {mode!r}: expected replace or add")
    base, dev = lm.model.base_model, lm.input_device
    w, b = head_weights(lm)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    C, P = len(prompts.option_ids), len(prompts.prefix_ids)
    single = all(len(o) == 1 for o in prompts.option_ids)
    out = np.zeros((len(examples), C))
    rows_per = 1 if single else C
    step = max(1, batch_size // rows_per)
    for s in range(0, len(examples), step):
        batch = examples[s: s + step]
        rows, meta, last = [], [], []  # meta per row: (example, [(option, position predicting it, its tokens)])
        for j, i in enumerate(batch):
            q, at = prompts.query_ids[i], P + len(prompts.query_ids[i]) - 1
            if single:
                rows.append(prompts.prefix_ids + q)
                last.append(at)
                meta.append((s + j, [(c, at, o) for c, o in enumerate(prompts.option_ids)]))
            else:
                for c, o in enumerate(prompts.option_ids):
                    rows.append(prompts.prefix_ids + q + o)
                    last.append(at)
                    meta.append((s + j, [(c, at, o)]))
        ids, mask = _pad_right(rows, pad)
        pos = torch.tensor(last)
        with ExitStack() as stack:
            if layer is not None:
                v = vec.to(dev)
                fn = (lambda h: v.expand_as(h)) if mode == "replace" else (lambda h: h + v.to(h.dtype))
                stack.enter_context(Recorder(lm, points=(), edit={"block_in": _edit_last(pos, fn)}, layers=[layer]))
            hidden = base(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).last_hidden_state
        option_scores(lm, hidden, meta, w, b, out)
    return out


def accuracy(scores: np.ndarray, labels) -> float:
    return float((scores.argmax(1) == np.asarray(labels)).mean())


class _QueryContexts:
    """Per example, a cache holding the prompt's prefix and the query minus its last token, over ``rows`` batch rows
    with room for ``t_new`` more tokens: the rows that follow differ only from the last query token on (an edit at the
    last position changes nothing before it), so that context runs once per example instead of once per row."""

    def __init__(self, lm: LoadedModel, prompts: Prompts, rows: int, t_new: int):
        self.lm, self.prompts, self.rows, self.t_new = lm, prompts, rows, t_new
        self.shared = None
        if prompts.prefix_ids:  # encoded once; each query's context is written after it
            t_max = max(map(len, prompts.query_ids)) - 1 + t_new
            self.shared = prefix_cache(encode_prefix(lm, prompts.prefix_ids), rows, t_max)

    def __call__(self, i: int):
        """(cache or None, its length) for example ``i``: a cache to pass with ``cache.start(n)``."""
        lm, dev = self.lm, self.lm.input_device
        ctx = self.prompts.query_ids[i][:-1]
        if self.shared is None:
            if not ctx:
                return None, 0
            return prefix_cache(encode_prefix(lm, ctx), self.rows, self.t_new), len(ctx)
        cache, P = self.shared.rewind(), len(self.prompts.prefix_ids)
        if ctx:
            lm.model.base_model(input_ids=torch.tensor([ctx], device=dev),
                                attention_mask=torch.ones(1, P + len(ctx), dtype=torch.long, device=dev),
                                cache=cache.start(1), use_cache=True)
            cache.extend(len(ctx))
        return cache, P + len(ctx)


def _edit_rows(rows: list[int], fn: Callable[[torch.Tensor], torch.Tensor]):
    """An edit for a hook point: the given rows' tensors at position 0 (the pass's first token) replaced by ``fn``."""
    def edit(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[rows, 0] = fn(x[rows, 0]).to(x.dtype)
        return x
    return edit


@torch.no_grad()
def patched_scores(lm: LoadedModel, prompts: Prompts, examples: list[int],
                   edits: list[tuple[int, torch.Tensor, str]], batch_size: int = 8) -> np.ndarray:
    """:func:`score_patched` for several edits at once: ``edits`` is a list of (layer, vec, mode); returns their option
    scores (n_edits, n, C), equal to one :func:`score_patched` call per edit (tests/test_mechanisms.py). Per example,
    the prefix and the query minus its last token run once (:class:`_QueryContexts`); each (edit, option) is then a
    row of the last query token and the option's tokens, the edit applied at its first position."""
    for _, _, mode in edits:
        if mode not in ("replace", "add"):
            raise ValueError(f"mode {mode!r}: expected replace or add")
    base, dev = lm.model.base_model, lm.input_device
    w, b = head_weights(lm)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    C = len(prompts.option_ids)
    single = all(len(o) == 1 for o in prompts.option_ids)
    options = [None] if single else list(range(C))
    todo = [(e, c) for e in range(len(edits)) for c in options]
    rows = min(len(todo), max(batch_size, 4 * batch_size if single else batch_size))
    contexts = _QueryContexts(lm, prompts, rows, 1 + (0 if single else max(map(len, prompts.option_ids))))
    vecs = [v.to(dev) for _, v, _ in edits]
    out = np.zeros((len(edits) * len(examples), C))  # row e·n + j: edit e, example j
    for j, i in enumerate(examples):
        cache, P = contexts(i)
        last = prompts.query_ids[i][-1]
        for s in range(0, len(todo), rows):
            chunk = todo[s: s + rows]
            ids, mask = _pad_right([[last] + ([] if c is None else prompts.option_ids[c]) for _, c in chunk], pad)
            mask = torch.cat([torch.ones(len(chunk), P, dtype=torch.long), mask], dim=1)
            with ExitStack() as stack:
                for layer in sorted({edits[e][0] for e, _ in chunk}):
                    for mode in ("replace", "add"):
                        sel = [r for r, (e, _) in enumerate(chunk) if edits[e][0] == layer and edits[e][2] == mode]
                        if not sel:
                            continue
                        v = torch.stack([vecs[chunk[r][0]] for r in sel])  # (n_sel, d_model)
                        fn = (lambda h, v=v: v) if mode == "replace" else (lambda h, v=v: h + v.to(h.dtype))
                        stack.enter_context(Recorder(lm, points=(), edit={"block_in": _edit_rows(sel, fn)},
                                                     layers=[layer]))
                hidden = base(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=cache is not None,
                              **({"cache": cache.start(len(chunk))} if cache is not None else {})).last_hidden_state
            options = [(c, 0, o) for c, o in enumerate(prompts.option_ids)]  # every option predicted from position 0
            option_scores(lm, hidden, [(e * len(examples) + j, options if c is None else [options[c]])
                                       for e, c in chunk], w, b, out)
    return out.reshape(len(edits), len(examples), C)


# ----------------------------------------------------------------------------- task vector


@torch.no_grad()
def task_vectors(lm: LoadedModel, icl_dummy: Prompts, batch_size: int = 8) -> torch.Tensor:
    """θ_L for every layer: the mean, over the dummy queries of ``icl_dummy`` (the demonstrations as prefix), of the
    residual entering block L at the query's last position: (L, d_model)."""
    acts = last_position_acts(lm, icl_dummy, list(range(len(icl_dummy.query_ids))), ("block_in",), batch_size)
    return acts["block_in"].mean(0)


def layer_curve(lm: LoadedModel, zsl: Prompts, examples: list[int], vectors: torch.Tensor, mode: str,
                batch_size: int = 8) -> list[float]:
    """Accuracy on ``examples`` of the zero-shot prompts patched at each layer L with ``vectors[L]``."""
    labels = [zsl.labels[i] for i in examples]
    scores = patched_scores(lm, zsl, examples, [(L, vectors[L], mode) for L in range(lm.n_layers)], batch_size)
    return [accuracy(sc, labels) for sc in scores]


def best_index(curve: list[float]) -> int:
    """The first maximum (the earliest layer among ties: the least patched computation)."""
    return int(np.argmax(curve))


# ----------------------------------------------------------------------------- function vector


def head_outputs(lm: LoadedModel, heads: torch.Tensor) -> torch.Tensor:
    """Each head's output through its own slice of W_O: ``heads`` (n, L, H·d_head), the input of every layer's output
    projection at one position -> (n, L, H, d_model) (no bias: it belongs to no head)."""
    H, _, hd = lm.head_counts()
    out = []
    for l in range(lm.n_layers):
        Wo = lm.projections(l).Wo.to(heads.dtype)  # (d_model, H·d_head)
        x = heads[:, l].reshape(-1, H, hd)  # (n, H, d_head)
        out.append(torch.einsum("nhd,mhd->nhm", x, Wo.reshape(Wo.shape[0], H, hd)))
    return torch.stack(out, 1)


@torch.no_grad()
def causal_indirect_effects(lm: LoadedModel, corrupted: Prompts, mean_heads: torch.Tensor,
                            batch_size: int = 8) -> torch.Tensor:
    """CIE per head, (L, H): on each query of the corrupted (label-shuffled) prompts, the probability of the correct
    label's first token when head (l, h)'s output at the last position is set to its clean mean ``mean_heads``
    (L, H, d_head), minus that probability unpatched; the mean over the queries.

    Only the last position changes, so the shuffled demonstrations run once, each query minus its last token once
    (:class:`_QueryContexts`), and every head's patch is one row of a single-token pass over those keys and values."""
    L, (H, _, hd) = lm.n_layers, lm.head_counts()
    base, dev = lm.model.base_model, lm.input_device
    w, b = head_weights(lm)
    patches = [(l, h) for l in range(L) for h in range(H)]
    todo = [None, *patches]  # row 0: unpatched; then one row per head
    n_rows = min(4 * batch_size, len(todo))
    contexts = _QueryContexts(lm, corrupted, n_rows, 1)
    total = torch.zeros(L, H, dtype=torch.float64)
    for i, q in enumerate(corrupted.query_ids):
        target = corrupted.option_ids[corrupted.labels[i]][0]
        cache, P = contexts(i)
        probs = []
        for s in range(0, len(todo), n_rows):
            chunk = todo[s: s + n_rows]
            with ExitStack() as stack:
                for l in range(L):
                    sel = [r for r, ph in enumerate(chunk) if ph is not None and ph[0] == l]
                    if not sel:
                        continue
                    hs = [chunk[r][1] for r in sel]
                    stack.enter_context(Recorder(lm, points=(), edit={"attn_heads": _set_heads(sel, hs, mean_heads[l],
                                                                                              hd)}, layers=[l]))
                x = torch.tensor([[q[-1]]] * len(chunk), device=dev)
                mask = torch.ones(len(chunk), P + 1, dtype=torch.long, device=dev)
                hid = base(input_ids=x, attention_mask=mask, use_cache=cache is not None,
                           **({"cache": cache.start(len(chunk))} if cache is not None else {}))
            lp = _log_probs(lm, hid.last_hidden_state[:, -1].to(w.device), w, b)
            probs.append(lp[:, target].exp().cpu())
        probs = torch.cat(probs)
        total += (probs[1:] - probs[0]).view(L, H)
    return total / len(corrupted.query_ids)


def _set_heads(rows: list[int], heads: list[int], means: torch.Tensor, hd: int):
    """Edit of ``attn_heads`` (B, 1, H·d_head): row rows[i]'s head heads[i] set to its clean mean (d_head,)."""
    def edit(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for r, h in zip(rows, heads):
            x[r, -1, h * hd: (h + 1) * hd] = means[h].to(x.dtype)
        return x
    return edit


def top_heads(cie: torch.Tensor, h: int) -> list[tuple[int, int]]:
    """The ``h`` heads of largest CIE, as (layer, head), largest first."""
    order = torch.argsort(cie.flatten(), descending=True)[:h]
    H = cie.shape[1]
    return [(int(i) // H, int(i) % H) for i in order]


# ----------------------------------------------------------------------------- link to the dual form


@torch.no_grad()
def dual_form_alignment(lm: LoadedModel, icl: Prompts, zsl: Prompts, examples: list[int], batch_size: int = 8,
                        generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
    """Per layer, mean over ``examples``: cos(attn_out_ICL − attn_out_ZSL, W_O ΔW_ICL q) at the last query position:
    how much of what the demonstrations change in the attention output the dual form's update (Eq. 7:
    ΔW_ICL = Σ_{demo tokens} v kᵀ, applied to the ICL query q, through W_O) accounts for. Baseline: the same cosine
    with a random direction (N(0, I) in d_model; ≈ 0 ± 1/√d_model). Shapes: (L,) each."""
    P, P0 = len(icl.prefix_ids), len(zsl.prefix_ids)
    acts_i = last_position_acts(lm, icl, examples, ("attn_in", "attn_out"), batch_size)
    acts_z = last_position_acts(lm, zsl, examples, ("attn_out",), batch_size)
    prefix_kv = encode_prefix(lm, icl.prefix_ids)
    H, Hkv, hd = lm.head_counts()
    cos, rnd = [], []
    for l in range(lm.n_layers):
        k, v = (t[0].double()[:, P0:P] for t in prefix_kv[l])  # the demonstration tokens' keys/values (H_kv, n, hd)
        dW = repeat_kv(dual.kv_outer(k, v), H // Hkv, dim=0)  # ΔW_ICL per query head (H, d, d), Eq. 7
        pos = torch.tensor([P + len(icl.query_ids[i]) - 1 for i in examples])
        x = acts_i["attn_in"][:, l]  # (n, d_model)
        q = torch.stack([qkv(lm, l, x[j: j + 1], pos[j: j + 1])[0][:, 0] for j in range(len(examples))])  # (n, H, d)
        u_heads = torch.einsum("hde,nhe->nhd", dW, q.double())  # ΔW_ICL q per head
        Wo = lm.projections(l).Wo.double().cpu()  # (d_model, H·hd)
        u = u_heads.reshape(len(examples), -1).cpu() @ Wo.T  # (n, d_model)
        delta = (acts_i["attn_out"][:, l] - acts_z["attn_out"][:, l]).double().cpu()
        cos.append(torch.nn.functional.cosine_similarity(delta, u, dim=-1).mean().item())
        r = torch.randn(delta.shape, generator=generator, dtype=torch.float64)
        rnd.append(torch.nn.functional.cosine_similarity(delta, r, dim=-1).mean().item())
    return {"cos_delta_dw_q": np.array(cos), "cos_random": np.array(rnd)}
