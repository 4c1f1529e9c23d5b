"""``iclgd compare``: ZSL, ICL and finetuning on the same demonstrations, and the paper's four metrics.

For one model, task and seed: a ZSL run, an ICL run and, after K/V finetuning on the ICL prompt's
demonstrations, a ZSL run of the finetuned model ("FT"). The captures the metrics need come from the
same forward passes that produce the predictions (:mod:`iclgd.engine.capture`). The metrics are the pure
functions of :mod:`iclgd.core.metrics`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from iclgd.core import metrics as M
from iclgd.core.errors import IclgdError
from iclgd.core.io import atomic_write_json, atomic_write_jsonl, library_versions
from iclgd.core.models import LoadedModel, load_model, repeat_kv
from iclgd.core.tasks import TaskData, load_tasks, sample_demos
from iclgd.engine.capture import Observer
from iclgd.engine.finetune import FTRecord, Snapshot, finetune, reinit_untrained
from iclgd.engine.scoring import Prompts, build_prompts, score_options

# The K/V finetuning rate of a task without one in its spec. The built-in tasks carry the paper's per-task
# rates (GiilDe/ft-vs-icl configs for the 1.3B model, probably Dai et al. App. B) in their JSON files; they
# are not tuned for other models: use --lr-search to pick one on held-out train data.
DEFAULT_LR = 1e-3
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass
class CompareConfig:
    k: int = 32
    lr: float | None = None  # None: the task spec's lr, else DEFAULT_LR
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
    if not cfg.lr_search:
        lr = cfg.lr if cfg.lr is not None else data.spec.lr if data.spec.lr is not None else DEFAULT_LR
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


class _Laps:
    """Wall time of each phase, in seconds since the previous one."""

    def __init__(self):
        self.phases, self._t = {}, time.perf_counter()

    def __call__(self, key: str) -> None:
        now = time.perf_counter()
        self.phases[key] = round(now - self._t, 3)
        self._t = now


def _observed(lm: LoadedModel, prompts: Prompts, cfg: CompareConfig, demo_positions: list[int], progress
              ) -> tuple[np.ndarray, Observer]:
    """Option log-probs (n_examples, n_options) and the captures of the same forward passes."""
    obs = Observer(lm, demo_positions, cfg.position)
    return score_options(lm, prompts, cfg.batch_size, progress=progress, observer=obs), obs


def compare_seed(lm: LoadedModel, data: TaskData, cfg: CompareConfig, seed: int, progress: bool = True
                 ) -> tuple[dict, list[dict], dict]:
    """One (model, task, seed): returns (result, per-example records, phase timings in seconds)."""
    spec = data.spec
    demos = sample_demos(data.demo_pool, cfg.k, seed, cfg.balanced, len(spec.label_words))
    icl = build_prompts(lm, spec, demos, data.eval_rows, cfg.separator, cfg.max_len)
    zsl = build_prompts(lm, spec, [], data.eval_rows, cfg.separator, cfg.max_len)
    demo_positions = [i for a, b in icl.demo_spans for i in range(a, b)]
    demo_ids = [icl.prefix_ids[a:b] for a, b in icl.demo_spans]
    name, lap = f"{spec.name} s{seed}", _Laps()
    lp_z, obs_z = _observed(lm, zsl, cfg, [], progress and f"{name} ZSL")
    lap("zsl")
    lp_i, obs_i = _observed(lm, icl, cfg, demo_positions, progress and f"{name} ICL")
    lap("icl")
    lr, search = _choose_lr(lm, data, cfg, seed, icl.demos, demo_ids)
    lap("lr_search")
    snap = Snapshot(lm, cfg.ft_params)
    try:
        ft = finetune(lm, demo_ids, lr, cfg.ft_params, cfg.ft_mode)
        lap("ft")
        lp_f, obs_f = _observed(lm, zsl, cfg, [], progress and f"{name} FT")
        lap("ft_zsl")
    finally:
        snap.restore()
    labels = np.array(icl.labels)
    kendall = _kendall(icl, obs_i, obs_f, ft, min(cfg.kendall_n, len(labels)), seed)
    lap("metrics")
    result = {"seed": seed, "n": len(labels), "k_true": icl.k_true, "demo_idx": [d.get("idx") for d in icl.demos],
              "position": cfg.position, "lr": lr, "lr_search": search, "ft_losses": [round(x, 6) for x in ft.losses],
              **_outcomes(labels, (lp_z, lp_i, lp_f), len(spec.label_words)),
              **_similarities((obs_z, obs_i, obs_f), len(labels), seed), "kendall": kendall}
    records = [{"seed": seed, "idx": data.eval_rows[j].get("idx"), "label": int(labels[j]),
                **{f"{s}_pred": int(lp[j].argmax()) for s, lp in zip(SETTINGS, (lp_z, lp_i, lp_f))},
                **{f"{s}_logprobs": [round(float(x), 6) for x in lp[j]] for s, lp in zip(SETTINGS, (lp_z, lp_i, lp_f))}}
               for j in range(len(labels))]
    return result, records, lap.phases


SETTINGS = ("zsl", "icl", "ft")


def _outcomes(labels: np.ndarray, logprobs: tuple[np.ndarray, ...], C: int) -> dict:
    """Accuracy and predictions per class of ZSL, ICL and FT, and Rec2FTP."""
    pz, pi, pf = (lp.argmax(1) for lp in logprobs)
    r2f, den = M.rec2ftp(pz == labels, pf == labels, pi == labels)
    return {"acc": {"zsl": float((pz == labels).mean()), "icl": float((pi == labels).mean()),
                    "ft": float((pf == labels).mean()), "majority": float(np.bincount(labels).max() / len(labels))},
            "pred_counts": {s: np.bincount(p, minlength=C).tolist() for s, p in zip(SETTINGS, (pz, pi, pf))},
            "rec2ftp": {"value": r2f, "denominator": den}}


def _similarities(observers: tuple[Observer, ...], N: int, seed: int) -> dict:
    """SimAOU and SimAM per layer, with their baselines."""
    Hz, Hi, Hf = (np.stack([o.obs[j].h for j in range(N)]) for o in observers)
    Sz, Si, Sf = ([o.obs[j].s_query for j in range(N)] for o in observers)
    return {"simaou": {**_stats(M.simaou_per_layer(Hz, Hi, Hf)),
                       "baseline_uniform": _stats(M.simaou_uniform_baseline(Hz, Hi, seed)),
                       "baseline_gaussian": _stats(M.simaou_gaussian_baseline(Hz, Hi, seed))},
            "simam": {"icl_ft": _stats(M.simam_per_layer(Si, Sf)), "icl_zsl": _stats(M.simam_per_layer(Si, Sz)),
                      "delta": _stats(M.simam_delta_per_layer(Sz, Si, Sf))}}


def _kendall(icl: Prompts, obs_i: Observer, obs_f: Observer, ft: FTRecord, nk: int, seed: int) -> dict:
    """ICL attention over the demonstration tokens vs FT attention over the same (training) tokens, for the
    first ``nk`` test examples: token and example level, FT keyed by q·q (official) and by q·k (dual form)."""
    Q, K = ft.train_queries(), ft.train_keys()  # (L, T_train, H or H_kv, hd)
    if Q.shape[1] != sum(b - a for a, b in icl.demo_spans):
        raise AssertionError("training tokens and demonstration tokens are misaligned")
    K = repeat_kv(K, Q.shape[2] // K.shape[2], dim=2)
    lengths = [b - a for a, b in icl.demo_spans]
    spans = list(zip(np.cumsum([0] + lengths[:-1]), np.cumsum(lengths)))
    icl_tok = [M.softmax(obs_i.obs[j].s_demo) for j in range(nk)]
    ft_qq = [M.softmax(np.einsum("lhd,lthd->lt", obs_f.obs[j].q, Q)) for j in range(nk)]
    ft_qk = [M.softmax(np.einsum("lhd,lthd->lt", obs_f.obs[j].q, K)) for j in range(nk)]
    per_demo = lambda xs: [M.sum_per_span(x, spans) for x in xs]  # noqa: E731
    return {
        "token_qq": _stats(M.kendall_per_layer(icl_tok, ft_qq)),
        "token_qk": _stats(M.kendall_per_layer(icl_tok, ft_qk)),
        "example_qq": _stats(M.kendall_per_layer(per_demo(icl_tok), per_demo(ft_qq))),
        "example_qk": _stats(M.kendall_per_layer(per_demo(icl_tok), per_demo(ft_qk))),
        "random_token": _stats(M.kendall_random_baseline(icl_tok, seed)),
        "random_example": _stats(M.kendall_random_baseline(per_demo(icl_tok), seed)),
        "n_examples": nk,
    }


def config_dict(cfg: CompareConfig) -> dict:
    d = asdict(cfg)
    d["lr_grid"] = list(d["lr_grid"])
    return d


@dataclass
class CompareJob:
    """What ``iclgd compare`` runs: every task × seed of one model, and optionally its untrained control."""

    model: str = "smollm2-135m"
    task: str = "sst2"  # a name, a comma list or 'all'
    seeds: list[int] = field(default_factory=lambda: [1])
    n_test: int | None = None
    untrained: bool = False
    task_spec: Path | None = None  # or one user task
    data_dir: Path | None = None
    dtype: str = "float32"
    device: str = "cpu"
    bos: str | None = None  # the prompts' start token: None for the model's, or a token
    compare: CompareConfig = field(default_factory=CompareConfig)


@dataclass
class TaskResult:
    """One task's outcome: ``doc`` is its results.json, ``records`` its records.jsonl."""

    doc: dict
    records: list[dict]
    subdir: str  # where it goes under --out: "" for a single task, else the task's name


UNTRAINED_RECIPE = ("attention and MLP weights ~ N(0, initializer_range^2), biases 0; embeddings, norms, "
                    "unembedding kept")


def run(job: CompareJob, progress: bool = True) -> Iterator[TaskResult]:
    """The tasks' results, one task at a time (so each can be written as it finishes). The options and the
    data are checked here, before any model is loaded; the models load when the first task is asked for."""
    if not job.seeds:
        raise IclgdError("--seeds: expected a comma list of integers, e.g. 1,2,3")
    datas, ddir = load_tasks(job.task, job.task_spec, job.data_dir, job.n_test)
    return _run(job, datas, ddir, progress)


def _run(job: CompareJob, datas: list[TaskData], ddir, progress: bool) -> Iterator[TaskResult]:
    lm = load_model(job.model, dtype=job.dtype, device=job.device, bos=job.bos)
    control_lm = None
    if job.untrained:
        control_lm = load_model(job.model, dtype=job.dtype, device=job.device, bos=job.bos)
        reinit_untrained(control_lm, seed=0)
    for data in datas:
        t0 = time.time()
        results, records, phases = [], [], []
        for s in job.seeds:
            r, rec, ph = compare_seed(lm, data, job.compare, s, progress)
            results.append(r), records.extend(rec), phases.append(ph)
        control = ([compare_seed(control_lm, data, job.compare, s, progress)[0] for s in job.seeds]
                   if control_lm else None)
        doc = {
            "kind": "iclgd.compare",
            "config": {"model": job.model, "model_source": lm.source, "model_type": lm.model_type, "dtype": job.dtype,
                       "device": job.device, "start_token": lm.start, "task": data.spec.to_dict(), "seeds": job.seeds, "n_test": job.n_test,
                       "data_dir": str(ddir) if ddir else "hf-hub", **config_dict(job.compare),
                       "untrained_control": job.untrained,
                       "untrained_recipe": UNTRAINED_RECIPE if job.untrained else None},
            "versions": library_versions(),
            "data_sha256": data.files,
            "deviations": lm.start_deviations() + data.deviations,
            "seeds": results,
            "aggregate": M.aggregate(results),
            "untrained": {"seeds": control, "aggregate": M.aggregate(control)} if control else None,
            "timing": {"phases_s": phases, "wall_s": round(time.time() - t0, 1)},
        }
        yield TaskResult(doc, records, "" if len(datas) == 1 else data.spec.name)


def write(result: TaskResult, out) -> Path:
    """results.json and records.jsonl of one task, atomically; returns the results.json path."""
    d = Path(out) / result.subdir
    atomic_write_json(d / "results.json", result.doc)
    atomic_write_jsonl(d / "records.jsonl", result.records)
    return d / "results.json"
