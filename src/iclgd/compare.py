"""``iclgd compare``: ZSL, ICL and finetuning on the same demonstrations, and the paper's four metrics.

For one model, task and seed: a ZSL run, an ICL run and, after K/V finetuning on the ICL prompt's
demonstrations, a ZSL run of the finetuned model ("FT"). The captures the metrics need come from the
same forward passes that produce the predictions (:mod:`iclgd.capture`). The metrics are the pure
functions of :mod:`iclgd.metrics`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from iclgd import metrics as M
from iclgd.capture import Observer
from iclgd.errors import IclgdError
from iclgd.finetune import Snapshot, finetune
from iclgd.models import LoadedModel
from iclgd.runs import build_prompts, score_options
from iclgd.tasks import TaskData, sample_demos

# Per-task learning rates of the paper's K/V finetuning (GiilDe/ft-vs-icl configs for the 1.3B model,
# probably Dai et al. App. B). Not tuned for other models: use --lr-search to pick one on held-out train data.
TASK_LR = {"sst2": 5e-4, "sst5": 1.6e-4, "mr": 3e-3, "subj": 3e-3, "agnews": 0.2, "cb": 0.08}
DEFAULT_LR = 1e-3
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass
class CompareConfig:
    k: int = 32
    lr: float | None = None  # None: TASK_LR[task]
    lr_search: bool = False
    lr_grid: tuple[float, ...] = LR_GRID
    lr_holdout: int = 64  # train examples (disjoint from the demonstrations) that judge the grid
    ft_params: str = "kv"
    ft_mode: str = "gd"
    position: str = "last"  # or "label-token" (the official code)
    kendall_n: int = 100
    balanced: bool = False
    separator: str = "\n"
    max_len: int = 2048
    batch_size: int = 8

    def __post_init__(self):
        if self.position not in ("last", "label-token"):
            raise IclgdError(f"--position {self.position!r}: expected last or label-token")
        if self.ft_params not in ("kv", "all"):
            raise IclgdError(f"--ft-params {self.ft_params!r}: expected kv or all")
        if self.ft_mode not in ("gd", "lcgd"):
            raise IclgdError(f"--ft-mode {self.ft_mode!r}: expected gd or lcgd")


def _stats(per_layer: np.ndarray) -> dict:
    per_layer = np.asarray(per_layer, dtype=float)
    return {"overall": float(np.nanmean(per_layer)), "per_layer": [float(x) for x in per_layer]}


def _choose_lr(lm: LoadedModel, data: TaskData, cfg: CompareConfig, seed: int, demos: list[dict],
               demo_ids: list[list[int]]) -> tuple[float, dict | None]:
    task = data.spec.name
    if not cfg.lr_search:
        lr = cfg.lr if cfg.lr is not None else TASK_LR.get(task, DEFAULT_LR)
        return lr, None
    used = {id(d) for d in demos}
    order = np.random.default_rng(seed).permutation(len(data.demo_pool))
    held = [data.demo_pool[i] for i in order if id(data.demo_pool[i]) not in used][: cfg.lr_holdout]
    if not held:
        raise IclgdError("--lr-search: no train examples left beside the demonstrations")
    p = build_prompts(lm, data.spec, [], held, cfg.separator, cfg.max_len)
    labels = np.array(p.labels)
    grid = []
    for lr in cfg.lr_grid:
        snap = Snapshot(lm, cfg.ft_params)
        try:
            finetune(lm, demo_ids, lr, cfg.ft_params, cfg.ft_mode, record=False)
            acc = float((score_options(lm, p, cfg.batch_size).argmax(1) == labels).mean())
        except IclgdError:  # diverged (NaN loss) at this rate
            acc = float("nan")
        snap.restore()
        grid.append({"lr": lr, "holdout_acc": acc})
    best = max((g for g in grid if not np.isnan(g["holdout_acc"])), key=lambda g: g["holdout_acc"], default=None)
    if best is None:
        raise IclgdError("--lr-search: finetuning diverged at every rate of the grid")
    return best["lr"], {"grid": grid, "holdout_n": len(held), "holdout_source": "train split, outside the demos"}


def compare_seed(lm: LoadedModel, data: TaskData, cfg: CompareConfig, seed: int, progress: bool = True
                 ) -> tuple[dict, list[dict], dict]:
    """One (model, task, seed): returns (result, per-example records, phase timings in seconds)."""
    spec = data.spec
    C = len(spec.label_words)
    t = {"start": time.perf_counter()}
    demos = sample_demos(data.demo_pool, cfg.k, seed, cfg.balanced, C)
    icl = build_prompts(lm, spec, demos, data.eval_rows, cfg.separator, cfg.max_len)
    zsl = build_prompts(lm, spec, [], data.eval_rows, cfg.separator, cfg.max_len)
    demo_positions = [i for a, b in icl.demo_spans for i in range(a, b)]
    demo_ids = [icl.prefix_ids[a:b] for a, b in icl.demo_spans]
    name = f"{spec.name} s{seed}"
    phases = {}

    def lap(key):
        now = time.perf_counter()
        phases[key] = round(now - t["start"], 3)
        t["start"] = now

    obs_z = Observer(lm, [], cfg.position)
    lp_z = score_options(lm, zsl, cfg.batch_size, progress=progress and f"{name} ZSL", observer=obs_z)
    lap("zsl")
    obs_i = Observer(lm, demo_positions, cfg.position)
    lp_i = score_options(lm, icl, cfg.batch_size, progress=progress and f"{name} ICL", observer=obs_i)
    lap("icl")
    lr, search = _choose_lr(lm, data, cfg, seed, icl.demos, demo_ids)
    lap("lr_search")
    snap = Snapshot(lm, cfg.ft_params)
    try:
        ft = finetune(lm, demo_ids, lr, cfg.ft_params, cfg.ft_mode)
        lap("ft")
        obs_f = Observer(lm, [], cfg.position)
        lp_f = score_options(lm, zsl, cfg.batch_size, progress=progress and f"{name} FT", observer=obs_f)
        lap("ft_zsl")
    finally:
        snap.restore()

    labels = np.array(icl.labels)
    pz, pi, pf = lp_z.argmax(1), lp_i.argmax(1), lp_f.argmax(1)
    N = len(labels)
    ex = range(N)
    Hz, Hi, Hf = (np.stack([o.obs[j].h for j in ex]) for o in (obs_z, obs_i, obs_f))
    Sz, Si, Sf = ([o.obs[j].s_query for j in ex] for o in (obs_z, obs_i, obs_f))
    r2f, den = M.rec2ftp(pz == labels, pf == labels, pi == labels)

    # Kendall: ICL attention over demonstration tokens vs FT attention over the same (training) tokens
    nk = min(cfg.kendall_n, N)
    Q, K = ft.train_queries(), ft.train_keys()  # (L, T_train, H or H_kv, hd)
    if Q.shape[1] != len(demo_positions):
        raise AssertionError("training tokens and demonstration tokens are misaligned")
    group = Q.shape[2] // K.shape[2]
    K = np.repeat(K, group, axis=2)
    lengths = [b - a for a, b in icl.demo_spans]
    spans = list(zip(np.cumsum([0] + lengths[:-1]), np.cumsum(lengths)))
    icl_tok = [M.softmax(obs_i.obs[j].s_demo) for j in range(nk)]
    ft_qq = [M.softmax(np.einsum("lhd,lthd->lt", obs_f.obs[j].q, Q)) for j in range(nk)]
    ft_qk = [M.softmax(np.einsum("lhd,lthd->lt", obs_f.obs[j].q, K)) for j in range(nk)]
    per_demo = lambda xs: [M.sum_per_span(x, spans) for x in xs]  # noqa: E731
    kendall = {
        "token_qq": _stats(M.kendall_per_layer(icl_tok, ft_qq)),
        "token_qk": _stats(M.kendall_per_layer(icl_tok, ft_qk)),
        "example_qq": _stats(M.kendall_per_layer(per_demo(icl_tok), per_demo(ft_qq))),
        "example_qk": _stats(M.kendall_per_layer(per_demo(icl_tok), per_demo(ft_qk))),
        "random_token": _stats(M.kendall_random_baseline(icl_tok, seed)),
        "random_example": _stats(M.kendall_random_baseline(per_demo(icl_tok), seed)),
        "n_examples": nk,
    }
    lap("metrics")
    result = {
        "seed": seed,
        "n": N,
        "k_true": icl.k_true,
        "demo_idx": [d.get("idx") for d in icl.demos],
        "position": cfg.position,
        "lr": lr,
        "lr_search": search,
        "ft_losses": [round(x, 6) for x in ft.losses],
        "acc": {"zsl": float((pz == labels).mean()), "icl": float((pi == labels).mean()),
                "ft": float((pf == labels).mean()), "majority": float(np.bincount(labels).max() / N)},
        "pred_counts": {"zsl": np.bincount(pz, minlength=C).tolist(), "icl": np.bincount(pi, minlength=C).tolist(),
                        "ft": np.bincount(pf, minlength=C).tolist()},
        "rec2ftp": {"value": r2f, "denominator": den},
        "simaou": {**_stats(M.simaou_per_layer(Hz, Hi, Hf)),
                   "baseline_uniform": _stats(M.simaou_uniform_baseline(Hz, Hi, seed)),
                   "baseline_gaussian": _stats(M.simaou_gaussian_baseline(Hz, Hi, seed))},
        "simam": {"icl_ft": _stats(M.simam_per_layer(Si, Sf)), "icl_zsl": _stats(M.simam_per_layer(Si, Sz)),
                  "delta": _stats(M.simam_delta_per_layer(Sz, Si, Sf))},
        "kendall": kendall,
    }
    records = [{"seed": seed, "idx": data.eval_rows[j].get("idx"), "label": int(labels[j]), "zsl_pred": int(pz[j]),
                "icl_pred": int(pi[j]), "ft_pred": int(pf[j]),
                "zsl_logprobs": [round(float(x), 6) for x in lp_z[j]],
                "icl_logprobs": [round(float(x), 6) for x in lp_i[j]],
                "ft_logprobs": [round(float(x), 6) for x in lp_f[j]]} for j in ex]
    return result, records, phases


SCALARS = {
    "acc_zsl": ("acc", "zsl"), "acc_ft": ("acc", "ft"), "acc_icl": ("acc", "icl"),
    "rec2ftp": ("rec2ftp", "value"),
    "simaou": ("simaou", "overall"), "simaou_random_uniform": ("simaou", "baseline_uniform", "overall"),
    "simaou_random_gaussian": ("simaou", "baseline_gaussian", "overall"),
    "simam_ft": ("simam", "icl_ft", "overall"), "simam_zsl": ("simam", "icl_zsl", "overall"),
    "simam_delta": ("simam", "delta", "overall"),
    "kendall_token": ("kendall", "token_qq", "overall"), "kendall_token_keys": ("kendall", "token_qk", "overall"),
    "kendall_example": ("kendall", "example_qq", "overall"), "kendall_random": ("kendall", "random_token", "overall"),
}


def scalar(result: dict, name: str) -> float:
    v = result
    for key in SCALARS[name]:
        v = v[key]
    return float(v)


def aggregate(results: list[dict]) -> dict:
    """Mean and 95% bootstrap CI over seeds of every scalar metric."""
    out = {}
    for name in SCALARS:
        mean, lo, hi = M.bootstrap_ci([scalar(r, name) for r in results])
        out[name] = {"mean": mean, "ci95": [lo, hi], "n_seeds": len(results)}
    return out


def config_dict(cfg: CompareConfig) -> dict:
    d = asdict(cfg)
    d["lr_grid"] = list(d["lr_grid"])
    return d


def run_compare(model: str, task: str, seeds: list[int], cfg: CompareConfig, n_test: int | None = None,
                untrained: bool = False, data_dir=None, out=None, dtype: str = "float32", device: str = "cpu",
                task_spec=None, progress: bool = True, bos: str | None = None) -> list[dict]:
    """Every task × seed (and the untrained control); write results per task; return table rows."""
    from pathlib import Path

    from iclgd.finetune import reinit_untrained
    from iclgd.io import atomic_write_json, atomic_write_jsonl, ensure_dir, library_versions
    from iclgd.models import load_model
    from iclgd.report import plot_compare
    from iclgd.tasks import load_tasks

    if not seeds:
        raise IclgdError("--seeds: expected a comma list of integers, e.g. 1,2,3")
    datas, ddir = load_tasks(task, task_spec, data_dir, n_test)
    if out is not None:
        ensure_dir(out)
    lm = load_model(model, dtype=dtype, device=device, bos=bos)
    control_lm = None
    if untrained:
        control_lm = load_model(model, dtype=dtype, device=device, bos=bos)
        reinit_untrained(control_lm, seed=0)
    rows = []
    for data in datas:
        t0 = time.time()
        results, records, phases = [], [], []
        for s in seeds:
            r, rec, ph = compare_seed(lm, data, cfg, s, progress)
            results.append(r), records.extend(rec), phases.append(ph)
        control = None
        if control_lm is not None:
            control = [compare_seed(control_lm, data, cfg, s, progress)[0] for s in seeds]
        agg = aggregate(results)
        doc = {
            "kind": "iclgd.compare",
            "config": {"model": model, "model_source": lm.source, "model_type": lm.model_type, "dtype": dtype,
                       "device": device, "start_token": lm.start, "task": data.spec.to_dict(), "seeds": seeds, "n_test": n_test,
                       "data_dir": str(ddir) if ddir else "hf-hub", **config_dict(cfg),
                       "untrained_control": untrained,
                       "untrained_recipe": "attention and MLP weights ~ N(0, initializer_range^2), biases 0; "
                                           "embeddings, norms, unembedding kept" if untrained else None},
            "versions": library_versions(),
            "data_sha256": data.files,
            "deviations": lm.start_deviations() + data.deviations,
            "seeds": results,
            "aggregate": agg,
            "untrained": {"seeds": control, "aggregate": aggregate(control)} if control else None,
            "timing": {"phases_s": phases, "wall_s": round(time.time() - t0, 1)},
        }
        rows.append(table_row(data.spec.name, agg, results))
        if control:
            rows.append(table_row(f"{data.spec.name} [untrained]", aggregate(control), control))
        if out is not None:
            d = Path(out) if len(datas) == 1 else Path(out) / data.spec.name
            atomic_write_json(d / "results.json", doc)
            atomic_write_jsonl(d / "records.jsonl", records)
            plot_compare(results, d, f"{model} · {data.spec.name} · k={cfg.k} · {cfg.position}", control)
    return rows


def _fmt(agg: dict, name: str) -> str:
    a = agg[name]
    if a["n_seeds"] > 1:
        return f"{a['mean']:.3f} [{a['ci95'][0]:.3f},{a['ci95'][1]:.3f}]"
    return f"{a['mean']:.3f}"


def table_row(task: str, agg: dict, results: list[dict]) -> dict:
    """The paper-style row: accuracies, Rec2FTP, each similarity beside its baseline."""
    return {
        "task": task,
        "ZSL": _fmt(agg, "acc_zsl"), "FT": _fmt(agg, "acc_ft"), "ICL": _fmt(agg, "acc_icl"),
        "Rec2FTP (den)": f"{_fmt(agg, 'rec2ftp')} ({sum(r['rec2ftp']['denominator'] for r in results)})",
        "SimAOU | rand": f"{_fmt(agg, 'simaou')} | {_fmt(agg, 'simaou_random_uniform')}",
        "SimAM | ZSL SimAM": f"{_fmt(agg, 'simam_ft')} | {_fmt(agg, 'simam_zsl')}",
        "SimAM_Δ": _fmt(agg, "simam_delta"),
        "Kendall | rand": f"{_fmt(agg, 'kendall_token')} | {_fmt(agg, 'kendall_random')}",
        "k": results[0]["k_true"], "lr": results[0]["lr"],
    }
