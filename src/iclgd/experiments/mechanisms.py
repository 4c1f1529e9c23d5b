"""``iclgd mechanisms``: the rival accounts of ICL beside the implicit-GD metrics, on the same model, demonstrations
and test rows as ``iclgd compare`` (definitions: :mod:`iclgd.engine.mechanisms`, docs/mechanisms.md).

Per (model, task, seed): compare's unit (ZSL, ICL, FT, SimAOU, ΔW_ICL vs ΔW_FT per head); the task vector (its
accuracy at the layer chosen on a dev split, the dev curve over layers); the function vector (each head's causal
indirect effect on label-shuffled prompts, the accuracy at the layer and head count chosen on dev); the link to the
dual form (per layer, the cosine of the demonstrations' effect on the attention output with ΔW_ICL q; whether the
heads of largest indirect effect are those where ΔW_ICL and ΔW_FT agree most); and the shuffled-label control of
ICL, the task vector and the function vector. Per model: induction-head scores. The untrained model (the same
re-initialisation as compare's control) runs every figure again.

The dev rows, the dummy queries of the task vector and the queries of the indirect effects are three disjoint draws
(seeded by the run seed) from the demonstration split outside the demonstrations; none is a test row.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from iclgd.core import options as O
from iclgd.core.errors import IclgdError
from iclgd.core.models import LoadedModel, as_loaded, model_name, run_versions
from iclgd.core.tasks import TaskData, load_tasks, sample_demos
from iclgd.experiments.compare import (CompareConfig, CompareResult, ZslCache, compare_deviations, compare_seed,
                                       config_dict, no_start_token)
from iclgd.experiments.protocol import Experiment, UnitKind, writing


@dataclass
class MechanismsConfig:
    """The rival accounts' settings (the demonstrations, test rows and batch size are compare's)."""

    n_dev: int = O.option(32, "dev rows (demonstration split, outside the demonstrations) that choose the task "
                               "vector's and the function vector's layer and head count", check=O.min_int(1))
    n_dummy: int = O.option(8, "dummy queries whose ICL-prompt states are averaged into the task vector",
                            check=O.min_int(1))
    n_cie: int = O.option(8, "label-shuffled prompts on which each head's causal indirect effect is measured (their "
                             "clean versions give the heads' mean outputs)", check=O.min_int(1))
    fv_heads: tuple[int, ...] = O.option((1, 3, 10), "head counts of the function vector tried on dev (the layer is "
                                                      "chosen with the largest first)", parse=O.int_tuple,
                                         check=O.each_at_least(1))
    n_link: int = O.option(32, "test examples of the dual-form alignment (cos of ICL's effect with ΔW_ICL q)",
                           check=O.min_int(1))
    induction_seqs: int = O.option(16, "repeated random sequences of the induction-head scores", check=O.min_int(1))
    induction_len: int | None = O.option(None, "tokens per half of each repeated sequence (default 32, or half the "
                                               "length of the model's training sequences where its config records "
                                               "it, as world models do)", type=int, check=O.min_int(2))

    def __post_init__(self):
        O.validate(self)


@dataclass
class MechanismsJob:
    """What ``iclgd mechanisms`` runs: every task × seed of one model, and its untrained control."""

    model: str | LoadedModel = O.model_field()
    task: str = O.tasks_field()
    task_spec: Path | None = O.task_spec_field()
    seeds: list[int] = O.seeds_field()
    n_test: int | None = O.n_test_field()
    untrained: bool = O.option(True, "the untrained-model control (the same model re-initialised per seed)")
    compare: CompareConfig = O.nested(CompareConfig)
    mechanisms: MechanismsConfig = O.nested(MechanismsConfig)
    data_dir: Path | None = O.data_dir_field()
    dtype: str = O.dtype_field()
    device: str = O.device_field()
    bos: str | None = O.bos_field()

    def __post_init__(self):
        O.validate(self)
        no_start_token(self.bos)


# ----------------------------------------------------------------------------- one (model, task, seed)


def _side_rows(data: TaskData, demos: list[dict], seed: int, sizes: tuple[int, ...]) -> list[list[dict]]:
    """Disjoint draws of the given sizes from the demonstration split outside ``demos`` (seeded by the run seed, a
    stream of its own)."""
    used = {id(d) for d in demos}
    rest = [r for r in data.demo_pool if id(r) not in used]
    if sum(sizes) > len(rest):
        raise IclgdError(f"task {data.spec.name}: the demonstration split has {len(rest)} rows outside the "
                         f"demonstrations; the dev, dummy and indirect-effect rows need {sum(sizes)} "
                         "(lower --n-dev, --n-dummy or --n-cie)")
    order = np.random.default_rng([seed, 27]).permutation(len(rest))
    out, at = [], 0
    for n in sizes:
        out.append([rest[i] for i in order[at: at + n]])
        at += n
    return out


def shuffled_labels(demos: list[dict], seed: int) -> list[dict]:
    """The demonstrations with their labels permuted (a derangement where one exists: no demonstration keeps its
    label by chance when the labels allow it): the label marginal is kept, the input-label mapping broken."""
    rng = np.random.default_rng([seed, 28])
    labels = [d["label"] for d in demos]
    best = None
    for _ in range(100):
        perm = rng.permutation(len(labels))
        kept = sum(labels[p] == l for p, l in zip(perm, labels))
        if best is None or kept < best[0]:
            best = (kept, perm)
        if kept == 0:
            break
    return [{**d, "label": labels[p]} for d, p in zip(demos, best[1])]


def mechanisms_seed(lm: LoadedModel, data: TaskData, job: MechanismsJob, seed: int, progress: bool = False,
                    zsl_cache: ZslCache | None = None, label: str = "") -> tuple[dict, list[dict], dict]:
    """Every figure of one (model, task, seed): (result, per-example records, phase timings). With ``progress``
    a bar over the five phases names the running one; ``label`` ("untrained") marks a control's bar."""
    import torch
    from iclgd.core.progress import bar as progress_bar

    from iclgd.engine import mechanisms as E
    from iclgd.engine.scoring import build_prompts, resolve_batch_size, score_options

    cfg, mc, spec = job.compare, job.mechanisms, data.spec
    times, t = {}, time.perf_counter()
    phases = ("compare", "task_vector", "function_vector", "links", "shuffled_control")
    bar = progress_bar(total=len(phases), desc=f"mechanisms {spec.name} seed {seed}{' ' + label if label else ''}",
                       enabled=bool(progress), leave=False)
    bar.set_postfix_str(phases[0])

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        times[name] = round(now - t, 2)
        t = now
        bar.update(1)
        i = phases.index(name) + 1
        bar.set_postfix_str(phases[i] if i < len(phases) else "done")
        if i == len(phases):
            bar.close()

    bs = resolve_batch_size(lm, cfg.batch_size)
    comp, comp_records, _ = compare_seed(lm, data, cfg, seed, progress, zsl_cache, label=label)
    lap("compare")

    def prompts(ds: list[dict], rows: list[dict]):  # compare already warned about these prompts' length
        return build_prompts(lm, spec, ds, rows, cfg.separator, cfg.max_len, log_warnings=False)

    demos = sample_demos(data.demo_pool, cfg.k, seed, cfg.balanced, len(spec.label_words))
    icl = prompts(demos, data.eval_rows)
    demos = icl.demos  # those that fit, as compare uses them
    zsl = prompts([], data.eval_rows)
    dev_rows, dummy_rows, cie_rows = _side_rows(data, demos, seed, (mc.n_dev, mc.n_dummy, mc.n_cie))
    zsl_dev = prompts([], dev_rows)
    test, dev = list(range(len(zsl.labels))), list(range(len(dev_rows)))
    acc_zsl_dev = E.accuracy(E.score_patched(lm, zsl_dev, dev, batch_size=bs), zsl_dev.labels)

    def tv_figures(ds: list[dict]) -> dict:
        theta = E.task_vectors(lm, prompts(ds, dummy_rows), bs)
        curve = E.layer_curve(lm, zsl_dev, dev, theta, "replace", bs)
        L = E.best_index(curve)
        sc = E.score_patched(lm, zsl, test, L, theta[L], "replace", bs)
        return {"layer": L, "acc": E.accuracy(sc, zsl.labels), "dev_curve": curve, "dev_zsl": acc_zsl_dev}, sc

    tv, tv_scores = tv_figures(demos)
    lap("task_vector")
    shuffled = shuffled_labels(demos, seed)

    def fv_figures(clean_demos: list[dict]) -> dict:
        clean = prompts(clean_demos, cie_rows)
        heads = E.last_position_acts(lm, clean, list(range(len(cie_rows))), ("attn_heads",), bs)["attn_heads"]
        H, _, hd = lm.head_counts()
        mean_heads = heads.mean(0).view(lm.n_layers, H, hd)  # (L, H, d_head)
        a_bar = E.head_outputs(lm, heads).mean(0)  # (L, H, d_model)
        corrupted = prompts(shuffled, cie_rows)
        cie = E.causal_indirect_effects(lm, corrupted, mean_heads, bs)  # (L, H)
        grid = sorted({min(h, lm.n_layers * H) for h in mc.fv_heads}, reverse=True)
        vec = lambda h: sum(a_bar[l, j] for l, j in E.top_heads(cie, h))  # noqa: E731
        curve = E.layer_curve(lm, zsl_dev, dev, torch.stack([vec(grid[0])] * lm.n_layers), "add", bs)
        L = E.best_index(curve)
        by_h = [E.accuracy(sc, zsl_dev.labels) for sc in E.patched_scores(lm, zsl_dev, dev,
                                                                          [(L, vec(h), "add") for h in grid], bs)]
        h = grid[E.best_index(by_h)]
        sc = E.score_patched(lm, zsl, test, L, vec(h), "add", bs)
        return {"layer": L, "n_heads": h, "acc": E.accuracy(sc, zsl.labels), "dev_curve": curve,
                "dev_curve_heads": grid[0], "dev_by_heads": dict(zip(map(str, grid), by_h)),
                "top_heads": [list(x) for x in E.top_heads(cie, max(grid))],
                "cie_per_head": [[round(float(x), 6) for x in row] for row in cie]}, sc, cie

    fv, fv_scores, cie = fv_figures(demos)
    lap("function_vector")
    n_link = min(mc.n_link, len(test))
    link = E.dual_form_alignment(lm, icl, zsl, test[:n_link], bs, torch.Generator().manual_seed(seed))
    link_doc = {"cos_effect_dw_q": _per_layer(link["cos_delta_dw_q"]), "cos_random": _per_layer(link["cos_random"]),
                "n_examples": n_link}
    upd = comp.get("updates") or {}
    if upd.get("per_head", {}).get("cos_dW") is not None:
        link_doc["cie_vs_cos_dW"] = head_agreement(cie.numpy(), np.asarray(upd["per_head"]["cos_dW"], dtype=float))
    lap("links")
    # the shuffled-label control: ICL, the task vector and the function vector built from shuffled demonstrations
    icl_sh = prompts(shuffled, data.eval_rows)
    acc_icl_sh = E.accuracy(score_options(lm, icl_sh, bs), icl_sh.labels)
    tv_sh, _ = tv_figures(shuffled)
    fv_sh = fv_figures(shuffled)[0]
    lap("shuffled_control")
    labels = np.asarray(zsl.labels)
    result = {"seed": seed, "n": len(test), "k_true": icl.k_true, "demo_idx": comp["demo_idx"],
              "acc": {**comp["acc"], "task_vector": tv["acc"], "function_vector": fv["acc"]},
              "simaou": comp["simaou"], "updates": {k: v for k, v in upd.items() if k != "per_head"} if upd else None,
              "task_vector": tv, "function_vector": fv, "link": link_doc,
              "shuffled_labels": {"acc_icl": acc_icl_sh, "acc_task_vector": tv_sh["acc"],
                                  "acc_function_vector": fv_sh["acc"], "task_vector": tv_sh, "function_vector": fv_sh},
              "side_rows": {"dev_idx": [r.get("idx") for r in dev_rows], "dummy_idx": [r.get("idx") for r in dummy_rows],
                            "cie_idx": [r.get("idx") for r in cie_rows]},
              **({"prompt_warnings": comp["prompt_warnings"]} if comp.get("prompt_warnings") else {}),
              "pred_counts": {**comp["pred_counts"], "task_vector": np.bincount(tv_scores.argmax(1), minlength=len(spec.label_words)).tolist(),
                              "function_vector": np.bincount(fv_scores.argmax(1),
                                                             minlength=len(spec.label_words)).tolist()}}
    records = [{**r, "tv_pred": int(tv_scores[j].argmax()), "fv_pred": int(fv_scores[j].argmax()),
                "label": int(labels[j])} for j, r in enumerate(comp_records)]
    return result, records, times


def _per_layer(x: np.ndarray) -> dict:
    x = np.asarray(x, dtype=float)
    return {"overall": float(np.nanmean(x)), "per_layer": [round(float(v), 6) for v in x]}


def head_agreement(cie: np.ndarray, cos_dw: np.ndarray, top: int = 10) -> dict:
    """Whether the heads of largest indirect effect are where ΔW_ICL and ΔW_FT agree most: Spearman's ρ over the
    heads (defined ones), and the overlap of the two top-``top`` sets with its chance level top²/n_heads."""
    from scipy.stats import spearmanr

    a, b = cie.ravel(), cos_dw.ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    top = min(top, int(ok.sum()))
    if ok.sum() < 3:
        return {"spearman": None, "top_overlap": None, "chance_overlap": None, "n_heads": int(ok.sum())}
    idx = np.flatnonzero(ok)
    ta = set(idx[np.argsort(-a[ok])[:top]])
    tb = set(idx[np.argsort(-b[ok])[:top]])
    rho = spearmanr(a[ok], b[ok]).statistic
    return {"spearman": float(rho), "top": top, "top_overlap": len(ta & tb), "chance_overlap": top * top / ok.sum(),
            "n_heads": int(ok.sum())}


# ----------------------------------------------------------------------------- the job


def run(job: MechanismsJob, progress: bool = True):
    datas, ddir = load_tasks(job.task, job.task_spec, job.data_dir, job.n_test)
    return _run(job, datas, ddir, progress)


def _run(job: MechanismsJob, datas, ddir, progress: bool):
    from iclgd.core import metrics as M
    from iclgd.engine.finetune import reinit_untrained
    from iclgd.engine.induction import induction_scores
    from iclgd.engine.scoring import one_class_warnings, resolve_batch_size
    from iclgd.experiments.compare import TaskResult

    lm = as_loaded(job.model, dtype=job.dtype, device=job.device, bos=job.bos)
    mc = job.mechanisms
    ind = induction_scores(lm, n_seq=mc.induction_seqs, seq_len=mc.induction_len, seed=0)
    control_lm = None
    if job.untrained:
        control_lm = (copy.deepcopy(lm) if isinstance(job.model, LoadedModel)
                      else as_loaded(job.model, dtype=job.dtype, device=job.device, bos=job.bos))
    zsl_cache = ZslCache()
    for data in datas:
        t0 = time.time()
        results, records, phases = [], [], []
        for s in job.seeds:
            r, rec, ph = mechanisms_seed(lm, data, job, s, progress, zsl_cache)
            results.append(r), records.extend({"condition": "trained", **x} for x in rec), phases.append(ph)
        control = None
        if control_lm is not None:
            control = []
            for s in job.seeds:
                reinit_untrained(control_lm, seed=s, what=job.compare.untrained_reinit)
                c, crec, _ = mechanisms_seed(control_lm, data, job, s, progress, label="untrained")
                records.extend({"condition": "untrained", **x} for x in crec)
                c["induction"] = _induction_doc(induction_scores(control_lm, n_seq=mc.induction_seqs,
                                                                 seq_len=mc.induction_len, seed=0))
                control.append({**c, "untrained_init_seed": s})
        doc = {
            "kind": "iclgd.mechanisms",
            "config": {"model": model_name(job.model), "model_source": lm.source, "model_type": lm.model_type,
                       "dtype": lm.dtype, "device": lm.device, "start_token": lm.start, "task": data.spec.to_dict(),
                       "seeds": job.seeds, "n_test": job.n_test, "data_dir": str(ddir) if ddir else "hf-hub",
                       **config_dict(job.compare), **{k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in asdict(mc).items()},
                       "untrained_control": job.untrained,
                       "batch_size_applied": resolve_batch_size(lm, job.compare.batch_size)},
            "versions": run_versions(),
            "data_sha256": data.files,
            "deviations": lm.start_deviations() + data.deviations + compare_deviations(job.compare),
            "induction": _induction_doc(ind),
            "seeds": results,
            "aggregate": _aggregate(results, M),
            "untrained": {"seeds": control, "aggregate": _aggregate(control, M)} if control else None,
            "warnings": [w for r in results for w in one_class_warnings(
                r["pred_counts"], f"task {data.spec.name}, seed {r['seed']}", data.spec.label_words)]
            + [w for r in results for w in r.get("prompt_warnings", [])],
            "timing": {"phases_s": phases, "wall_s": round(time.time() - t0, 1)},
        }
        yield TaskResult(doc, records, "" if len(datas) == 1 else data.spec.name)


TABLE = (("acc", "zsl"), ("acc", "icl"), ("acc", "ft"), ("acc", "task_vector"), ("acc", "function_vector"),
         ("shuffled_labels", "acc_icl"), ("shuffled_labels", "acc_task_vector"),
         ("shuffled_labels", "acc_function_vector"), ("simaou", "overall"), ("link", "cos_effect_dw_q"))


def _aggregate(results: list[dict], M) -> dict:
    """Mean and 95% bootstrap CI over seeds of every figure of the table (iclgd.core.metrics.aggregate's rule)."""
    return M.aggregate_paths(results, [f"{a}.{b}" for a, b in TABLE])


def _induction_doc(ind: dict) -> dict:
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in ind.items()}


class MechanismsResult(CompareResult):
    """``iclgd mechanisms``' files: per task a results.json and its records.jsonl (the layout of compare's, whose
    tidy rows it shares: trained and untrained seeds, the table's figures)."""

    kind = "iclgd.mechanisms"

    def numbers(self, r: dict) -> dict:
        return {k: r[k] for k in ("acc", "shuffled_labels", "simaou", "link") if k in r}


def run_in(job: MechanismsJob, out=None, overwrite: bool = False, progress: bool = True) -> MechanismsResult:
    from iclgd.experiments.compare import write

    tasks = []
    with writing(out, "mechanisms", job, overwrite):
        for r in run(job, progress=progress):
            tasks.append(r)
            if out is not None:
                write(r, out)
    return MechanismsResult.of(tasks)


# ----------------------------------------------------------------------------- as sweep units (iclgd reproduce)

def mechanisms_unit(p: dict, models, data_dir, progress: bool) -> dict:
    """One (task, seed) of the trained model or its untrained control, with the model's induction scores."""
    from iclgd.core.tasks import load_task, resolve_data_dir, resolve_task
    from iclgd.engine.finetune import reinit_untrained
    from iclgd.engine.induction import induction_scores

    data = load_task(resolve_task(p["task"]), resolve_data_dir(data_dir), p["n_test"])
    lm = models.get("untrained" if p["untrained"] else "trained")
    job = MechanismsJob(model=lm, task=p["task"], seeds=[p["seed"]], n_test=p["n_test"],
                        compare=CompareConfig(k=p["k"], batch_size=models.cfg.batch_size))
    if p["untrained"]:
        reinit_untrained(lm, seed=p["seed"])
    mc = job.mechanisms
    t0 = time.time()
    ind = _induction_doc(induction_scores(lm, n_seq=mc.induction_seqs, seq_len=mc.induction_len, seed=0))
    result, _, phases = mechanisms_seed(lm, data, job, p["seed"], progress, None if p["untrained"] else models.zsl,
                                        label="untrained" if p["untrained"] else "")
    result["induction"] = ind
    if p["untrained"]:
        result["untrained_init_seed"] = p["seed"]
    return {"result": result, "data_sha256": data.files,
            "deviations": lm.start_deviations() + data.deviations + compare_deviations(job.compare),
            "_timing": {**phases, "induction": round(time.time() - t0 - sum(phases.values()), 2)}}


UNITS = (UnitKind("mechanisms", mechanisms_unit, cost=lambda p: 5 * (p.get("n_test") or 200)),)


EXPERIMENTS = (Experiment("mechanisms", MechanismsJob, run_in, MechanismsResult, UNITS),)
