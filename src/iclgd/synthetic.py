"""Synthetic testbed: in-context linear regression, where ICL provably can be gradient descent
(von Oswald et al., ICML 2023).

Task: w ~ N(0, I_d); context tokens e_j = (x_j, y_j), x_j ~ U(-1, 1)^d, y_j = wᵀx_j (+ noise); a query
token e_q = (x_q, 0). A linear self-attention (LSA) layer updates every token with keys and values over
the N context tokens,

    e ← e + (1/N) Σ_h P_h W_V^h E_ctx (W_K^h E_ctx)ᵀ W_Q^h e,

and the prediction is ŷ = −(last coordinate of the query token). With W_K = W_Q = [[I, 0], [0, 0]],
P = I and W_V = [[−γI, 0], [0, −η]] one layer is one GD step, with learning rate η from W0 = 0, on the
in-context loss L(W) = 1/(2N) Σ_j ‖W x_j − y_j‖² (the y coordinates carry the residuals y_j − W x_j; the
query's carries −W x_q). K such layers are K GD steps; γ ≠ 0 gives GD++ (x ← (I − γ XXᵀ/N) x each step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from iclgd import metrics as M
from iclgd.errors import IclgdError


@dataclass
class Tasks:
    X: torch.Tensor  # (B, N, d) context inputs
    y: torch.Tensor  # (B, N) context targets
    xq: torch.Tensor  # (B, d)
    yq: torch.Tensor  # (B,)
    w: torch.Tensor  # (B, d)


def sample_tasks(B: int, N: int, d: int, g: torch.Generator, noise: float = 0.0, dtype=torch.float64) -> Tasks:
    w = torch.randn(B, d, generator=g, dtype=dtype)
    X = torch.rand(B, N + 1, d, generator=g, dtype=dtype) * 2 - 1
    y = torch.einsum("bnd,bd->bn", X, w) + noise * torch.randn(B, N + 1, generator=g, dtype=dtype)
    return Tasks(X[:, :N], y[:, :N], X[:, N], y[:, N], w)


def tokens(t: Tasks) -> torch.Tensor:
    """(B, N+1, d+1): context tokens (x_j, y_j), then the query token (x_q, 0)."""
    ctx = torch.cat([t.X, t.y[..., None]], dim=-1)
    q = torch.cat([t.xq, torch.zeros_like(t.yq)[:, None]], dim=-1)
    return torch.cat([ctx, q[:, None]], dim=1)


class LSA(nn.Module):
    """A stack of linear self-attention layers (no softmax, no MLP), keys/values over context tokens."""

    def __init__(self, d: int, layers: int = 1, heads: int = 1, init_std: float = 0.0, seed: int = 0,
                 dtype=torch.float64):
        super().__init__()
        D = d + 1
        g = torch.Generator().manual_seed(seed)
        shape = (layers, heads, D, D)
        self.WK, self.WQ, self.WV, self.P = (nn.Parameter(torch.randn(shape, generator=g, dtype=dtype) * init_std)
                                             for _ in range(4))
        self.d = d

    def forward(self, E: torch.Tensor, n_ctx: int, keep: bool = False):
        """Returns ŷ (B,) and, with ``keep``, per layer the attention output at the query (B, D)."""
        outs = []
        for l in range(self.WK.shape[0]):
            C = E[:, :n_ctx]
            k = torch.einsum("hij,bnj->bhni", self.WK[l], C)
            v = torch.einsum("hij,bnj->bhni", self.WV[l], C)
            q = torch.einsum("hij,btj->bhti", self.WQ[l], E)
            scores = torch.einsum("bhti,bhni->bhtn", q, k) / n_ctx
            upd = torch.einsum("hij,bhtj->bti", self.P[l], torch.einsum("bhtn,bhni->bhti", scores, v))
            if keep:
                outs.append(upd[:, -1])
            E = E + upd
        yhat = -E[:, -1, -1]
        return (yhat, outs) if keep else yhat


def gd_construction(d: int, eta: float, layers: int = 1, gamma: float = 0.0, dtype=torch.float64) -> LSA:
    """The LSA weights that implement ``layers`` steps of GD (GD++ when gamma ≠ 0); no training."""
    m = LSA(d, layers, 1, dtype=dtype)
    D = d + 1
    sel = torch.zeros(D, D, dtype=dtype)
    sel[:d, :d] = torch.eye(d, dtype=dtype)
    WV = torch.zeros(D, D, dtype=dtype)
    WV[:d, :d] = -gamma * torch.eye(d, dtype=dtype)
    WV[d, d] = -eta
    with torch.no_grad():
        m.WK[:] = sel
        m.WQ[:] = sel
        m.WV[:] = WV
        m.P[:] = torch.eye(D, dtype=dtype)
    return m


def gd_predict(t: Tasks, eta: float, steps: int = 1) -> torch.Tensor:
    """Explicit GD on W (autograd on the in-context least-squares loss), from W0 = 0; ŷ = W x_q."""
    B, N, d = t.X.shape
    W = torch.zeros(B, d, dtype=t.X.dtype, requires_grad=True)
    for _ in range(steps):
        loss = 0.5 * ((torch.einsum("bnd,bd->bn", t.X, W) - t.y) ** 2).mean(1).sum()
        (g,) = torch.autograd.grad(loss, W)
        W = (W - eta * g).detach().requires_grad_(True)
    return torch.einsum("bd,bd->b", W.detach(), t.xq)


def ols_predict(t: Tasks, ridge: float = 0.0) -> torch.Tensor:
    d = t.X.shape[-1]
    A = t.X.transpose(1, 2) @ t.X + ridge * torch.eye(d, dtype=t.X.dtype)
    w = torch.linalg.solve(A, (t.X.transpose(1, 2) @ t.y[..., None]))[..., 0]
    return torch.einsum("bd,bd->b", w, t.xq)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def line_search(loss_of, lo: float = 1e-3, hi: float = 5.0) -> float:
    from scipy.optimize import minimize_scalar

    return float(minimize_scalar(loss_of, bounds=(lo, hi), method="bounded", options={"xatol": 1e-5}).x)


def train_lsa(d: int, n_ctx: int, layers: int, steps: int, seed: int, batch: int = 256, lr: float = 1e-3,
              progress: bool = False) -> tuple[LSA, list[float]]:
    """Adam on fresh tasks each step (seeded); float32 for speed."""
    from tqdm.auto import tqdm

    model = LSA(d, layers, 1, init_std=0.02 if layers == 1 else 0.05, seed=seed, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 12345)
    losses = []
    for _ in tqdm(range(steps), desc=f"LSA {layers}L", disable=not progress):
        t = sample_tasks(batch, n_ctx, d, g, dtype=torch.float32)
        loss = 0.5 * ((model(tokens(t), n_ctx) - t.yq) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.double(), losses


def sensitivity(predict, t: Tasks) -> torch.Tensor:
    """∂ŷ/∂x_q per task (B, d) — the alignment measure of von Oswald et al."""
    xq = t.xq.clone().requires_grad_(True)
    t2 = Tasks(t.X, t.y, xq, t.yq, t.w)
    (g,) = torch.autograd.grad(predict(t2).sum(), xq)
    return g


def calibration(model: LSA, t: Tasks, eta: float, tau: float = 1.0) -> dict:
    """The paper's SimAOU and Rec2FTP on a case where the answer is known.

    ICL = the model with the context; ZSL = the query alone (ŷ = 0, the query token unchanged);
    FT = explicit GD (learning rate eta, one step) on the equivalent linear model with the same
    examples. The "attention output" compared is the query token after the model, h = (x_q', −ŷ):
    for FT, (x_q, −W_FT x_q). A prediction is correct when its squared error is below ``tau``.
    """
    N = t.X.shape[1]
    E = tokens(t)
    with torch.no_grad():
        y_icl, _ = model(E, N, keep=True)
    y_ft = gd_predict(t, eta, 1)
    h_zsl = E[:, -1].clone()
    h_zsl[:, -1] = 0.0
    h_icl = h_zsl.clone()
    h_icl[:, -1] = -y_icl
    h_ft = h_zsl.clone()
    h_ft[:, -1] = -y_ft
    A = lambda h: h.detach().numpy()[:, None, :]  # noqa: E731  (examples, 1 "layer", d+1)
    ok = lambda yh: ((yh - t.yq) ** 2 < tau).numpy()  # noqa: E731
    r2f, den = M.rec2ftp(ok(torch.zeros_like(t.yq)), ok(y_ft), ok(y_icl))
    return {"simaou": float(M.simaou_per_layer(A(h_zsl), A(h_icl), A(h_ft))[0]),
            "simaou_random": float(M.simaou_gaussian_baseline(A(h_zsl), A(h_icl))[0]),
            "rec2ftp": r2f, "rec2ftp_den": den}


def run(d: int = 10, n_ctx: int = 20, layers: int = 1, steps: int = 2000, seed: int = 1, n_eval: int = 2048,
        progress: bool = True, lr: float = 1e-3) -> dict:
    """Train LSA, compare with GD / GD++ / OLS / ridge on fresh tasks, and calibrate the metrics."""
    if d < 1 or n_ctx < 1 or layers < 1 or steps < 0:
        raise IclgdError("--dim, --n-context, --layers must be ≥ 1 and --steps ≥ 0")
    g = torch.Generator().manual_seed(seed)
    fit = sample_tasks(n_eval, n_ctx, d, g)  # for line searches
    ev = sample_tasks(n_eval, n_ctx, d, g)  # fresh tasks for every reported number
    eta1 = line_search(lambda e: mse(gd_predict(fit, e, 1), fit.yq))
    etaK = line_search(lambda e: mse(gd_predict(fit, e, layers), fit.yq))
    from scipy.optimize import minimize

    def gdpp_loss(p):
        return mse(gd_construction(d, p[0], layers, p[1])(tokens(fit), n_ctx).detach(), fit.yq)

    pp = minimize(gdpp_loss, x0=[etaK, 0.0], method="Nelder-Mead", options={"xatol": 1e-5, "fatol": 1e-8}).x
    trained, curve = train_lsa(d, n_ctx, layers, steps, seed, lr=lr, progress=progress)
    untrained = LSA(d, layers, 1, init_std=0.02 if layers == 1 else 0.05, seed=seed)
    with torch.no_grad():
        y_tr = trained(tokens(ev), n_ctx)
        y_un = untrained(tokens(ev), n_ctx)
    y_gd1, y_gdK = gd_predict(ev, eta1, 1), gd_predict(ev, etaK, layers)
    y_pp = gd_construction(d, pp[0], layers, pp[1])(tokens(ev), n_ctx).detach()
    sens_tr = sensitivity(lambda t: trained(tokens(t), n_ctx), ev)
    sens_gd = sensitivity(lambda t: gd_construction(d, etaK, layers)(tokens(t), n_ctx), ev)  # = K GD steps
    cons = gd_construction(d, eta1, 1)
    return {
        "config": {"dim": d, "n_context": n_ctx, "layers": layers, "steps": steps, "seed": seed, "n_eval": n_eval,
                   "lr": lr},
        "eta_gd1": eta1, f"eta_gd{layers}": etaK, "gdpp": {"eta": float(pp[0]), "gamma": float(pp[1])},
        "loss": {"zero": mse(torch.zeros_like(ev.yq), ev.yq), "trained_lsa": mse(y_tr, ev.yq),
                 "untrained_lsa": mse(y_un, ev.yq), "gd_1step": mse(y_gd1, ev.yq),
                 f"gd_{layers}steps": mse(y_gdK, ev.yq), f"gdpp_{layers}steps": mse(y_pp, ev.yq),
                 "ols": mse(ols_predict(ev), ev.yq), "ridge_0.1": mse(ols_predict(ev, 0.1), ev.yq)},
        "trained_vs_gd": {"pred_mse": mse(y_tr, y_gdK),
                          "sensitivity_cos": float(torch.nn.functional.cosine_similarity(sens_tr, sens_gd).mean())},
        "calibration": {"construction": calibration(cons, ev, eta1), "trained": calibration(trained, ev, eta1),
                        "untrained": calibration(untrained, ev, eta1)},
        "train_curve": curve,
        "_sens": (sens_tr.detach().numpy(), sens_gd.detach().numpy()),
    }


def write_outputs(r: dict, out) -> None:
    """results.json and two PNGs: training loss vs the GD losses; trained vs GD sensitivities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from iclgd.io import atomic_write_json, ensure_dir, library_versions

    out = ensure_dir(out)
    atomic_write_json(out / "results.json", {**{k: v for k, v in r.items() if k not in ("_sens",)},
                                             "versions": library_versions()})
    L = r["config"]["layers"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    c = np.asarray(r["train_curve"])
    w = max(1, len(c) // 50)
    ax.plot(np.convolve(c, np.ones(w) / w, mode="valid"), label="trained LSA (train loss, smoothed)")
    for key, style in (("gd_1step", "--"), (f"gd_{L}steps", ":"), (f"gdpp_{L}steps", "-.")):
        ax.axhline(r["loss"][key] / 2, ls=style, color="k", lw=0.8, label=f"{key} (eval)")
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_ylabel("½ squared error")
    ax.set_title(f"in-context linear regression, {L} layer(s)", fontsize=9), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    s_tr, s_gd = r["_sens"]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(s_gd.flatten()[:4000], s_tr.flatten()[:4000], s=2, alpha=0.4)
    lim = float(np.abs(s_gd).max())
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.7)
    ax.set_xlabel("∂ŷ/∂x_q, GD"), ax.set_ylabel("∂ŷ/∂x_q, trained LSA")
    ax.set_title(f"sensitivities, cos {r['trained_vs_gd']['sensitivity_cos']:.4f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "sensitivities.png", dpi=110)
    plt.close(fig)
