"""``iclgd eval``: ZSL and ICL accuracy with a full, atomic record of how the numbers were obtained."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from iclgd.core import options as O
from iclgd.core.models import LoadedModel, as_loaded, model_name, run_versions
from iclgd.core.tasks import load_tasks
from iclgd.engine.scoring import (EvalConfig, evaluate, one_class_warnings, resolve_batch_size, score_split,
                                  separator_deviation)
from iclgd.experiments.protocol import Experiment, Result, UnitKind, writing


@dataclass
class EvalJob:
    """What ``iclgd eval`` runs: one model on every requested task, with the engine's settings."""

    model: str | LoadedModel = O.model_field()  # a name or folder (loaded with dtype, device, bos), or a loaded model
    task: str = O.tasks_field()
    task_spec: Path | None = O.task_spec_field()
    seeds: list[int] = O.seeds_field(help="demonstration seeds: one seed or a comma list of distinct seeds, e.g. "
                                          "1,2,3 (one ICL run each; ZSL once)", old="--seed")
    n_test: int | None = O.n_test_field(help="evaluate only the first N test examples (after the seed-1 shuffle)")
    eval: EvalConfig = O.nested(EvalConfig)
    data_dir: Path | None = O.data_dir_field()
    dtype: str = O.dtype_field()
    device: str = O.device_field()
    bos: str | None = O.bos_field(allow_none=True)  # None for the model's, 'none', or a token

    def __post_init__(self):
        O.validate(self)
        self.eval = replace(self.eval, seed=self.seeds[0])


def run(job: EvalJob, progress: bool = True) -> dict:
    """Evaluate every requested task; the results document (config, provenance, per-task results)."""
    datas, ddir = load_tasks(job.task, job.task_spec, job.data_dir, job.n_test)
    t0 = time.time()
    lm = as_loaded(job.model, dtype=job.dtype, device=job.device, bos=job.bos, need_layout=False)  # no layout needed
    results, files, deviations = [], {}, lm.start_deviations() + separator_deviation(job.eval.separator)
    seeds = job.seeds
    for d in datas:
        zsl = score_split(lm, d, job.eval, icl=False, progress=progress)  # the same for every seed
        for s in seeds:
            results.append(evaluate(lm, d, replace(job.eval, seed=s), progress=progress, zsl=zsl))
        files.update(d.files)
        deviations += d.deviations
    return {
        "kind": "iclgd.eval",
        "config": {"model": model_name(job.model), "model_source": lm.source, "model_type": lm.model_type,
                   "dtype": lm.dtype, "device": lm.device, "start_token": lm.start, "n_test": job.n_test, "data_dir": str(ddir) if ddir else "hf-hub",
                   "tasks": [d.spec.to_dict() for d in datas], "prediction": "argmax of mean label-token log-prob",
                   **{k: v for k, v in asdict(job.eval).items() if k != "seed"}, "seeds": seeds, "batch_size_applied": resolve_batch_size(lm, job.eval.batch_size)},
        "versions": run_versions(),
        "data_sha256": files,
        "deviations": deviations,
        "results": results,
        "warnings": [w for r in results for w in one_class_warnings(
            {**({"zsl": r["zsl_pred_counts"]} if r.get("seed") == seeds[0] else {}), "icl": r["icl_pred_counts"]},
            f"task {r['task']}, seed {r.get('seed')}",
            next(d.spec.label_words for d in datas if d.spec.name == r["task"]))]
            + [w for r in results for w in r.get("prompt_warnings", [])],
        "timing": {"finished_unix": round(time.time()), "wall_s": round(time.time() - t0, 1)},
    }


class EvalResult(Result):
    """``iclgd eval``'s results.json: ZSL and ICL accuracy per task and seed, with the majority baseline."""

    kind = "iclgd.eval"

    @property
    def doc(self) -> dict:
        return self.docs["results.json"]

    @staticmethod
    def baseline_of(metric: str, condition) -> tuple[str, object] | None:
        return ("acc", "majority") if metric == "acc" and condition != "majority" else None

    def rows(self) -> list[dict]:
        out = []
        for r in self.doc["results"]:
            base = {"task": r["task"], "seed": r.get("seed")}
            out += [{**base, "condition": c, "layer": None, "metric": "acc", "value": r[key]}
                    for c, key in (("zsl", "acc_zsl"), ("icl", "acc_icl"), ("majority", "majority_baseline"))]
        return out


def run_in(job: EvalJob, out=None, overwrite: bool = False, progress: bool = True) -> EvalResult:
    """:func:`run`, written to ``out`` when given (an earlier run's results are refused unless ``overwrite``)."""
    with writing(out, "eval", job, overwrite):
        res = EvalResult({"results.json": run(job, progress=progress)})
        if out is not None:
            res.write(Path(out))
    return res


# ----------------------------------------------------------------------------- as sweep units (iclgd reproduce)

def eval_unit(icl: bool):
    def run(p: dict, models, data_dir, progress: bool) -> dict:
        from iclgd.core.tasks import load_task, resolve_data_dir, resolve_task
        from iclgd.engine.scoring import EvalConfig, score_split

        data = load_task(resolve_task(p["task"]), resolve_data_dir(data_dir), p["n_test"])
        lm = models.get("trained")
        cfg = EvalConfig(k=p.get("k", 0), seed=p.get("seed", 0), batch_size=models.cfg.batch_size)
        t0 = time.time()
        res = score_split(lm, data, cfg, icl=icl, progress=progress)
        return {"result": res, "start_token": lm.start, "data_sha256": data.files,
                "deviations": lm.start_deviations() + data.deviations,
                "_timing": {"scoring": round(time.time() - t0, 2)}}

    return run


UNITS = (UnitKind("zsl", eval_unit(icl=False), cost=lambda p: (p.get("n_test") or 200) / 2),
         UnitKind("icl", eval_unit(icl=True), cost=lambda p: p.get("n_test") or 200))


EXPERIMENTS = (Experiment("eval", EvalJob, run_in, EvalResult, UNITS),)
