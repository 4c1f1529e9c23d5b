"""The dual form between attention and gradient descent (Dai et al. 2022, Section 3), checked numerically.

Equation numbers follow arXiv:2212.10559v3 (the ACL Findings 2023 version) as we read it; where your
copy numbers differently, the formula beside each comment is what is computed.

Identity 1 (GD of a linear layer = linear attention), Eqs. (1)-(3):
    F(x) = (W0 + ΔW) x,   ΔW = Σ_i e_i ⊗ x'_i,   e_i = -γ ∂L/∂y_i
    F(x) = W0 x + Σ_i e_i (x'_iᵀ x) = W0 x + LinearAttn(V=E, K=X', q=x)

Identity 2 (ICL = implicit finetuning), Eqs. (4)-(7), with softmax and the 1/√d scale dropped:
    F_ICL(q) ≈ W_V[X';X] (W_K[X';X])ᵀ q = W_V X (W_K X)ᵀ q + W_V X' (W_K X')ᵀ q = (W_ZSL + ΔW_ICL) q
    W_ZSL = W_V X (W_K X)ᵀ,   ΔW_ICL = Σ_i (W_V x'_i) ⊗ (W_K x'_i)

The exact form on real layers. With biases, W x becomes W x + b = W̃ [x; 1], so the identity holds
for the augmented inputs. With rotary position embeddings the key of token i is R_{p_i}(W_K x_i + b_K):
the key map depends on the position, and the identity holds with those rotated keys,
ΔW_ICL = Σ_i v_i ⊗ R_{p_i} k̃_i, in each head's (value × key) space. With grouped KV heads, a query
head h uses the key/value head h // (H / H_kv). This module verifies that form, per layer and head.

Finetuning of K/V, Eq. (8):  (W_V + ΔW_V) X Xᵀ (W_K + ΔW_K)ᵀ q = (W_ZSL + ΔW_FT) q.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from iclgd.core.errors import IclgdError
from iclgd.core.hooks import Recorder
from iclgd.core.models import LoadedModel, qkv, repeat_kv

# ----------------------------------------------------------------------------- identity 1


def linear_attention(V: torch.Tensor, K: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """LinearAttn(V, K, q) = Σ_i v_i (k_iᵀ q).  V: (n, d_v), K: (n, d_k), q: (..., d_k) -> (..., d_v)."""
    return (q @ K.T) @ V


def _loss(y: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "mse":
        return 0.5 * ((y - target) ** 2).sum(-1).mean()
    if loss == "ce":
        return F.cross_entropy(y, target)
    raise IclgdError(f"loss {loss!r}: expected 'mse' or 'ce'")


@dataclass
class GDRun:
    W: torch.Tensor  # weights after SGD, computed by autograd on W and torch.optim.SGD
    E: torch.Tensor  # (n_seen, d_out) the e_i = -lr ∂L/∂y_i of every example at every step
    K: torch.Tensor  # (n_seen, d_in) the x'_i they were computed at


def sgd_linear(W0: torch.Tensor, X: torch.Tensor, targets: torch.Tensor, lr: float, steps: int = 1,
               batch_size: int | None = None, loss: str = "mse") -> GDRun:
    """Train F(x) = W x by SGD (mean loss per batch) and record the dual-form pairs independently.

    The weights are trained with torch.optim.SGD on W. The values e_i are obtained separately by
    differentiating the loss w.r.t. the outputs y_i at the weights the dual form itself implies
    (W0 + Σ of earlier outer products), so the two routes share no update arithmetic.
    """
    n = X.shape[0]
    bs = batch_size or n
    W = torch.nn.Parameter(W0.clone())
    opt = torch.optim.SGD([W], lr=lr)
    Es, Ks = [], []
    W_dual = W0.clone()
    for step in range(steps):
        for b in range(0, n, bs):
            xb, tb = X[b: b + bs], targets[b: b + bs]
            opt.zero_grad()
            _loss(xb @ W.T, tb, loss).backward()
            opt.step()
            y = (xb @ W_dual.T).detach().requires_grad_(True)
            (g,) = torch.autograd.grad(_loss(y, tb, loss), y)
            e = -lr * g  # Eq. (2): e_i = -γ ∂L/∂y_i
            Es.append(e), Ks.append(xb)
            W_dual = W_dual + e.T @ xb  # Σ_i e_i ⊗ x'_i
    return GDRun(W.detach(), torch.cat(Es), torch.cat(Ks))


def gd_dual_forward(W0: torch.Tensor, run: GDRun, x: torch.Tensor) -> torch.Tensor:
    """Eq. (3): F(x) = W0 x + LinearAttn(E, X', x)."""
    return x @ W0.T + linear_attention(run.E, run.K, x)


# ----------------------------------------------------------------------------- identity 2


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Standard (rotate-half) rotary embedding; x: (..., T, d), cos/sin: (T, d)."""
    return x * cos + rotate_half(x) * sin


@dataclass
class HeadKV:
    """One attention layer's keys, values and queries per head, as the layer computes them.

    k, v: (H_kv, T, d_head) after bias and rotary; q: (H, d_head) at the prediction position,
    after bias and rotary, *without* the 1/√d scale. In a sliding-window layer k and v hold only the
    positions ``start`` … T − 1 that the prediction position sees; ``softcap``: Gemma-2's logit cap.
    """

    k: torch.Tensor
    v: torch.Tensor
    q: torch.Tensor
    scale: float
    start: int = 0
    softcap: float | None = None
    bias: torch.Tensor | None = None  # (H, T) ALiBi's per-key score bias (BLOOM): in the softmax, not in Eq. (5)

    @property
    def group(self) -> int:
        return self.q.shape[0] // self.k.shape[0]


def dual_matrices(kv: HeadKV, is_demo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. (6)-(7) per query head: W_ZSL = Σ_{i∈X} v_i k_iᵀ, ΔW_ICL = Σ_{i∈X'} v_i k_iᵀ, each (H, d, d).

    ``is_demo`` (T,) marks X', the demonstration tokens (with their separators); the rest is X, what a
    zero-shot prompt also sees (BOS and the test input).
    """
    k, v = repeat_kv(kv.k, kv.group, dim=0), repeat_kv(kv.v, kv.group, dim=0)
    d = is_demo[kv.start:].to(k.device)  # a sliding window sees only the last positions
    W_zsl = torch.einsum("htd,hte->hde", v[:, ~d], k[:, ~d])
    dW_icl = torch.einsum("htd,hte->hde", v[:, d], k[:, d])
    return W_zsl, dW_icl


def demo_mask(T: int, demo_span: tuple[int, int]) -> torch.Tensor:
    m = torch.zeros(T, dtype=torch.bool)
    m[demo_span[0]: demo_span[1]] = True
    return m


def relaxed_attention(kv: HeadKV) -> torch.Tensor:
    """Eq. (5) without softmax and scale: Σ_i v_i (k_iᵀ q) over all positions, per head: (H, d)."""
    k, v = repeat_kv(kv.k, kv.group, dim=0), repeat_kv(kv.v, kv.group, dim=0)
    scores = torch.einsum("hd,htd->ht", kv.q, k)
    return torch.einsum("ht,htd->hd", scores, v)


def softmax_attention(kv: HeadKV) -> torch.Tensor:
    """The true attention at the prediction position (the last one, which sees every token): (H, d)."""
    k, v = repeat_kv(kv.k, kv.group, dim=0), repeat_kv(kv.v, kv.group, dim=0)
    scores = torch.einsum("hd,htd->ht", kv.q, k) * kv.scale
    if kv.bias is not None:  # ALiBi: the softmax sees slope_h · j beside q·k (the relaxed Eq. 5 has no such term)
        scores = scores + kv.bias.to(scores)
    if kv.softcap:
        scores = kv.softcap * torch.tanh(scores / kv.softcap)
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("ht,htd->hd", probs, v)


def rel_err(a: torch.Tensor, b: torch.Tensor, dim=-1) -> torch.Tensor:
    return (a - b).norm(dim=dim) / b.norm(dim=dim).clamp_min(torch.finfo(b.dtype).tiny)


# ----------------------------------------------------------------------------- real models


def project_heads(lm: LoadedModel, layer: int, x: torch.Tensor, position_ids: torch.Tensor) -> HeadKV:
    """Keys/values of every position the last one sees (all, or its sliding window) and the query of the last
    one, from the attention's input ``x`` (T, d)."""
    q, k, v, scale = qkv(lm, layer, x, position_ids)
    W = lm.window(layer)
    start = max(0, x.shape[0] - W) if W else 0
    return HeadKV(k[:, start:], v[:, start:], q[:, -1], scale, start, lm.softcap(layer),
                  lm.key_bias(layer, torch.arange(start, x.shape[0], device=x.device)))


def capture_layer_io(lm: LoadedModel, input_ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One forward pass; per layer the attention input (after its norm) and the per-head attention
    output before the output projection (the true softmax attention). Shapes (T, d_model), (T, H·d_head).

    Hook points ``attn_in`` and ``attn_heads`` (:mod:`iclgd.core.hooks`).
    """
    dev = lm.input_device
    with torch.no_grad(), Recorder(lm, points=("attn_in", "attn_heads")) as rec:
        lm.model(input_ids=torch.tensor([input_ids], device=dev))
    return ([rec.acts[f"attn_in.{i}"][0] for i in range(lm.n_layers)],
            [rec.acts[f"attn_heads.{i}"][0] for i in range(lm.n_layers)])


@torch.no_grad()
def verify_layers(lm: LoadedModel, input_ids: list[int], demo_span: tuple[int, int],
                  layers: list[int] | None = None) -> list[dict]:
    """Per layer and head: the identity (6)-(7) error, ‖ΔW_ICL‖/‖W_ZSL‖, and the softmax gap.

    - identity_rel_err: ‖relaxed attention − (W_ZSL + ΔW_ICL) q‖ / ‖relaxed attention‖
    - recon_rel_err: ‖softmax attention from our q/k/v − the model's own per-head output‖ / ‖·‖ (ties our
      projections, biases and rotary to what the model computes)
    - softmax_rel_err / softmax_cos: true softmax output vs its relaxed form (how far the model is from the theory)
    """
    xs, heads = capture_layer_io(lm, input_ids)
    T = len(input_ids)
    pos = torch.arange(T, device=xs[0].device)
    rows = []
    for layer in layers if layers is not None else range(lm.n_layers):
        kv = project_heads(lm, layer, xs[layer], pos)
        H, hd = kv.q.shape
        W_zsl, dW = dual_matrices(kv, demo_mask(T, demo_span))
        relaxed = relaxed_attention(kv)
        dual = torch.einsum("hde,he->hd", W_zsl + dW, kv.q)
        true = heads[layer][-1].view(H, hd).to(kv.q.dtype)
        mine = softmax_attention(kv)
        ident = rel_err(dual, relaxed)
        recon = rel_err(mine, true)
        ratio = dW.flatten(1).norm(dim=1) / W_zsl.flatten(1).norm(dim=1)
        gap = rel_err(relaxed, true)
        cos = F.cosine_similarity(relaxed, true, dim=-1)
        for h in range(H):
            rows.append({"layer": layer, "head": h, "identity_rel_err": ident[h].item(),
                         "recon_rel_err": recon[h].item(), "dW_over_WZSL": ratio[h].item(),
                         "softmax_rel_err": gap[h].item(), "softmax_cos": cos[h].item()})
    return rows


def per_layer(rows: list[dict]) -> list[dict]:
    import pandas as pd

    df = pd.DataFrame(rows)
    g = df.groupby("layer")
    return pd.DataFrame({
        "layer": g.size().index,
        "identity_max": g.identity_rel_err.max().values,
        "recon_max": g.recon_rel_err.max().values,
        "dW/WZSL": g.dW_over_WZSL.median().values,
        "softmax_relerr": g.softmax_rel_err.median().values,
        "softmax_cos": g.softmax_cos.median().values,
    }).to_dict("records")


# ----------------------------------------------------------------------------- ΔW_ICL vs ΔW_FT


def _cos_nan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the last axis in float64; NaN where either side is zero (an update that did not happen)."""
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    c = (a * b).sum(-1) / (na * nb)
    return torch.where((na == 0) | (nb == 0), torch.full_like(c, float("nan")), c)


def update_stats(dW_icl: torch.Tensor, dW_ft: torch.Tensor, q: torch.Tensor,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """ΔW_ICL (Eq. 7) against ΔW_FT (Eq. 8) per query head, each a (..., H, d, d) or per-KV-head (..., H_kv, d, d)
    matrix (expanded to the H query heads of ``q``, (..., H, d)); leading dimensions (e.g. the layers) are batched:
    every figure is (..., H).

    - cos_dW: cosine of the flattened matrices; norm_ratio_ft_over_icl: ‖ΔW_FT‖_F / ‖ΔW_ICL‖_F;
    - cos_effect_on_q: cosine of their effects ΔW q on the query;
    - with a ``generator``, the random-update baseline: R with i.i.d. N(0, 1) entries in ΔW_FT's place
      (cos_dW_random, cos_effect_random; ≈ 0 for any ΔW_ICL), each cosine drawn from its exact distribution
      (:func:`random_cos`) in one call for all leading dimensions, independently of the other.
    Cosines are NaN where ΔW_FT is zero (a finetuning that changed nothing has no direction).
    """
    H, Hkv = q.shape[-2], max(dW_icl.shape[-3], dW_ft.shape[-3])
    G = H // Hkv  # query heads per KV matrix (grouped KV): query head h reads KV matrix h // G
    # (..., H_kv, d, d): each figure is computed once per KV matrix, then given to its query heads
    dW_icl = repeat_kv(dW_icl.double(), Hkv // dW_icl.shape[-3], dim=-3)
    dW_ft = repeat_kv(dW_ft.double(), Hkv // dW_ft.shape[-3], dim=-3)
    q = q.double().unflatten(-2, (Hkv, G))  # (..., H_kv, G, d)

    def per_query_head(x: torch.Tensor) -> torch.Tensor:  # (..., H_kv) -> (..., H)
        return repeat_kv(x, G, dim=-1)

    eff_icl = torch.einsum("...kde,...kge->...kgd", dW_icl, q).flatten(-3, -2)  # (..., H, d)
    out = {
        "cos_dW": per_query_head(_cos_nan(dW_ft.flatten(-2), dW_icl.flatten(-2))),
        "norm_ratio_ft_over_icl": per_query_head(dW_ft.flatten(-2).norm(dim=-1) / dW_icl.flatten(-2).norm(dim=-1)),
        "cos_effect_on_q": _cos_nan(torch.einsum("...kde,...kge->...kgd", dW_ft, q).flatten(-3, -2), eff_icl),
    }
    if generator is not None:
        u = torch.rand(eff_icl.shape[:-1] + (2,), generator=generator, dtype=torch.float64)  # (..., H, 2)
        icl_defined = per_query_head(dW_icl.flatten(-2).norm(dim=-1) > 0)
        out["cos_dW_random"] = random_cos(u[..., 0], dW_icl.shape[-1] ** 2, icl_defined)
        # R q ~ N(0, ‖q‖² I_d) is isotropic as well
        out["cos_effect_random"] = random_cos(u[..., 1], eff_icl.shape[-1], eff_icl.norm(dim=-1) > 0)
    return out


def random_cos(u: torch.Tensor, D: int, defined: torch.Tensor | None = None) -> torch.Tensor:
    """cos(R, a) for R ∈ R^D with i.i.d. N(0, 1) entries and a fixed a ≠ 0, drawn exactly without drawing R: R is
    isotropic, so the cosine is the first coordinate of a uniform point on the sphere S^(D−1), and (1 + cos)/2 is
    Beta((D−1)/2, (D−1)/2), taken here by its inverse CDF at the uniforms ``u``. NaN where ``defined`` is False
    (a = 0: no direction). (Drawing R's H·d² entries per example and layer was most of the ΔW statistics' time.)"""
    from scipy.special import betaincinv

    uu = u.double().cpu().numpy()
    c = np.sign(uu - 0.5) if D == 1 else 2 * betaincinv((D - 1) / 2, (D - 1) / 2, uu) - 1
    c = torch.as_tensor(c, dtype=torch.float64).reshape(u.shape)
    return c if defined is None else torch.where(defined, c, torch.full_like(c, float("nan")))


def kv_outer(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_t v_t k_tᵀ per KV head in float64: keys and values (..., H_kv, T, d_head) -> (..., H_kv, d_head, d_head)."""
    return torch.einsum("...htd,...hte->...hde", v.double(), k.double())


def kv_matrices(lm: LoadedModel, input_ids: list[int], span: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Per layer Σ_i v_i k_iᵀ per KV head, (H_kv, d, d), over the tokens of ``span`` [start, end) (all tokens
    when None) of one forward pass of ``input_ids``: W_ZSL (Eq. 6) of a ZSL prompt, or ΔW_ICL (Eq. 7) of an
    ICL prefix with ``span`` its demonstrations. Computed with the model's current weights. (``iclgd compare`` takes
    the same sums from the keys and values its scoring passes capture; this one pass is their reference.)"""
    xs, _ = capture_layer_io(lm, input_ids)
    pos = torch.arange(len(input_ids))
    a, b = span if span is not None else (0, len(input_ids))
    out = []
    with torch.no_grad():
        for layer in range(lm.n_layers):
            _, k, v, _ = qkv(lm, layer, xs[layer], pos.to(xs[layer].device))
            out.append(kv_outer(k[:, a:b], v[:, a:b]).cpu())
    return out


@torch.no_grad()
def compare_updates(before: LoadedModel, after: LoadedModel, input_ids: list[int], demo_span: tuple[int, int]
                    ) -> list[dict]:
    """ΔW_FT = W_ZSL(after) − W_ZSL(before) on the query tokens vs ΔW_ICL of the model before FT.

    Per layer and head: cosine of the flattened matrices, ‖ΔW_FT‖/‖ΔW_ICL‖, and the cosine of their
    effects on the (before-FT) query, ΔW q (:func:`update_stats`). ``input_ids`` is the ICL prompt,
    ``demo_span`` the [start, end) of its demonstrations; the ZSL prompt is the same without them.
    """
    a, b = demo_span
    q_ids = input_ids[:a] + input_ids[b:]
    xb_icl, _ = capture_layer_io(before, input_ids)
    xb, _ = capture_layer_io(before, q_ids)
    xa, _ = capture_layer_io(after, q_ids)
    pos_icl = torch.arange(len(input_ids))
    pos_q = torch.arange(len(q_ids))
    rows = []
    for layer in range(before.n_layers):
        kv_icl = project_heads(before, layer, xb_icl[layer], pos_icl)
        _, dW_icl = dual_matrices(kv_icl, demo_mask(len(input_ids), demo_span))
        kv_b = project_heads(before, layer, xb[layer], pos_q)
        kv_a = project_heads(after, layer, xa[layer], pos_q)
        none = torch.zeros(len(q_ids), dtype=torch.bool)
        W_b, _ = dual_matrices(kv_b, none)
        W_a, _ = dual_matrices(kv_a, none)
        st = update_stats(dW_icl, W_a - W_b, kv_icl.q)
        for h in range(kv_icl.q.shape[0]):
            rows.append({"layer": layer, "head": h, **{k: v[h].item() for k, v in st.items()}})
    return rows


def summarize(rows: list[dict], table: list[dict]) -> dict:
    """One verify run in numbers: worst identity and reconstruction errors over layers and heads, and
    the medians over layers (of the per-layer medians over heads) of the softmax gap and ‖ΔW‖ ratio."""
    return {"identity_max": max(r["identity_rel_err"] for r in rows),
            "recon_max": max(r["recon_rel_err"] for r in rows),
            "median_softmax_cos": float(np.median([r["softmax_cos"] for r in table])),
            "median_softmax_relerr": float(np.median([r["softmax_relerr"] for r in table])),
            "median_dW_ratio": float(np.median([r["dW/WZSL"] for r in table]))}
