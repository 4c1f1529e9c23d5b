"""The paper's four metrics and their baselines, as pure functions on arrays (no model in sight).

Sources: Dai et al. (2022) Section 5 and the official code (microsoft/LMOps ``understand_icl``), as
summarised in ``docs/paper-map.md``; SimAM_Δ and the layer-causal/untrained controls from Deutch
et al. (NAACL 2024). The same functions serve the language-model pipeline, the synthetic testbed and
the tests' hand-built cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats


def _unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.where(n == 0, 1.0, n)


def cosine(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Cosine similarity along ``axis`` (0 where a vector is zero)."""
    return np.sum(_unit(a, axis) * _unit(b, axis), axis=axis)


def cosine_or_nan(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Cosine similarity along ``axis``, NaN (undefined) where either vector is zero: an update that did
    not happen has no direction, so it is neither similar nor orthogonal to another."""
    zero = (np.linalg.norm(a, axis=axis) == 0) | (np.linalg.norm(b, axis=axis) == 0)
    return np.where(zero, np.nan, cosine(a, b, axis))


def mean_defined(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean over ``axis`` of the non-NaN values, how many there were); the mean is NaN where there are none."""
    x = np.asarray(x, dtype=float)
    ok = ~np.isnan(x)
    n = ok.sum(axis=axis)
    total = np.where(ok, x, 0.0).sum(axis=axis)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan), n


class RunningMean:
    """:func:`mean_defined` over axis 0 of rows fed in chunks (per-example values, (n, ...)): the per-layer sums and
    counts are all it keeps, so memory does not grow with the examples. On one chunk it gives exactly what
    :func:`mean_defined` gives; over several, the same up to the order of the float additions."""

    def __init__(self):
        self.total, self.n = None, None

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=float)
        ok = ~np.isnan(rows)
        total, n = np.where(ok, rows, 0.0).sum(axis=0), ok.sum(axis=0)
        self.total, self.n = (total, n) if self.total is None else (self.total + total, self.n + n)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(the mean of the defined values, how many there were), as :func:`mean_defined`."""
        return np.where(self.n > 0, self.total / np.maximum(self.n, 1), np.nan), self.n


# ----------------------------------------------------------------------------- Rec2FTP


def rec2ftp(zsl_correct, ft_correct, icl_correct) -> tuple[float, int]:
    """Recall to finetuning predictions.

    Rec2FTP = #{ZSL wrong ∧ FT right ∧ ICL right} / #{ZSL wrong ∧ FT right}, over all test examples
    (official code: multiplied by 100; here a fraction). Returns (value, denominator); the value is NaN
    when the denominator is 0 (FT fixed no ZSL error).
    """
    z, f, i = (np.asarray(x, dtype=bool) for x in (zsl_correct, ft_correct, icl_correct))
    fixed_by_ft = ~z & f
    den = int(fixed_by_ft.sum())
    return (float((fixed_by_ft & i).sum() / den) if den else float("nan")), den


# ----------------------------------------------------------------------------- SimAOU


def simaou_per_example(h_zsl: np.ndarray, h_icl: np.ndarray, h_ft: np.ndarray) -> np.ndarray:
    """SimAOU (Dai et al. 2022, as the official code defines it; docs/paper-map.md) per example and layer,
    (n_examples, n_layers).

    Inputs (n_examples, n_layers, d): attention outputs after the output projection at the prediction
    position. Per layer each vector is L2-normalised; ΔICL = ĥ_ICL − ĥ_ZSL, ΔFT = ĥ_FT − ĥ_ZSL;
    cos(ΔICL, ΔFT). NaN where ΔFT (or ΔICL) is zero: a finetuning that did not move the output is
    undefined, not orthogonal (the official code would report 0 there).
    """
    z, i, f = _unit(h_zsl), _unit(h_icl), _unit(h_ft)
    return cosine_or_nan(i - z, f - z)


def simaou_per_layer(h_zsl: np.ndarray, h_icl: np.ndarray, h_ft: np.ndarray) -> np.ndarray:
    """Similarity of attention output updates, per layer: the mean over examples of
    :func:`simaou_per_example` (defined examples only; NaN for a layer with none) -> (n_layers,).
    The paper's SimAOU is the mean of this over layers."""
    return mean_defined(simaou_per_example(h_zsl, h_icl, h_ft), axis=0)[0]


def simaou_random_per_example(h_zsl: np.ndarray, h_icl: np.ndarray, rng: np.random.Generator, kind: str
                              ) -> np.ndarray:
    """cos(ΔICL, r) per example and layer, (n_examples, n_layers), r drawn from ``rng`` example by example in
    order: "uniform" r ~ uniform[0, 1)^d (the official baseline), "gaussian" r ~ N(0, I) (a random FT
    direction). Successive calls on successive chunks of examples draw what one call on all of them draws."""
    d_icl = _unit(h_icl) - _unit(h_zsl)
    r = rng.random(d_icl.shape) if kind == "uniform" else rng.standard_normal(d_icl.shape)
    return cosine(d_icl, r)


def simaou_uniform_baseline(h_zsl: np.ndarray, h_icl: np.ndarray, seed: int = 0) -> np.ndarray:
    """The official random baseline: cos(ΔICL, u) with u ~ uniform[0, 1)^d, per layer."""
    return simaou_random_per_example(h_zsl, h_icl, np.random.default_rng(seed), "uniform").mean(axis=0)


def simaou_gaussian_baseline(h_zsl: np.ndarray, h_icl: np.ndarray, seed: int = 0) -> np.ndarray:
    """A random-direction FT control: cos(ΔICL, ΔFT_rand) with ΔFT_rand ~ N(0, I), per layer (≈ 0)."""
    return simaou_random_per_example(h_zsl, h_icl, np.random.default_rng(seed), "gaussian").mean(axis=0)


# ----------------------------------------------------------------------------- SimAM


def simam_per_example(scores_a: list[np.ndarray], scores_b: list[np.ndarray]) -> np.ndarray:
    """Similarity of attention maps per example and layer, (n_examples, n_layers).

    Each list item is one example's raw pre-softmax scores (n_layers, n_heads, T_query) of the
    prediction position over the test input's own tokens. Cosine per head, mean over heads. (The official
    code left-pads rows with zeros to the longest; zeros do not change a cosine.)
    """
    return np.stack([cosine(a, b).mean(axis=-1) for a, b in zip(scores_a, scores_b)])


def simam_per_layer(scores_a: list[np.ndarray], scores_b: list[np.ndarray]) -> np.ndarray:
    """Similarity of attention maps, per layer: the mean over examples of :func:`simam_per_example`
    -> (n_layers,). SimAM = simam(ICL, FT); "ZSL SimAM" = simam(ICL, ZSL)."""
    return np.mean(simam_per_example(scores_a, scores_b), axis=0)


def simam_delta_per_example(scores_zsl, scores_icl, scores_ft) -> np.ndarray:
    """SimAM_Δ (Deutch et al. 2024) per example and layer, (n_examples, n_layers): cos(ICL − ZSL, FT − ZSL)
    of the raw scores per head, mean over the heads where both changes are non-zero (NaN if none)."""
    return np.stack([mean_defined(cosine_or_nan(i - z, f - z), axis=-1)[0]
                     for z, i, f in zip(scores_zsl, scores_icl, scores_ft)])


def simam_delta_per_layer(scores_zsl, scores_icl, scores_ft) -> np.ndarray:
    """SimAM_Δ per layer: the mean over examples of :func:`simam_delta_per_example` (defined ones only)."""
    return mean_defined(simam_delta_per_example(scores_zsl, scores_icl, scores_ft), axis=0)[0]


# ----------------------------------------------------------------------------- Kendall


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax along ``axis``; −inf logits (positions a sliding window masks) get 0, and a row that is −inf
    everywhere (no demonstration token visible to that query) is NaN: undefined, and left out by the means."""
    with np.errstate(invalid="ignore"):
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)


def sum_per_span(x: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Sum the last axis over each [start, end) span (token level -> example level)."""
    return np.stack([x[..., a:b].sum(-1) for a, b in spans], axis=-1)


def ft_query_logits(q_test: np.ndarray, q_train: np.ndarray, scale: float, paper: bool = True) -> np.ndarray:
    """Kendall's FT side before its softmax, per layer: (L, H, d) test query · (L, T, H, d) training queries,
    summed over heads -> (L, T).

    ``paper=True`` (the official code): both queries are recorded after ``q *= head_dim**-0.5``, so the
    logits are scale² · q_test·q_train. ``paper=False``: unscaled q·q (iclgd before issue 15). The scale
    changes no token-level ranking (softmax keeps order) but does change the example-level sums.
    """
    # several test queries (n, L, H, d) -> (n, L, T): one matrix product per layer
    logits = query_logits(q_test, q_train) if q_test.ndim == 4 else np.einsum("lhd,lthd->lt", q_test, q_train)
    return logits * scale ** 2 if paper else logits


def query_logits(q_test: np.ndarray, q_train: np.ndarray) -> np.ndarray:
    """:func:`ft_query_logits` (unscaled) of many test queries at once: (n, L, H, d) · (L, T, H, d) -> (n, L, T),
    one matrix product per layer (over H·d) instead of one einsum per example."""
    n, L = q_test.shape[:2]
    T = q_train.shape[1]
    return np.stack([q_test[:, l].reshape(n, -1) @ q_train[l].reshape(T, -1).T for l in range(L)], axis=1)


def kendall_per_example(icl_attn: list[np.ndarray], ft_attn: list[np.ndarray]) -> np.ndarray:
    """Kendall's τ-b (``scipy.stats.kendalltau``) between ICL and FT attention to the training tokens, per
    example and layer, (n_examples, n_layers); NaN where τ is undefined (a constant vector).

    Each item is one example's (n_layers, n_tokens) weights: ICL = softmax over demonstration tokens
    of the prediction position's scores summed over heads (BOS and separators dropped); FT = softmax
    over training tokens of :func:`ft_query_logits`.
    """
    if not len(icl_attn):
        return np.zeros((0, 0))
    a, b = np.stack(icl_attn), np.stack(ft_attn)  # (n, L, T): one demonstration set, so one length
    n, L, T = a.shape
    a, b = a.reshape(n * L, T), b.reshape(n * L, T)
    if T <= KENDALL_PAIRS_MAX:
        return _tau_b_pairs(a, b).reshape(n, L)
    # every (example, layer) row in one call, not one call per row; "asymptotic" only skips the exact p-value, which
    # is not used (the statistic is the same under every method)
    with np.errstate(invalid="ignore"):
        tau = stats.kendalltau(a, b, axis=1, method="asymptotic").statistic
    return np.asarray(tau, dtype=float).reshape(n, L)


KENDALL_PAIRS_MAX = 64  # vectors up to this long (e.g. one weight per demonstration): τ-b from all pairs at once


def _tau_b_pairs(a: np.ndarray, b: np.ndarray, rows_per_block: int = 512) -> np.ndarray:
    """Kendall's τ-b of each row of ``a`` and ``b`` (R, T) from the signs of all T(T−1)/2 pairs, for short rows where
    scipy's per-row call overhead outweighs the O(T²) work: (concordant − discordant) / √(pairs not tied in a) /
    √(pairs not tied in b), scipy's formula on the same integer counts, so the same float (tested against
    ``scipy.stats.kendalltau``); NaN for a row with a NaN or a constant row (no untied pair)."""
    i, j = np.triu_indices(a.shape[1], 1)
    tau = np.empty(a.shape[0])
    for r in range(0, a.shape[0], rows_per_block):
        x, y = a[r: r + rows_per_block], b[r: r + rows_per_block]
        bad = np.isnan(x).any(1) | np.isnan(y).any(1)
        x, y = np.where(bad[:, None], 0.0, x), np.where(bad[:, None], 0.0, y)
        sx, sy = np.sign(x[:, i] - x[:, j]).astype(np.int8), np.sign(y[:, i] - y[:, j]).astype(np.int8)
        con_minus_dis = (sx * sy).sum(1, dtype=np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            t = con_minus_dis / np.sqrt(np.count_nonzero(sx, axis=1)) / np.sqrt(np.count_nonzero(sy, axis=1))
        tau[r: r + rows_per_block] = np.where(bad, np.nan, np.clip(t, -1.0, 1.0))
    return tau


def kendall_per_layer(icl_attn: list[np.ndarray], ft_attn: list[np.ndarray]) -> np.ndarray:
    """Kendall τ per layer: the mean over examples of :func:`kendall_per_example` (defined ones only),
    (n_layers,)."""
    return mean_defined(kendall_per_example(icl_attn, ft_attn), axis=0)[0]


def kendall_random_baseline(icl_attn: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """τ(ICL, a uniform random vector of the same length), per layer (≈ 0)."""
    rng = np.random.default_rng(seed)
    return kendall_per_layer(icl_attn, [rng.random(a.shape) for a in icl_attn])


# ----------------------------------------------------------------------------- several seeds


def bootstrap_ci(values, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile bootstrap CI of the mean. One value: its CI is (v, v). NaNs are dropped."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float(v[0]), float(v[0])
    res = stats.bootstrap((v,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile",
                          random_state=np.random.default_rng(seed))
    return float(v.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Metric:
    """One number of a compare result: where it lies, the pure function that computes it per example, and its
    controls. The paper's published values and how a report prints them live in :mod:`iclgd.report.paper`.

    Every metric aggregates over seeds the same way (mean with a 95% percentile bootstrap CI,
    :func:`aggregate`, which records each metric's baselines beside it); per layer it is the mean over layers
    of the ``per_layer`` list beside ``path``.
    """

    path: tuple[str, ...]  # keys into a compare seed's result, down to the overall value
    function: Callable | None = None  # what computes it per example (compare runs it from here; None: a count)
    baselines: tuple[str, ...] = ()  # the registry names of its controls
    csv_layers: str | None = None  # name of its per-layer rows in results.csv (None: overall only)


METRICS: dict[str, Metric] = {
    "acc_zsl": Metric(("acc", "zsl")),
    "acc_ft": Metric(("acc", "ft")),
    "acc_icl": Metric(("acc", "icl")),
    "rec2ftp": Metric(("rec2ftp", "value"), rec2ftp),
    "simaou": Metric(("simaou", "overall"), simaou_per_example, ("simaou_random_uniform", "simaou_random_gaussian"),
                     csv_layers="simaou"),
    "simaou_random_uniform": Metric(("simaou", "baseline_uniform", "overall"), simaou_random_per_example),
    "simaou_random_gaussian": Metric(("simaou", "baseline_gaussian", "overall"), simaou_random_per_example),
    "simam_ft": Metric(("simam", "icl_ft", "overall"), simam_per_example, ("simam_zsl",), csv_layers="simam_icl_ft"),
    "simam_zsl": Metric(("simam", "icl_zsl", "overall"), simam_per_example),
    "simam_delta": Metric(("simam", "delta", "overall"), simam_delta_per_example),
    "kendall_token": Metric(("kendall", "token_qq", "overall"), kendall_per_example, ("kendall_random",),
                            csv_layers="kendall_token_qq"),
    "kendall_token_keys": Metric(("kendall", "token_qk", "overall"), kendall_per_example, ("kendall_random",)),
    "kendall_example": Metric(("kendall", "example_qq", "overall"), kendall_per_example),
    "kendall_random": Metric(("kendall", "random_token", "overall"), kendall_per_example),
    "kendall_example_unscaled": Metric(("kendall", "example_qq_unscaled", "overall"), kendall_per_example),
    "kendall_example_keys": Metric(("kendall", "example_qk", "overall"), kendall_per_example,
                                   ("kendall_random_example",)),
    "kendall_random_example": Metric(("kendall", "random_example", "overall"), kendall_per_example),
    # ΔW_ICL (Eq. 7) against ΔW_FT (Eq. 8) on the test queries, with the random-update baseline
    "dw_cos": Metric(("updates", "cos_dW", "overall"), baselines=("dw_cos_random",), csv_layers="dw_cos"),
    "dw_cos_random": Metric(("updates", "cos_dW_random", "overall")),
    "dw_cos_effect": Metric(("updates", "cos_effect_on_q", "overall"), baselines=("dw_cos_effect_random",),
                            csv_layers="dw_cos_effect"),
    "dw_cos_effect_random": Metric(("updates", "cos_effect_random", "overall")),
    "dw_norm_ratio": Metric(("updates", "norm_ratio_ft_over_icl", "overall")),
}


def _at(result: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(result, dict) or result.get(key) is None:
            return None
        result = result[key]
    return result


def scalar(result: dict, name: str) -> float:
    """The overall value of metric ``name`` in one seed's compare result; NaN where the run did not compute it
    (e.g. ``--updates-n 0``, or a file written before the metric existed)."""
    v = _at(result, METRICS[name].path)
    return float("nan") if v is None else float(v)


def per_layer_of(result: dict, name: str) -> list[float]:
    """The per-layer values of metric ``name`` (the ``per_layer`` list beside its overall value); [] where the
    run did not compute it."""
    v = _at(result, METRICS[name].path[:-1])
    return [] if v is None else v["per_layer"]


def aggregate(results: list[dict]) -> dict:
    """Mean and 95% bootstrap CI over seeds of every registered metric; ``n_seeds`` counts the seeds whose value
    is defined (what the mean rests on), ``n_seeds_run`` all seeds."""
    out = {}
    for name in METRICS:
        vals = [scalar(r, name) for r in results]
        mean, lo, hi = bootstrap_ci(vals)
        out[name] = {"mean": mean, "ci95": [lo, hi], "n_seeds": int(sum(v == v for v in vals)),
                     "n_seeds_run": len(results), **({"baselines": list(METRICS[name].baselines)}
                                                     if METRICS[name].baselines else {})}
    return out


def aggregate_paths(results: list[dict], paths: list[str]) -> dict:
    """Mean and 95% bootstrap CI over seeds of each dotted path (``acc.icl``; a figure with ``overall`` gives that),
    as :func:`aggregate` records them; an undefined value counts as NaN."""
    out = {}
    for path in paths:
        vals = []
        for r in results:
            v = r
            for k in path.split("."):
                v = v.get(k) if isinstance(v, dict) else None
            v = v.get("overall") if isinstance(v, dict) else v
            vals.append(float("nan") if v is None else float(v))
        mean, lo, hi = bootstrap_ci(vals)
        out[path] = {"mean": mean, "ci95": [lo, hi], "n_seeds": int(sum(v == v for v in vals)),
                     "n_seeds_run": len(vals)}
    return out


def fmt_ci(mean: float, lo: float, hi: float, several: bool, pct: bool = False, sep: str = ", ") -> str:
    """"m" for one seed, "m [lo, hi]" for several; ``pct``: fractions shown as percentages, one decimal."""
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")
    return f"{f(mean)} [{f(lo)}{sep}{f(hi)}]" if several else f(mean)


MIN_SEEDS_FOR_CI = 3  # tables show a CI from this many seeds on (the results files keep it for any number)


def fmt_mean_ci(values, pct: bool = False) -> str:
    """Mean over seeds with its 95% bootstrap CI from three seeds on ("n/a" when all are NaN): a bootstrap over two
    values only restates them."""
    vals = [v for v in values if v == v]
    if not vals:
        return "n/a"
    return fmt_ci(*bootstrap_ci(vals), several=len(vals) >= MIN_SEEDS_FOR_CI, pct=pct)


def fmt_aggregate(agg: dict, name: str) -> str:
    """One metric of :func:`aggregate`'s output as a table cell."""
    a = agg[name]
    run = a.get("n_seeds_run", a["n_seeds"])
    short = f" ({a['n_seeds']}/{run} seeds)" if a["n_seeds"] < run else ""  # a figure resting on fewer seeds says so
    return fmt_ci(a["mean"], *a["ci95"], several=a["n_seeds"] >= MIN_SEEDS_FOR_CI, sep=",") + short
