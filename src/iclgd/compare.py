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

from iclgd import dual
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
    simam_segment: str = "after-context"  # the official slice attn_map[:, :, -1, c_len:]; or "input-only"
    kendall_scale: str = "paper"  # FT side scale²·q·q as the official code; or "none" (unscaled q·q)
    updates_n: int = 100  # test examples on which ΔW_ICL is compared with ΔW_FT
    untrained_seed: int | None = None  # the untrained control's init seed; None: the run seed
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
        if self.simam_segment not in ("after-context", "input-only"):
            raise IclgdError(f"--simam-segment {self.simam_segment!r}: expected after-context or input-only")
        if self.kendall_scale not in ("paper", "none"):
            raise IclgdError(f"--kendall-scale {self.kendall_scale!r}: expected paper or none")
        if self.kendall_n < 1 or self.updates_n < 0:
            raise IclgdError("--kendall-n must be at least 1 and --updates-n at least 0")


def _stats(per_layer: np.ndarray, per_example: np.ndarray | None = None) -> dict:
    """Overall (mean over the layers where the metric is defined) and per layer, with what they rest on:
    ``n_layers`` defined layers, and with ``per_example`` (n_examples, n_layers) the defined examples per layer."""
    per_layer = np.asarray(per_layer, dtype=float)
    overall, n_layers = M.mean_defined(per_layer)
    out = {"overall": float(overall), "per_layer": [float(x) for x in per_layer], "n_layers": int(n_layers)}
    if per_example is not None:
        out["n_examples_per_layer"] = [int(x) for x in (~np.isnan(np.asarray(per_example, dtype=float))).sum(0)]
    return out


def _stats_ex(per_example: np.ndarray) -> dict:
    """:func:`_stats` of a per-example metric (n_examples, n_layers): its per-layer means over defined examples."""
    return _stats(M.mean_defined(per_example, axis=0)[0], per_example)


# Deviations from the paper's code that hold for every compare run (each results file and report lists them)
FT_DEMOS_DEVIATION = ("FT demonstrations: finetuning uses the demonstrations that fit in the ICL prompt (the same "
                      "ones on both sides); the paper's FT loader used all k, its ICL prompt only those that fit")


def compare_deviations(cfg: CompareConfig) -> list[str]:
    """The deviations from the paper's code that a compare run with ``cfg`` applies."""
    out = [FT_DEMOS_DEVIATION,
           "SimAOU and SimAM_Δ: an example whose FT update is zero is left out as undefined (the paper's code "
           "counts cosine 0); every figure records how many layers and examples it rests on"]
    if cfg.position == "last":
        out.append("prediction position: the last prompt token (the paper's code: the appended label token of "
                   "option 0; --position label-token)")
    if cfg.simam_segment != "after-context":
        out.append("SimAM over the test input's tokens only (the paper's code: every position after the context, "
                   "including the label token in its convention)")
    if cfg.kendall_scale != "paper":
        out.append("Kendall FT side: unscaled q·q logits (the paper's code: head_dim^-1 · q·q)")
    if cfg.untrained_seed is not None:
        out.append(f"untrained control initialised with seed {cfg.untrained_seed} for every run seed")
    return out


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
    # ΔW_ICL vs ΔW_FT, the side before FT: ΔW_ICL (Eq. 7) of the demonstrations, W_ZSL (Eq. 6) of each ZSL prompt
    n_upd = min(cfg.updates_n, len(data.eval_rows))
    label_tok = icl.option_ids[0][:1] if cfg.position == "label-token" else []
    upd_ids = [[lm.bos_id] + zsl.query_ids[j] + label_tok for j in range(n_upd)]
    if n_upd:
        dW_icl = dual.kv_matrices(lm, icl.prefix_ids, (1, len(icl.prefix_ids)))
        W_before = [dual.kv_matrices(lm, ids) for ids in upd_ids]
    lap("updates_before")
    snap = Snapshot(lm, cfg.ft_params)
    try:
        ft = finetune(lm, demo_ids, lr, cfg.ft_params, cfg.ft_mode)
        ft_params_changed = snap.changed()
        lap("ft")
        obs_f = Observer(lm, [], cfg.position)
        lp_f = score_options(lm, zsl, cfg.batch_size, progress=progress and f"{name} FT", observer=obs_f)
        lap("ft_zsl")
        W_after = [dual.kv_matrices(lm, ids) for ids in upd_ids]
        lap("updates_after")
    finally:
        snap.restore()

    labels = np.array(icl.labels)
    pz, pi, pf = lp_z.argmax(1), lp_i.argmax(1), lp_f.argmax(1)
    N = len(labels)
    ex = range(N)
    Hz, Hi, Hf = (np.stack([o.obs[j].h for j in ex]) for o in (obs_z, obs_i, obs_f))
    Sz, Si, Sf = ([o.obs[j].simam_scores(cfg.simam_segment) for j in ex] for o in (obs_z, obs_i, obs_f))
    r2f, den = M.rec2ftp(pz == labels, pf == labels, pi == labels)
    # a finetuning that changed no prediction and no hidden state: its similarities are undefined, not 0
    ft_changed = {"params": ft_params_changed, "predictions": int((pf != pz).sum()),
                  "attn_outputs": int(np.any(Hf != Hz, axis=(1, 2)).sum()), "nothing": False}
    ft_changed["nothing"] = ft_changed["predictions"] == 0 and ft_changed["attn_outputs"] == 0

    # Kendall: ICL attention over demonstration tokens vs FT attention over the same (training) tokens
    nk = min(cfg.kendall_n, N)
    Q, K = ft.train_queries(), ft.train_keys()  # (L, T_train, H or H_kv, hd)
    if Q.shape[1] != len(demo_positions):
        raise AssertionError("training tokens and demonstration tokens are misaligned")
    group = Q.shape[2] // K.shape[2]
    K = np.repeat(K, group, axis=2)
    lengths = [b - a for a, b in icl.demo_spans]
    spans = list(zip(np.cumsum([0] + lengths[:-1]), np.cumsum(lengths)))
    sc = obs_f.obs[0].scale
    icl_tok = [M.softmax(obs_i.obs[j].s_demo) for j in range(nk)]
    ft_qq = [M.softmax(M.ft_query_logits(obs_f.obs[j].q, Q, sc, cfg.kendall_scale == "paper")) for j in range(nk)]
    ft_qq_unscaled = [M.softmax(M.ft_query_logits(obs_f.obs[j].q, Q, sc, False)) for j in range(nk)]
    # the dual-form variant: the attention logits scale · q·k of the test query on the training keys
    ft_qk = [M.softmax(sc * np.einsum("lhd,lthd->lt", obs_f.obs[j].q, K)) for j in range(nk)]
    per_demo = lambda xs: [M.sum_per_span(x, spans) for x in xs]  # noqa: E731
    rng_tok, rng_ex = np.random.default_rng(seed), np.random.default_rng(seed)
    kendall = {
        "token_qq": _stats_ex(M.kendall_per_example(icl_tok, ft_qq)),
        "token_qk": _stats_ex(M.kendall_per_example(icl_tok, ft_qk)),
        "example_qq": _stats_ex(M.kendall_per_example(per_demo(icl_tok), per_demo(ft_qq))),
        "example_qq_unscaled": _stats_ex(M.kendall_per_example(per_demo(icl_tok), per_demo(ft_qq_unscaled))),
        "example_qk": _stats_ex(M.kendall_per_example(per_demo(icl_tok), per_demo(ft_qk))),
        "random_token": _stats_ex(M.kendall_per_example(icl_tok, [rng_tok.random(a.shape) for a in icl_tok])),
        "random_example": _stats_ex(M.kendall_per_example(per_demo(icl_tok),
                                                          [rng_ex.random(a.shape) for a in per_demo(icl_tok)])),
        "n_examples": nk,
        "ft_logits": "scale^2 * q.q (paper)" if cfg.kendall_scale == "paper" else "q.q (unscaled)",
    }
    updates = _updates(dW_icl, W_before, W_after, [obs_i.obs[j].q for j in range(n_upd)], seed) if n_upd else None
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
        "ft_master_fp32": ft.master_fp32,
        "ft_changed": ft_changed,
        "acc": {"zsl": float((pz == labels).mean()), "icl": float((pi == labels).mean()),
                "ft": float((pf == labels).mean()), "majority": float(np.bincount(labels).max() / N)},
        "pred_counts": {"zsl": np.bincount(pz, minlength=C).tolist(), "icl": np.bincount(pi, minlength=C).tolist(),
                        "ft": np.bincount(pf, minlength=C).tolist()},
        "rec2ftp": {"value": r2f, "denominator": den},
        "simaou": {**_stats_ex(M.simaou_per_example(Hz, Hi, Hf)),
                   "baseline_uniform": _stats(M.simaou_uniform_baseline(Hz, Hi, seed)),
                   "baseline_gaussian": _stats(M.simaou_gaussian_baseline(Hz, Hi, seed))},
        "simam": {"icl_ft": _stats(M.simam_per_layer(Si, Sf)), "icl_zsl": _stats(M.simam_per_layer(Si, Sz)),
                  "delta": _stats_ex(M.simam_delta_per_example(Sz, Si, Sf)), "segment": cfg.simam_segment},
        "kendall": kendall,
        "updates": updates,
    }
    records = [{"seed": seed, "idx": data.eval_rows[j].get("idx"), "label": int(labels[j]), "zsl_pred": int(pz[j]),
                "icl_pred": int(pi[j]), "ft_pred": int(pf[j]),
                "zsl_logprobs": [round(float(x), 6) for x in lp_z[j]],
                "icl_logprobs": [round(float(x), 6) for x in lp_i[j]],
                "ft_logprobs": [round(float(x), 6) for x in lp_f[j]]} for j in ex]
    return result, records, phases


def _updates(dW_icl, W_before, W_after, q_icl, seed: int) -> dict:
    """ΔW_ICL (Eq. 7) against ΔW_FT = W_ZSL(after FT) − W_ZSL(before) (Eq. 8) on each test example's ZSL prompt,
    per layer and head (:func:`iclgd.dual.update_stats`), with the random-update baseline (seeded by the run
    seed). Cosines: mean over the examples where ΔW_FT ≠ 0; norm ratio: median over examples."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n, L = len(W_before), len(dW_icl)
    keys = ("cos_dW", "norm_ratio_ft_over_icl", "cos_effect_on_q", "cos_dW_random", "cos_effect_random")
    acc = {k: [] for k in keys}  # each (n, L, H)
    for j in range(n):
        per_l = [dual.update_stats(dW_icl[l], W_after[j][l] - W_before[j][l], torch.from_numpy(q_icl[j][l]), g)
                 for l in range(L)]
        for k in keys:
            acc[k].append(np.stack([st[k].numpy() for st in per_l]))
    out = {"n_examples": n, "per_head": {}}
    for k in keys:
        a = np.asarray(acc[k])  # (n, L, H)
        if k == "norm_ratio_ft_over_icl":
            ph = np.median(a, axis=0)
            out[k] = _stats(np.median(a.transpose(1, 0, 2).reshape(L, -1), axis=1))
        else:
            ph = M.mean_defined(a, axis=0)[0]
            out[k] = _stats_ex(M.mean_defined(a, axis=2)[0])
        out["per_head"][k] = [[round(float(x), 6) for x in row] for row in ph]
    return out


SCALARS = {
    "acc_zsl": ("acc", "zsl"), "acc_ft": ("acc", "ft"), "acc_icl": ("acc", "icl"),
    "rec2ftp": ("rec2ftp", "value"),
    "simaou": ("simaou", "overall"), "simaou_random_uniform": ("simaou", "baseline_uniform", "overall"),
    "simaou_random_gaussian": ("simaou", "baseline_gaussian", "overall"),
    "simam_ft": ("simam", "icl_ft", "overall"), "simam_zsl": ("simam", "icl_zsl", "overall"),
    "simam_delta": ("simam", "delta", "overall"),
    "kendall_token": ("kendall", "token_qq", "overall"), "kendall_token_keys": ("kendall", "token_qk", "overall"),
    "kendall_example": ("kendall", "example_qq", "overall"), "kendall_random": ("kendall", "random_token", "overall"),
    "kendall_example_unscaled": ("kendall", "example_qq_unscaled", "overall"),
    "dw_cos": ("updates", "cos_dW", "overall"), "dw_cos_random": ("updates", "cos_dW_random", "overall"),
    "dw_cos_effect": ("updates", "cos_effect_on_q", "overall"),
    "dw_cos_effect_random": ("updates", "cos_effect_random", "overall"),
    "dw_norm_ratio": ("updates", "norm_ratio_ft_over_icl", "overall"),
}


def scalar(result: dict, name: str) -> float:
    """One scalar of a seed's result; NaN where the run did not compute it (e.g. --updates-n 0, older files)."""
    v = result
    for key in SCALARS[name]:
        if not isinstance(v, dict) or v.get(key) is None:
            return float("nan")
        v = v[key]
    return float(v)


def aggregate(results: list[dict]) -> dict:
    """Mean and 95% bootstrap CI over seeds of every scalar metric; ``n_seeds`` counts the seeds whose value is
    defined (what the mean rests on), ``n_seeds_run`` all seeds."""
    out = {}
    for name in SCALARS:
        vals = [scalar(r, name) for r in results]
        mean, lo, hi = M.bootstrap_ci(vals)
        out[name] = {"mean": mean, "ci95": [lo, hi], "n_seeds": int(sum(v == v for v in vals)),
                     "n_seeds_run": len(results)}
    return out


def config_dict(cfg: CompareConfig) -> dict:
    d = asdict(cfg)
    d["lr_grid"] = list(d["lr_grid"])
    return d


def run_compare(model: str, task: str, seeds: list[int], cfg: CompareConfig, n_test: int | None = None,
                untrained: bool = False, data_dir=None, out=None, dtype: str = "float32", device: str = "cpu",
                task_spec=None, progress: bool = True) -> list[dict]:
    """Every task × seed (and the untrained control); write results per task; return table rows."""
    from pathlib import Path

    from iclgd.finetune import reinit_untrained
    from iclgd.io import atomic_write_json, atomic_write_jsonl, ensure_dir, library_versions
    from iclgd.models import load_model
    from iclgd.report import plot_compare
    from iclgd.tasks import load_tasks

    if not seeds:
        raise IclgdError("--seeds: expected a comma list of integers, e.g. 1,2,3")
    if cfg.untrained_seed is not None and not untrained:
        raise IclgdError("--untrained-seed applies to the untrained control only: add --untrained")
    datas, ddir = load_tasks(task, task_spec, data_dir, n_test)
    if out is not None:
        ensure_dir(out)
    lm = load_model(model, dtype=dtype, device=device)
    control_lm = None
    if untrained:
        control_lm = load_model(model, dtype=dtype, device=device)
    rows = []
    for data in datas:
        t0 = time.time()
        results, records, phases = [], [], []
        for s in seeds:
            r, rec, ph = compare_seed(lm, data, cfg, s, progress)
            results.append(r), records.extend(rec), phases.append(ph)
        control = None
        if control_lm is not None:
            control = []
            for s in seeds:  # the init seed follows the run seed, so the control's CI includes init variance
                init_seed = s if cfg.untrained_seed is None else cfg.untrained_seed
                reinit_untrained(control_lm, seed=init_seed)
                c = compare_seed(control_lm, data, cfg, s, progress)[0]
                control.append({**c, "untrained_init_seed": init_seed})
        agg = aggregate(results)
        doc = {
            "kind": "iclgd.compare",
            "config": {"model": model, "model_source": lm.source, "model_type": lm.model_type, "dtype": dtype,
                       "device": device, "task": data.spec.to_dict(), "seeds": seeds, "n_test": n_test,
                       "data_dir": str(ddir) if ddir else "hf-hub", **config_dict(cfg),
                       "untrained_control": untrained,
                       "untrained_recipe": "attention and MLP weights ~ N(0, initializer_range^2), biases 0; "
                                           "embeddings, norms, unembedding kept; init seed "
                                           + ("= the run seed" if cfg.untrained_seed is None else
                                              f"{cfg.untrained_seed} for every run seed") if untrained else None},
            "versions": library_versions(),
            "data_sha256": data.files,
            "deviations": data.deviations + compare_deviations(cfg),
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
    run = a.get("n_seeds_run", a["n_seeds"])
    short = f" ({a['n_seeds']}/{run} seeds)" if a["n_seeds"] < run else ""  # a figure resting on fewer seeds says so
    if a["n_seeds"] > 1:
        return f"{a['mean']:.3f} [{a['ci95'][0]:.3f},{a['ci95'][1]:.3f}]{short}"
    return f"{a['mean']:.3f}{short}"


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
        "Kendall ex. | unscaled": f"{_fmt(agg, 'kendall_example')} | {_fmt(agg, 'kendall_example_unscaled')}",
        "cos ΔW | rand": f"{_fmt(agg, 'dw_cos')} | {_fmt(agg, 'dw_cos_random')}",
        "cos ΔWq | rand": f"{_fmt(agg, 'dw_cos_effect')} | {_fmt(agg, 'dw_cos_effect_random')}",
        "‖ΔW_FT‖/‖ΔW_ICL‖": _fmt(agg, "dw_norm_ratio"),
        "k": results[0]["k_true"], "lr": results[0]["lr"],
    }
