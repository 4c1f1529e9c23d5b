"""Momentum attention (Dai et al. 2022, Section 6), as a drop-in attention implementation.

By analogy with momentum SGD, each attention output gets an exponential moving average of the values
of strictly earlier positions, per head and before the output projection (the paper's form):

    MoAttn(V, K, q_t) = Attn(V, K, q_t) + Σ_{i=1}^{t-1} η^{t-i} v_i          (Section 6, Eq. (9))

``enable_momentum(model, eta)`` registers it through transformers' ``AttentionInterface`` (models that
call it: the families marked ``momentum`` in the adapter table), so no modeling file is copied. η is
fixed, or learnable per head (η = sigmoid(θ_h)); ``gate=True`` multiplies the EMA by a learnable per-head
gate g_h initialised at 0 (the model starts as vanilla attention). The EMA is computed by a chunked scan
(:func:`ema_before`): O(T·C·d) work, no Python loop over positions, and no negative powers of η.

``kind="ema"`` is the authors' released code variant instead (``rot-momentum`` in their model file; see
docs/paper-map.md), not Eq. (9): per value channel c (all H·d channels) an EMA of N = 8 components
with learnable decays and signed coefficients, the current position included,

    EMA_c(t) = Σ_{i≤t} k_c(t−i) v_{i,c},     k_c(l) = Σ_n γ_{c,n} N^{-1/2} p_{c,n}^l,   p = sigmoid(δ)

with δ ~ N(0, 0.2²) and γ ~ N(0, 1) at initialisation (N^{-1/2} is MEGA's scale over the components), added
to the attention output before the output projection. It is a causal convolution, computed by FFT
(:func:`ema_conv`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from iclgd.core import options
from iclgd.core.errors import IclgdError
from iclgd.core.models import momentum_families, register_momentum_restore, repeat_kv

ATTN_NAME = "iclgd_momentum"
CHUNK = 64


def _powers(log_eta: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """η^n for n ≥ 0 as exp(n log η); ``log_eta`` (H,) broadcast against ``n``."""
    return torch.exp(log_eta.reshape(-1, *([1] * n.dim())) * n)


def ema_before(v: torch.Tensor, log_eta: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """s_t = Σ_{i<t} η^{t-i} v_i for every position t.  v: (B, H, S, d); log_eta: (H,) -> (B, H, S, d).

    Positions are cut into chunks of C. For t = cC + a:
        s_t = η^a S_c + Σ_{cC ≤ i < t} η^{t-i} v_i,        S_c = Σ_{i < cC} η^{cC-i} v_i  (the carried state)
        S_{c+1} = η^C S_c + E_c,   E_c = Σ_{b<C} η^{C-b} v_{cC+b}
    so S_c = Σ_{c'<c} η^{C(c-1-c')} E_{c'}. Every exponent is ≥ 0; small powers underflow harmlessly to 0.
    """
    B, H, S, d = v.shape
    C = min(chunk, S)
    N = math.ceil(S / C)
    pad = N * C - S
    if pad:
        v = torch.cat([v, v.new_zeros(B, H, pad, d)], dim=2)
    vc = v.view(B, H, N, C, d)
    dev, dt = v.device, v.dtype
    a = torch.arange(C, device=dev, dtype=dt)
    diff = a[:, None] - a[None, :]  # (C, C): t - i inside a chunk
    strict = (diff > 0).to(dt)
    intra = _powers(log_eta, diff.clamp_min(0)) * strict  # (H, C, C): η^{a-b} for b < a
    out = torch.einsum("hac,zhncd->zhnad", intra, vc)  # within-chunk part
    w_end = _powers(log_eta, (C - a))  # (H, C): η^{C-b}
    E = torch.einsum("hc,zhncd->zhnd", w_end, vc)  # (B, H, N, d)
    cidx = torch.arange(N, device=dev, dtype=dt)
    cdiff = cidx[:, None] - cidx[None, :] - 1  # c - 1 - c'
    carry = _powers(log_eta, C * cdiff.clamp_min(0)) * (cdiff >= 0).to(dt)  # (H, N, N)
    state = torch.einsum("hnm,zhmd->zhnd", carry, E)  # S_c
    out = out + _powers(log_eta, a)[None, :, None, :, None] * state[:, :, :, None, :]
    return out.reshape(B, H, N * C, d)[:, :, :S]


def ema_kernel(log_p: torch.Tensor, gamma: torch.Tensor, S: int) -> torch.Tensor:
    """k_c(l) = Σ_n γ_{c,n} N^{-1/2} p_{c,n}^l for l = 0..S-1.  log_p, gamma: (..., N) -> (..., S)."""
    N = log_p.shape[-1]
    l = torch.arange(S, device=log_p.device, dtype=log_p.dtype)
    return torch.einsum("...n,...nl->...l", gamma * N ** -0.5, torch.exp(log_p[..., None] * l))


def ema_conv(v: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Causal convolution out_t = Σ_{i≤t} k(t−i) v_i per channel, by FFT.  v: (B, H, S, d); kernel: (H, d, S)."""
    S = v.shape[2]
    n = 2 * S  # zero padding: no wrap-around
    vf = torch.fft.rfft(v.transpose(2, 3).to(torch.float32), n=n)  # (B, H, d, n//2+1)
    kf = torch.fft.rfft(kernel.to(torch.float32), n=n)  # (H, d, n//2+1)
    return torch.fft.irfft(vf * kf, n=n)[..., :S].transpose(2, 3).to(v.dtype)


def _key_validity(attention_mask: torch.Tensor | None, S: int) -> torch.Tensor | None:
    """(B, S) 1.0 for keys a real token can see (the last query row of the mask), 0.0 for padding."""
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, -1, :S]
    if last.dtype == torch.bool:
        return last
    return last > torch.finfo(last.dtype).min / 2


def momentum_attention_forward(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """SDPA attention plus the values' EMA; same signature and output layout (B, T, H, d) as transformers'."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    B, H, Tq, d = query.shape
    Hkv, S = value.shape[1], value.shape[2]
    v = value
    valid = _key_validity(attention_mask, S)
    if valid is not None:
        v = v * valid[:, None, :, None].to(v.dtype)
    if H != Hkv:
        v = repeat_kv(v, H // Hkv, dim=1)
    delta = getattr(module, "ema_delta", None)
    if delta is not None:  # the authors' code variant: (H, d, N) learnable decays and coefficients
        kernel = ema_kernel(torch.nn.functional.logsigmoid(delta.float()), module.ema_gamma.float(), S)
        ema = ema_conv(v, kernel)[:, :, S - Tq:]
    else:  # Eq. (9)
        ema = ema_before(v, module_log_eta(module, H, v))[:, :, S - Tq:]  # queries: the last Tq of the S positions
        gate = getattr(module, "momentum_gate", None)
        if gate is not None:
            ema = ema * gate.to(ema.dtype)[None, :, None, None]
    return out + ema.transpose(1, 2).to(out.dtype), weights


def module_log_eta(module: nn.Module, H: int, like: torch.Tensor) -> torch.Tensor:
    theta = getattr(module, "momentum_theta", None)
    if theta is not None:  # learnable: η_h = sigmoid(θ_h)
        return torch.nn.functional.logsigmoid(theta).to(like.dtype)
    eta = getattr(module, "momentum_eta", None)
    if eta is None:
        raise IclgdError("momentum attention used on a module without momentum_eta; call enable_momentum(model)")
    return torch.full((H,), math.log(eta), dtype=like.dtype, device=like.device)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, momentum_attention_forward)
    # transformers builds the attention mask per implementation name: ours takes SDPA's masks
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def check_eta(eta: float) -> float:
    options.momentum_eta("--eta", eta)
    return float(eta)


KINDS = ("eq9", "ema")
EMA_COMPONENTS = 8


def enable_momentum(lm, eta: float = 0.9, learnable: bool = False, kind: str = "eq9", gate: bool = False,
                    seed: int = 0) -> None:
    """Switch every attention layer of a loaded model to momentum attention (in place).

    ``lm``: a :class:`iclgd.core.models.LoadedModel`. ``kind="eq9"``: Eq. (9); with ``learnable`` each layer
    gets a parameter θ (one per head) initialised so that sigmoid(θ) = eta, with ``gate`` a per-head gate
    initialised at 0. ``kind="ema"``: the authors' code variant (module docstring), its parameters drawn from
    a generator seeded by ``seed`` and the layer (the model's other weights and the global RNG are untouched).
    """
    if kind not in KINDS:
        raise IclgdError(f"momentum kind {kind!r}: expected one of {', '.join(KINDS)}")
    check_eta(eta)
    if not lm.layout.momentum:
        raise IclgdError(f"model type {lm.model_type!r} does not call transformers' AttentionInterface; "
                         f"momentum attention supports {', '.join(momentum_families())}")
    _register()
    H = lm.head_counts()[0]
    c = lm.model.config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    for l in range(lm.n_layers):
        attn = lm.attention(l)
        attn.momentum_eta = eta
        ref = next(attn.parameters())
        if kind == "ema":
            g = torch.Generator().manual_seed(seed * 1009 + l)
            attn.ema_delta = nn.Parameter((0.2 * torch.randn(H, d, EMA_COMPONENTS, generator=g)).to(ref))
            attn.ema_gamma = nn.Parameter(torch.randn(H, d, EMA_COMPONENTS, generator=g).to(ref))
            continue
        if learnable:
            attn.momentum_theta = nn.Parameter(torch.full((H,), math.log(eta / (1 - eta)), dtype=ref.dtype,
                                                          device=ref.device))
        if gate:
            attn.momentum_gate = nn.Parameter(torch.zeros(H, dtype=ref.dtype, device=ref.device))
    lm.model.config.momentum_eta = eta
    lm.model.config.momentum_learnable = learnable
    lm.model.config.momentum_kind = kind
    lm.model.config.momentum_gate = gate
    lm.model.set_attn_implementation(ATTN_NAME)


def restore_momentum(lm, folder) -> None:
    """A model saved with momentum attention (config.momentum_eta) gets it back at load, learned η included."""
    from pathlib import Path

    from safetensors.torch import load_file

    cfg = lm.model.config
    learnable = bool(getattr(cfg, "momentum_learnable", False))
    kind, gate = getattr(cfg, "momentum_kind", "eq9"), bool(getattr(cfg, "momentum_gate", False))
    enable_momentum(lm, cfg.momentum_eta, learnable, kind=kind, gate=gate)
    names = (("ema_delta", "ema_gamma") if kind == "ema" else
             (("momentum_theta",) if learnable else ()) + (("momentum_gate",) if gate else ()))
    if names:
        files = sorted(Path(folder).glob("*.safetensors")) if Path(str(folder)).is_dir() else []
        sd = {k: v for f in files for k, v in load_file(str(f)).items() if k.endswith(names)}
        if len(sd) != lm.n_layers * len(names):
            raise IclgdError(f"--model {lm.name}: saved with learned momentum parameters ({', '.join(names)}), "
                             "which are missing from its weights")
        lm.model.load_state_dict(sd, strict=False)


register_momentum_restore(restore_momentum)  # load_model restores a model saved with momentum attention
