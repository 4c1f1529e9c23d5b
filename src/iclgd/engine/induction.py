"""Induction-head scores per attention head (Olsson et al. 2022, "In-context Learning and Induction Heads").

An induction head completes ``[A][B] … [A] → [B]``: at a token ``A`` it attends to the token just after ``A``'s
earlier occurrence (prefix matching) and raises that token's logit (copying). Both are measured here, per layer
and head, for every family iclgd derives a layout for.

The probe: ``n_seq`` sequences ``[BOS] r_1 … r_n r_1 … r_n`` (n = ``seq_len``; the BOS is the model's start token,
absent with ``--bos none``), the r_i drawn uniformly without replacement (so each token occurs once per copy) from
the vocabulary minus the tokenizer's special ids, with a seeded generator. With o = 1 if there is a BOS else 0, the
query at position o + n + i (the second copy's r_{i+1}, i = 0 … n − 1) has its earlier occurrence at o + i, and the
*target* is the position after it, o + i + 1, which holds r_{i+2} (r_1 of the second copy for the last query).

``prefix_matching`` (L, H): the attention probability a query of the second copy puts on its target, averaged over
the n queries and the n_seq sequences. The probabilities are the model's own: queries and keys are rebuilt from the
``attn_in`` hook with :func:`iclgd.core.models.qkv` (projections, biases, q/k norms, rotary), then scored with the
layer's scale, ALiBi key bias, logit soft-cap, causal mask and sliding window, grouped KV heads repeated
(:func:`attention_probs`; the tests check it against ``output_attentions`` of eager attention). A head outside the
query's sliding window of the target scores 0 there.

``copying`` (L, H): the OV circuit's copying score. Head h's map from a token to the logits it adds is
W_U W_O^h W_V^h W_E (vocab × vocab, rank ≤ d_head); with λ its eigenvalues the score is Σλ / Σ|λ| (the real part
of Σλ, which is real: Σλ is a trace), 1 for a pure copying map, −1 for a pure anti-copying one. By the cyclic
property its nonzero eigenvalues are those of the d_head × d_head matrix W_V^h (W_E W_U) W_O^h, computed instead
(W_E W_U is d_model × d_model, summed over the vocabulary in chunks). W_E: the input embeddings (with OPT's
``project_in``), W_U: the output embeddings (with OPT's ``project_out``); every layer norm, the final norm, the
embedding scale (Gemma's √d, a positive factor the ratio does not see) and biases are ignored. A head whose OV
product is exactly zero has no eigenvalue off 0 and scores 0. Grouped KV heads: query head h reads value head
h // (H / H_kv).

``copying_logit`` (L, H): the empirical counterpart on the same sequences. At each query of the second copy, the
head's direct logit contribution is its output (the ``attn_heads`` hook, the model's own) through its block of W_O
and then W_U (norms ignored as above); the score is the fraction of queries at which the target's token is the
top-1 of that contribution among the non-special tokens (ties counted against the target). A random head scores
about 1 / (vocabulary size).

``top_heads``: the five (layer, head, prefix_matching, copying) with the highest prefix matching.
"""

from __future__ import annotations

import numpy as np
import torch

from iclgd.core.errors import IclgdError
from iclgd.core.hooks import Recorder
from iclgd.core.models import LoadedModel, qkv, repeat_kv

_CHUNK = 1 << 24  # entries of one vocabulary-chunk product (64 MB in fp32)


def attention_probs(lm: LoadedModel, layer: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The attention probabilities of ``layer``, (B, H, T, T) [batch, query head, query position, key position],
    from its attention input ``x`` (B, T, d_model) at ``positions`` (T,) (the same for every row, no padding), as
    the layer computes them: q/k from :func:`qkv`, scores q·k · scale + ALiBi bias, soft-capped, causal and
    sliding-window masked, softmax over keys. Computed in fp32 (fp64 for an fp64 model)."""
    B, T, d = x.shape
    # (H, B·T, hd) queries, (H_kv, B·T, hd) keys
    q, k, _, scale = qkv(lm, layer, x.reshape(B * T, d), positions.repeat(B), values=False)
    H, Hkv, hd = q.shape[0], k.shape[0], q.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    # query heads grouped by the KV head that serves them (head g·rep + r reads KV head g): each KV head's keys as
    # they are, not copied to every head of its group
    q = q.to(acc).reshape(Hkv, H // Hkv, B, T, hd)  # (H_kv, rep, B, T, hd)
    k = k.to(acc).reshape(Hkv, B, T, hd)  # (H_kv, B, T, hd)
    s = torch.einsum("grbqd,gbkd->bgrqk", q, k).reshape(B, H, T, T) * scale  # (B, H, T, T)
    bias = lm.key_bias(layer, positions)  # (H, T) ALiBi's slope_h · key position, or None
    if bias is not None:
        s = s + bias.to(s)[None, :, None, :]
    cap = lm.softcap(layer)
    if cap:
        s = cap * torch.tanh(s / cap)
    i = positions[:, None]  # (T, 1) query positions
    j = positions[None, :]  # (1, T) key positions
    seen = j <= i  # (T, T) causal
    W = lm.window(layer)
    if W is not None:
        seen = seen & (j > i - W)
    return torch.softmax(s.masked_fill(~seen, -torch.inf), dim=-1)


def _vocabulary(lm: LoadedModel) -> torch.Tensor:
    """The ids random tokens are drawn from (1-D, ascending): those the tokenizer and both embeddings have, minus
    the tokenizer's special ids."""
    tok = lm.tokenizer
    n = min(lm.model.get_input_embeddings().weight.shape[0], lm.model.get_output_embeddings().weight.shape[0])
    try:
        n = min(n, len(tok))
    except TypeError:
        pass
    ok = torch.ones(n, dtype=torch.bool)
    special = set(getattr(tok, "all_special_ids", []) or [])
    special |= {t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, lm.bos_id) if t is not None}
    for t in special:
        if 0 <= t < n:
            ok[t] = False
    return torch.nonzero(ok).flatten()


def repeated_sequences(lm: LoadedModel, n_seq: int, seq_len: int, seed: int) -> tuple[torch.Tensor, int]:
    """``n_seq`` rows ``[BOS] r_1 … r_n r_1 … r_n`` (n = seq_len), (n_seq, o + 2n) int64 on the CPU, and o (1 with
    a start token, else 0). Each row's r_i are distinct, uniform over :func:`_vocabulary`, seeded by ``seed``."""
    vocab = _vocabulary(lm)
    if seq_len < 2 or n_seq < 1:
        raise IclgdError(f"induction scores: n_seq={n_seq}, seq_len={seq_len}: expected n_seq >= 1 and seq_len >= 2 "
                         "(with one token per copy the target would be the query itself)")
    if seq_len > len(vocab):
        raise IclgdError(f"induction scores: seq_len={seq_len} exceeds the {len(vocab)} non-special tokens of "
                         f"model {lm.name} (each token occurs once per copy)")
    bos = lm.bos_id
    o = 0 if bos is None else 1
    if o + 2 * seq_len > lm.max_positions:
        raise IclgdError(f"induction scores: seq_len={seq_len} makes sequences of {o + 2 * seq_len} tokens, more "
                         f"than model {lm.name}'s {lm.max_positions} positions")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_seq):
        r = vocab[torch.randperm(len(vocab), generator=g)[:seq_len]]  # (n,) distinct
        rows.append(torch.cat([torch.tensor([bos] * o, dtype=torch.long), r, r]))
    return torch.stack(rows), o


def _embedding_maps(lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(E, P_in, P_out): the input embedding rows E (V, d_e), and OPT's projections between d_e and d_model
    (P_in (d_model, d_e), P_out (d_e, d_model), nn.Linear weights), None where the model has none."""
    E = lm.model.get_input_embeddings().weight
    mods = dict(lm.model.named_modules())
    proj = {}
    for suffix in ("project_in", "project_out"):
        m = next((m for n, m in mods.items() if n.endswith(suffix) and isinstance(m, torch.nn.Linear)), None)
        proj[suffix] = None if m is None else m.weight
    return E, proj["project_in"], proj["project_out"]


@torch.no_grad()
def embed_unembed(lm: LoadedModel) -> torch.Tensor:
    """W_E W_U as a (d_model, d_model) matrix in fp64 on the CPU: Σ_t W_E[:, t] W_U[t, :], where W_E (d_model, V)
    maps a token to the residual stream and W_U (V, d_model) the residual stream to the logits (norms ignored)."""
    E, P_in, P_out = _embedding_maps(lm)
    U = lm.model.get_output_embeddings().weight  # (V_out, d_e)
    V = min(E.shape[0], U.shape[0])
    if E.shape[1] != U.shape[1]:
        raise IclgdError(f"induction scores: model {lm.name}'s input and output embeddings have widths "
                         f"{E.shape[1]} and {U.shape[1]}, which iclgd cannot chain")
    dev = U.device
    acc = torch.promote_types(U.dtype, torch.float32)
    G = torch.zeros(E.shape[1], E.shape[1], dtype=acc, device=dev)  # (d_e, d_e)
    step = max(1, _CHUNK // E.shape[1])
    for a in range(0, V, step):
        G += E[a:a + step].to(dev, acc).T @ U[a:a + step].to(acc)  # (d_e, c) @ (c, d_e)
    G = G.double().cpu()
    if P_in is not None:
        G = P_in.double().cpu() @ G  # (d_model, d_e)
    if P_out is not None:
        G = G @ P_out.double().cpu()  # (·, d_model)
    return G


@torch.no_grad()
def copying_scores(lm: LoadedModel) -> np.ndarray:
    """(L, H) Σλ / Σ|λ| of each head's OV circuit W_U W_O^h W_V^h W_E, from the eigenvalues of the
    d_head × d_head matrix W_V^h (W_E W_U) W_O^h (see the module docstring)."""
    G = embed_unembed(lm)  # (d, d)
    A = []
    for l in range(lm.n_layers):
        p = lm.projections(l)
        H, Hkv, hd = p.n_heads, p.n_kv_heads, p.head_dim
        if G.shape[0] != p.Wv.shape[1] or G.shape[1] != p.Wo.shape[0]:
            raise IclgdError(f"induction scores: model {lm.name}'s embeddings (width {G.shape[0]}) do not meet its "
                             f"layer-{l} attention (width {p.Wv.shape[1]})")
        Wv = repeat_kv(p.Wv.detach().double().cpu().reshape(Hkv, hd, -1), H // Hkv, dim=0)  # (H, hd, d)
        Wo = p.Wo.detach().double().cpu().reshape(-1, H, hd).permute(1, 0, 2)  # (H, d, hd)
        A.append(Wv @ G @ Wo)  # (H, hd, hd)
    lam = torch.linalg.eigvals(torch.stack(A))  # (L, H, hd) complex
    total, size = lam.sum(-1).real, lam.abs().sum(-1)  # (L, H)
    return torch.where(size > 0, total / size.clamp_min(torch.finfo(size.dtype).tiny),
                       torch.zeros_like(size)).numpy()


@torch.no_grad()
def direct_logits_top1(lm: LoadedModel, layer: int, z: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor,
                       P_out: torch.Tensor | None = None, screen: int = 2048) -> torch.Tensor:
    """(H, N) bool: whether head h's direct logit contribution W_U W_O^h z_h (norms ignored) from its output
    ``z`` (N, H, d_head) ranks ``target`` (N,) first among the ``allowed`` (V,) bool tokens; a tie counts against
    the target (an all-zero head ranks nothing first). ``P_out``: OPT's project_out weight (d_e, d_model).

    In two stages, both exact: a screen of ``screen`` allowed tokens (every k-th) settles every (head, query) pair
    in which one of them already reaches the target's logit, cheaply, through each head's rank-d_head map
    W_U W_O^h; only the pairs the screen leaves open (a random head leaves ~1/screen of its queries, an induction
    head most of them) get their logits over the whole allowed vocabulary, a chunk at a time. That is what makes
    the probe cheap for Gemma's 262k tokens: the full logits of every head and query would be H·N·V numbers per
    layer. ``screen=0`` skips the screen (every pair is checked in full). The open pairs' target logit is read from
    the same product as its rivals', so an exact tie (two identical unembedding rows) stays a tie."""
    p = lm.projections(layer)
    U = lm.model.get_output_embeddings().weight  # (V, d_e)
    dev = U.device
    acc = torch.promote_types(U.dtype, torch.float32)
    N, H, hd = z.shape
    Wo = p.Wo.detach().to(dev, acc)  # (d_model, H·hd)
    if P_out is not None:
        Wo = P_out.to(dev, acc) @ Wo  # (d_e, H·hd): the heads' writes as W_U reads them
    d_e = Wo.shape[0]
    zt = z.to(dev, acc).permute(1, 0, 2).contiguous()  # (H, N, hd)
    t = target.to(dev)
    C = torch.einsum("hne,dhe->hnd", zt, Wo.reshape(d_e, H, hd))  # (H, N, d_e) each head's write to the stream
    ids = torch.nonzero(allowed).flatten().to(dev)  # (V_a,) ascending
    open_ = torch.ones(H, N, dtype=torch.bool, device=dev)  # pairs no rival has reached yet
    if screen and len(ids) > screen:
        mine = torch.einsum("hnd,nd->hn", C, U[t].to(acc))  # (H, N) the target's logit
        S = ids[:: len(ids) // screen]  # (≥ screen,) every k-th allowed token
        M = (Wo.T @ U[S].to(acc).T).reshape(H, hd, -1)  # (H, hd, |S|) each head's map to those logits
        logit = torch.bmm(zt, M)  # (H, N, |S|)
        logit.masked_fill_((S[None, :] == t[:, None])[None], -torch.inf)  # the target is not its own rival
        open_ = logit.amax(-1) < mine  # a screened rival at or above the target settles the pair
    if len(ids) == 0:
        return open_  # no token to rival the target
    h_idx, n_idx = torch.nonzero(open_, as_tuple=True)  # (P,) the open pairs
    out = torch.zeros(H, N, dtype=torch.bool, device=dev)
    if len(h_idx) == 0:
        return out
    Cp, tp = C[h_idx, n_idx], t[n_idx]  # (P, d_e), (P,)
    col = torch.searchsorted(ids, tp).clamp_max(len(ids) - 1)  # (P,) the target's column, if it is allowed
    hit = ids[col] == tp
    mine = torch.einsum("pd,pd->p", Cp, U[tp].to(acc))  # (P,) replaced below where the target is allowed
    best = torch.full((len(Cp),), -torch.inf, dtype=acc, device=dev)  # the best rival's logit
    step = max(1, _CHUNK // len(Cp))
    for a in range(0, len(ids), step):
        logit = Cp @ U[ids[a:a + step]].to(acc).T  # (P, c)
        rows = torch.nonzero(hit & (col >= a) & (col < a + logit.shape[1])).flatten()  # targets in this chunk
        mine[rows] = logit[rows, col[rows] - a]
        logit[rows, col[rows] - a] = -torch.inf  # the target is not its own rival
        best = torch.maximum(best, logit.amax(-1))
    out[h_idx, n_idx] = mine > best
    return out


PROBE_LEN = 32  # tokens per copy, unless the model was trained on shorter sequences


def probe_len(lm: LoadedModel, want: int | None = None) -> int:
    """Tokens per copy of the probe: ``want``, else 32, or, for a model that records the length of its training
    sequences (:attr:`LoadedModel.trained_len`), as many as such a sequence holds with its start token. Past
    that length a model never saw positions and the probe measures length generalisation: the world models'
    layer-3 heads score 1.0 at 12 tokens per copy (25-token training sequences), and no head reaches 0.03 at 32."""
    if want is not None:
        return want
    n = lm.trained_len
    if n is None:
        return PROBE_LEN
    return max(2, min(PROBE_LEN, (n - (0 if lm.bos_id is None else 1)) // 2))


@torch.no_grad()
def induction_scores(lm: LoadedModel, n_seq: int = 16, seq_len: int | None = None, seed: int = 0,
                     batch_size: int = 8) -> dict:
    """Prefix-matching, copying (OV eigenvalues) and empirical copying-logit scores of every head, (L, H) each, and
    the five heads with the highest prefix matching (see the module docstring for the definitions).

    Runs ``n_seq`` repeated random sequences of ``seq_len`` tokens per copy, ``batch_size`` per forward pass.
    Returns ``{"prefix_matching", "copying", "copying_logit"}`` as (L, H) float64 arrays, ``"top_heads"`` as a list
    of (layer, head, prefix_matching, copying), and the settings ``n_seq``, ``seq_len``, ``seed`` and ``bos`` (whether
    a start token led each sequence)."""
    if lm.layout is None:
        raise IclgdError(f"induction scores: model {lm.name} has no attention layout iclgd can derive")
    seq_len = probe_len(lm, seq_len)
    ids, o = repeated_sequences(lm, n_seq, seq_len, seed)  # (n_seq, T)
    T, n = ids.shape[1], seq_len
    L, (H, _, _) = lm.n_layers, lm.head_counts()
    vocab = _vocabulary(lm)
    allowed = torch.zeros(lm.model.get_output_embeddings().weight.shape[0], dtype=torch.bool)
    allowed[vocab] = True
    qpos = torch.arange(o + n, o + 2 * n)  # (n,) the second copy's positions
    kpos = torch.arange(o + 1, o + n + 1)  # (n,) each one's target: after the earlier occurrence
    P_out = _embedding_maps(lm)[2]
    prefix = torch.zeros(L, H, dtype=torch.float64)  # sums over queries of the target's probability
    top1 = torch.zeros(L, H, dtype=torch.float64)  # counts of queries whose target tops the head's direct logits
    heads: list[list[torch.Tensor]] = [[] for _ in range(L)]  # per layer, each batch's (B·n, H, hd) head outputs
    targets = []
    dev = lm.input_device
    for b in range(0, n_seq, max(1, batch_size)):
        batch = ids[b:b + max(1, batch_size)]  # (B, T)
        B = len(batch)
        with Recorder(lm, points=("attn_in", "attn_heads")) as rec:
            lm.model(input_ids=batch.to(dev), use_cache=False)
        target = batch[:, kpos].reshape(-1)  # (B·n,) the tokens an induction head copies
        for l in range(L):
            x = rec.acts[f"attn_in.{l}"]  # (B, T, d_model)
            probs = attention_probs(lm, l, x, torch.arange(T, device=x.device))  # (B, H, T, T)
            prefix[l] += probs[:, :, qpos, kpos].sum((0, 2)).double().cpu()  # (H,)
            heads[l].append(rec.acts[f"attn_heads.{l}"][:, qpos].reshape(B * n, H, -1))  # (B·n, H, hd)
        targets.append(target)
    target = torch.cat(targets)  # (n_seq·n,)
    for l in range(L):  # every sequence at once: the vocabulary products are the cost, their size the batch
        top1[l] = direct_logits_top1(lm, l, torch.cat(heads[l]), target, allowed, P_out).sum(1).double().cpu()
    prefix /= n_seq * n
    top1 /= n_seq * n
    copying = copying_scores(lm)
    pm = prefix.numpy()
    order = sorted(((l, h) for l in range(L) for h in range(H)), key=lambda lh: (-pm[lh], lh))[:5]
    return {
        "prefix_matching": pm,
        "copying": copying,
        "copying_logit": top1.numpy(),
        "top_heads": [(l, h, float(pm[l, h]), float(copying[l, h])) for l, h in order],
        "n_seq": n_seq, "seq_len": seq_len, "seed": seed, "bos": bool(o),
    }
