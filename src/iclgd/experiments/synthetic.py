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

Variants (``RegressionTransformer``): softmax instead of linear attention, and an MLP after each attention
layer. They have no exact GD construction; they are trained and measured the same way, so a user sees how
far a less idealised model is from GD and what the metrics then say.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from iclgd.core import metrics as M
from iclgd.core import options as O
from iclgd.core.errors import IclgdError
from iclgd.experiments.protocol import Experiment, Result, UnitKind, tidy_rows


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


ATTENTIONS = ("linear", "softmax")


class RegressionTransformer(nn.Module):
    """A stack of self-attention layers (optionally each followed by an MLP) over tokens e = (x, y).

    Keys and values come from the N context tokens; every token (the query too) is updated,

        e ← e + Σ_h P_h W_V^h E_ctx a_h(e),   a_h(e) = (W_K^h E_ctx)ᵀ W_Q^h e / N     (linear, "LSA")
                                             a_h(e) = softmax((W_K^h E_ctx)ᵀ W_Q^h e)   (softmax)
        e ← e + W_2 relu(W_1 e)                                                      (with mlp_hidden > 0)

    and ŷ = −(last coordinate of the query token). The linear, MLP-free case is the LSA of von Oswald
    et al., for which ``gd_construction`` gives the weights of exact GD.
    """

    def __init__(self, d: int, layers: int = 1, heads: int = 1, attention: str = "linear", mlp_hidden: int = 0,
                 init_std: float = 0.0, seed: int = 0, dtype=torch.float64):
        super().__init__()
        if attention not in ATTENTIONS:
            raise IclgdError(f"--attention {attention!r}: expected one of {', '.join(ATTENTIONS)}")
        D = d + 1
        g = torch.Generator().manual_seed(seed)
        shape = (layers, heads, D, D)
        self.WK, self.WQ, self.WV, self.P = (nn.Parameter(torch.randn(shape, generator=g, dtype=dtype) * init_std)
                                             for _ in range(4))
        self.W1 = nn.Parameter(torch.randn(layers, mlp_hidden, D, generator=g, dtype=dtype) * init_std)
        self.W2 = nn.Parameter(torch.randn(layers, D, mlp_hidden, generator=g, dtype=dtype) * init_std)
        self.d, self.attention, self.mlp_hidden = d, attention, mlp_hidden

    def forward(self, E: torch.Tensor, n_ctx: int, keep: bool = False):
        """E (B, N+1, D) -> ŷ (B,); with ``keep`` also, per layer, the query's raw (pre-softmax) scores over
        the context keys, (B, H, N) each."""
        query_scores = []
        for l in range(self.WK.shape[0]):
            C = E[:, :n_ctx]  # (B, N, D) the context tokens at this layer
            k = torch.einsum("hij,bnj->bhni", self.WK[l], C)
            v = torch.einsum("hij,bnj->bhni", self.WV[l], C)
            q = torch.einsum("hij,btj->bhti", self.WQ[l], E)
            scores = torch.einsum("bhti,bhni->bhtn", q, k)  # (B, H, T, N)
            attn = scores / n_ctx if self.attention == "linear" else scores.softmax(-1)
            upd = torch.einsum("hij,bhtj->bti", self.P[l], torch.einsum("bhtn,bhni->bhti", attn, v))
            if keep:
                query_scores.append(scores[:, :, -1])
            E = E + upd
            if self.mlp_hidden:
                E = E + torch.einsum("ij,btj->bti", self.W2[l], torch.relu(torch.einsum("ij,btj->bti", self.W1[l], E)))
        yhat = -E[:, -1, -1]
        return (yhat, query_scores) if keep else yhat

    def label_path(self) -> torch.Tensor:
        """(layers, H): −(P W_V)[y, y] per head, the weight with which a context label y_j (as carried at that
        layer) reaches the query's prediction coordinate through that head."""
        return -torch.einsum("lhij,lhj->lhi", self.P, self.WV[..., :, -1])[..., -1]

    def label_path_sign(self) -> torch.Tensor:
        """(layers, H): the sign of −(P W_V)[y, y] per head, i.e. of the weight with which a context label y_j
        reaches ŷ through that head. Linear attention is invariant under (W_K, W_V) → (−W_K, −W_V), so its
        scores are defined only up to this sign; multiplying by it makes "higher score" mean "example j's
        label pushes ŷ up" — the sense in which GD's dual form attends to example j with weight x_jᵀx_q."""
        c = self.label_path()
        return torch.where(c >= 0, 1.0, -1.0).to(c.dtype)


def gd_construction(d: int, eta: float, layers: int = 1, gamma: float = 0.0, dtype=torch.float64) -> RegressionTransformer:
    """The LSA weights that implement ``layers`` steps of GD (GD++ when gamma ≠ 0); no training."""
    m = RegressionTransformer(d, layers, 1, dtype=dtype)
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
    """Least squares on each task's context (ridge > 0: ridge regression). Without ridge the minimum-norm solution
    (pseudo-inverse), defined also when the context has fewer examples than dimensions or is singular."""
    d = t.X.shape[-1]
    if ridge == 0:
        w = (torch.linalg.pinv(t.X) @ t.y[..., None])[..., 0]  # (B, d)
    else:
        A = t.X.transpose(1, 2) @ t.X + ridge * torch.eye(d, dtype=t.X.dtype)
        w = torch.linalg.solve(A, (t.X.transpose(1, 2) @ t.y[..., None]))[..., 0]
    return torch.einsum("bd,bd->b", w, t.xq)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def line_search(loss_of, lo: float = 1e-3, hi: float = 5.0) -> float:
    from scipy.optimize import minimize_scalar

    return float(minimize_scalar(loss_of, bounds=(lo, hi), method="bounded", options={"xatol": 1e-5}).x)


@dataclass
class ModelConfig:
    """The synthetic model's architecture and its initialisation."""

    layers: int = 1
    heads: int = 1
    attention: str = "linear"
    mlp_hidden: int = 0

    @property
    def init_std(self) -> float:
        return 0.02 if self.layers == 1 else 0.05

    def build(self, d: int, seed: int, dtype=torch.float64) -> RegressionTransformer:
        return RegressionTransformer(d, self.layers, self.heads, self.attention, self.mlp_hidden, self.init_std,
                                     seed, dtype)

    def name(self) -> str:
        mlp = f" + MLP({self.mlp_hidden})" if self.mlp_hidden else ""
        return f"{self.layers} {self.attention}-attention layer(s), {self.heads} head(s){mlp}"


def train(d: int, n_ctx: int, arch: ModelConfig, steps: int, seed: int, batch: int = 256, lr: float = 1e-3,
          progress: bool = False) -> tuple[RegressionTransformer, list[float]]:
    """Adam on fresh tasks each step (seeded); float32 for speed. Starts from ``arch.build(d, seed)``."""
    from iclgd.core.progress import bar as progress_bar

    model = arch.build(d, seed, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 12345)
    losses = []
    for _ in progress_bar(range(steps), desc=f"synthetic {arch.layers}L {arch.attention}", enabled=bool(progress)):
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


def calibration(model: RegressionTransformer, t: Tasks, eta: float, steps: int = 1, tau: float = 1.0,
                seed: int = 0) -> dict:
    """The paper's four metrics on a case where the answer is known, through the LM pipeline's functions.

    ICL = the model with the context; ZSL = the query alone (no keys: ŷ = 0, the query token unchanged);
    FT = ``steps`` steps of explicit GD (learning rate ``eta``) on the equivalent linear model y = Wx, from
    W = 0, with the same examples. (GD on the model's own K/V is not possible here: with no context the
    model has no keys, so the zero-shot gradient is zero.)

    - Rec2FTP: a prediction is correct when its squared error is below ``tau``.
    - SimAOU: the "attention output" is the query token after the model, h = (x_q, −ŷ); for FT (x_q, −W_FT x_q).
    - SimAM and Kendall compare attention maps over the demonstrations. The test input here is one token,
      so the paper's map "over the test input's own tokens" would be one number per head; instead the ICL
      map is the query's raw scores over the N context tokens (per layer, per head, sign-fixed by
      ``label_path_sign``) and the FT map is the attention of GD's dual form, x_jᵀx_q (the dual form with keys x_j and
      query x_q, Eq. 3: every GD step, and hence every layer of the construction, attends with it). SimAM =
      cosine of raw maps; Kendall = τ between the softmaxed maps (heads summed first). The ZSL model has no
      map over demonstrations, so "ZSL SimAM" has no analogue; the random baselines take its place.
      ``*_raw`` repeat SimAM/Kendall without the sign fix, to show what linear attention's symmetry does.
    """
    N = t.X.shape[1]
    E = tokens(t)
    with torch.no_grad():
        y_icl, query_scores = model(E, N, keep=True)
    y_ft = gd_predict(t, eta, steps)
    h_zsl = E[:, -1].clone()
    h_zsl[:, -1] = 0.0
    h_icl = h_zsl.clone()
    h_icl[:, -1] = -y_icl
    h_ft = h_zsl.clone()
    h_ft[:, -1] = -y_ft
    A = lambda h: h.detach().numpy()[:, None, :]  # noqa: E731  (examples, 1 "layer", d+1)
    ok = lambda yh: ((yh - t.yq) ** 2 < tau).numpy()  # noqa: E731
    r2f, den = M.rec2ftp(ok(torch.zeros_like(t.yq)), ok(y_ft), ok(y_icl))

    raw = torch.stack(query_scores, 1)  # (B, L, H, N)
    fixed = raw * model.label_path_sign()[None, :, :, None]
    ft = torch.einsum("bnd,bd->bn", t.X, t.xq)[:, None, None, :].expand_as(raw)  # (B, L, H, N)
    rng = np.random.default_rng(seed)
    rand = rng.standard_normal(raw.shape)
    per_ex = lambda x: list(np.asarray(x, dtype=float))  # noqa: E731  one (L, H, N) array per example
    softmax_heads = lambda x: per_ex(M.softmax(np.asarray(x, dtype=float).sum(2)))  # noqa: E731  (L, N) each
    simam = M.simam_per_layer(per_ex(fixed), per_ex(ft))
    kendall = M.kendall_per_layer(softmax_heads(fixed), softmax_heads(ft))
    return {"simaou": float(M.simaou_per_layer(A(h_zsl), A(h_icl), A(h_ft))[0]),
            "simaou_random": float(M.simaou_gaussian_baseline(A(h_zsl), A(h_icl), seed)[0]),
            "rec2ftp": r2f, "rec2ftp_den": den,
            "simam": float(simam.mean()), "simam_per_layer": simam.tolist(),
            "simam_random": float(M.simam_per_layer(per_ex(fixed), per_ex(rand)).mean()),
            "kendall": float(kendall.mean()), "kendall_per_layer": kendall.tolist(),
            "kendall_random": float(M.kendall_random_baseline(softmax_heads(fixed), seed).mean()),
            "label_path_per_layer": model.label_path().detach().tolist(),
            "simam_raw": float(M.simam_per_layer(per_ex(raw), per_ex(ft)).mean()),
            "kendall_raw": float(M.kendall_per_layer(softmax_heads(raw), softmax_heads(ft)).mean())}


@dataclass
class SyntheticConfig:
    """One synthetic run: the regression task, the model and its training."""

    d: int = O.option(10, "input dimension of the regression tasks (>= 1)", name="--dim", check=O.min_int(1))
    n_ctx: int = O.option(20, "in-context examples per task (>= 1)", name="--n-context", check=O.min_int(1))
    layers: int = O.option(1, "number of attention layers (>= 1)", name="--n-layers", old="--layers",
                           check=O.min_int(1))
    steps: int = O.option(2000, "training steps (>= 1)", check=O.min_int(1))
    seed: int = O.option(1, "seed of the training and evaluation tasks", check=O.a_seed, cli=False)
    n_eval: int = O.option(2048, "fresh tasks of the evaluation (>= 2)", check=O.min_int(2))
    lr: float = O.option(1e-3, "Adam learning rate of the training", check=O.positive)
    attention: str = O.option("linear", "linear (LSA, has an exact GD construction) or softmax",
                              choices=("linear", "softmax"))
    heads: int = O.option(1, "attention heads per layer (>= 1)", check=O.min_int(1))
    mlp_hidden: int = O.option(0, "width of an MLP after each attention layer (0: none)", check=O.min_int(0))

    def __post_init__(self):
        O.validate(self)


@dataclass
class SyntheticJob:
    """``iclgd synthetic``: one run per seed (several: a table of means with 95% bootstrap CIs)."""

    seeds: list[int] = O.seeds_field(help="seeds of the training and evaluation tasks: one seed or a comma list of "
                                          "distinct seeds (several: a table of means with 95% bootstrap CIs)",
                                     old="--seed")
    run: SyntheticConfig = O.nested(SyntheticConfig)

    def __post_init__(self):
        O.validate(self)

    def configs(self) -> list[SyntheticConfig]:
        from dataclasses import replace

        return [replace(self.run, seed=s) for s in self.seeds]


def run(cfg: SyntheticConfig, progress: bool = True) -> dict:
    """Train the model, compare it with GD / GD++ / OLS / ridge on fresh tasks, and calibrate the metrics.

    The "construction" row of the calibration is always the exact K-layer GD construction (linear, no MLP);
    "trained" and "untrained" are the chosen architecture after training and at its initialisation.
    """
    d, n_ctx, layers, steps, seed, n_eval = cfg.d, cfg.n_ctx, cfg.layers, cfg.steps, cfg.seed, cfg.n_eval
    lr, attention, heads, mlp_hidden = cfg.lr, cfg.attention, cfg.heads, cfg.mlp_hidden
    arch = ModelConfig(layers, heads, attention, mlp_hidden)
    untrained = arch.build(d, seed)  # the trained model's own initialisation; building it validates the options
    g = torch.Generator().manual_seed(seed)
    fit = sample_tasks(n_eval, n_ctx, d, g)  # for line searches
    ev = sample_tasks(n_eval, n_ctx, d, g)  # fresh tasks for every reported number
    eta1 = line_search(lambda e: mse(gd_predict(fit, e, 1), fit.yq))
    etaK = line_search(lambda e: mse(gd_predict(fit, e, layers), fit.yq))
    from scipy.optimize import minimize

    def gdpp_loss(p):
        return mse(gd_construction(d, p[0], layers, p[1])(tokens(fit), n_ctx).detach(), fit.yq)

    pp = minimize(gdpp_loss, x0=[etaK, 0.0], method="Nelder-Mead", options={"xatol": 1e-5, "fatol": 1e-8}).x
    trained, curve = train(d, n_ctx, arch, steps, seed, lr=lr, progress=progress)
    with torch.no_grad():
        y_tr = trained(tokens(ev), n_ctx)
        y_un = untrained(tokens(ev), n_ctx)
    y_gd1, y_gdK = gd_predict(ev, eta1, 1), gd_predict(ev, etaK, layers)
    y_pp = gd_construction(d, pp[0], layers, pp[1])(tokens(ev), n_ctx).detach()
    sens_tr = sensitivity(lambda t: trained(tokens(t), n_ctx), ev)
    sens_gd = sensitivity(lambda t: gd_construction(d, etaK, layers)(tokens(t), n_ctx), ev)  # = K GD steps
    cons = gd_construction(d, etaK, layers)
    return {
        "config": {"dim": d, "n_context": n_ctx, "layers": layers, "heads": heads, "attention": attention,
                   "mlp_hidden": mlp_hidden, "steps": steps, "seed": seed, "n_eval": n_eval, "lr": lr,
                   "model": arch.name()},
        "eta_gd1": eta1, f"eta_gd{layers}": etaK, "gdpp": {"eta": float(pp[0]), "gamma": float(pp[1])},
        "loss": {"zero": mse(torch.zeros_like(ev.yq), ev.yq), "trained": mse(y_tr, ev.yq),
                 "untrained": mse(y_un, ev.yq), "gd_1step": mse(y_gd1, ev.yq),
                 f"gd_{layers}steps": mse(y_gdK, ev.yq), f"gdpp_{layers}steps": mse(y_pp, ev.yq),
                 "ols": mse(ols_predict(ev), ev.yq), "ridge_0.1": mse(ols_predict(ev, 0.1), ev.yq)},
        "trained_vs_gd": {"pred_mse": mse(y_tr, y_gdK),
                          "sensitivity_cos": float(torch.nn.functional.cosine_similarity(sens_tr, sens_gd).mean())},
        "calibration": {name: calibration(m, ev, etaK, layers, seed=seed)
                        for name, m in (("construction", cons), ("trained", trained), ("untrained", untrained))},
        "train_curve": curve,
        "ols_note": (f"n_context {n_ctx} < dim {d}: each task's least squares is underdetermined, so 'ols' is the "
                     "minimum-norm solution, not an optimal estimator; compare with ridge_0.1" if n_ctx < d else
                     "ols: ordinary least squares on each task's context"),
        "_sens": (sens_tr.detach().numpy(), sens_gd.detach().numpy()),
    }


def summarize_seeds(runs: list[dict]) -> dict:
    """Mean and 95% bootstrap CI over seeds of every calibration metric and baseline, the losses and the
    sensitivity cosine. With one seed the CI is the value itself."""
    cal = {name: {key: M.bootstrap_ci([r["calibration"][name][key] for r in runs])
                  for key in runs[0]["calibration"][name] if not key.endswith(("per_layer", "_den"))}
           for name in runs[0]["calibration"]}
    return {"seeds": [r["config"]["seed"] for r in runs], "calibration": cal,
            "loss": {k: M.bootstrap_ci([r["loss"][k] for r in runs]) for k in runs[0]["loss"]},
            "sensitivity_cos": M.bootstrap_ci([r["trained_vs_gd"]["sensitivity_cos"] for r in runs])}


class SyntheticResult(Result):
    """``iclgd synthetic``: each seed's results.json (under ``seed-S/`` with several seeds, beside summary.json).
    ``runs`` keeps the in-memory runs (with the sensitivity arrays the plots use)."""

    kind = "iclgd.synthetic"

    def __init__(self, docs, records=None, runs=None):
        super().__init__(docs, records or {})
        self.runs = runs or []
        self.per_seed = [summarize_seeds([r]) for r in self.runs]  # what each seed's calibration plot shows

    def rows(self) -> list[dict]:
        out = []
        for name, doc in self.docs.items():
            if doc.get("kind") != self.kind:
                continue
            base = {"task": "regression", "seed": doc["config"]["seed"]}
            for model, c in doc["calibration"].items():
                out += tidy_rows({k: v for k, v in c.items() if not k.endswith("per_layer")},
                                 {**base, "condition": model})
            out += tidy_rows(doc["loss"], {**base, "condition": "loss"})
        return out


def run_job(job: SyntheticJob, out=None, overwrite: bool = False, progress: bool = True) -> SyntheticResult:
    """Every seed of ``job``; written to ``out`` (refusing an earlier run's files unless ``overwrite``)."""
    from iclgd.core.models import run_versions
    from iclgd.experiments.protocol import writing

    with writing(out, "synthetic", job, overwrite):
        res = _run_job(job, progress, run_versions)
        if out is not None:
            res.write(Path(out))
    return res


def _run_job(job: SyntheticJob, progress: bool, run_versions) -> "SyntheticResult":
    runs = [run(c, progress) for c in job.configs()]
    strip = lambda r: {"kind": SyntheticResult.kind, **{k: v for k, v in r.items() if k != "_sens"},  # noqa: E731
                       "versions": run_versions()}
    if len(runs) == 1:
        docs = {"results.json": strip(runs[0])}
    else:
        summary = summarize_seeds(runs)
        config = {k: v for k, v in runs[0]["config"].items() if k != "seed"}
        docs = {**{f"seed-{r['config']['seed']}/results.json": strip(r) for r in runs},
                "summary.json": {"kind": SyntheticResult.kind + ".summary", "config": config, **summary,
                                 "versions": run_versions()}}
    return SyntheticResult(docs, runs=runs)


# ----------------------------------------------------------------------------- as sweep units (iclgd reproduce)

def synthetic_unit(p: dict, models, data_dir, progress: bool) -> dict:
    r = run(SyntheticConfig(layers=p["layers"], steps=p["steps"], seed=p["seed"]), progress)
    r.pop("_sens")
    return r


UNITS = (UnitKind("synthetic", synthetic_unit, cost=lambda p: p.get("steps", 0) / 10),)


EXPERIMENTS = (Experiment("synthetic", SyntheticJob, run_job, SyntheticResult, UNITS),)
