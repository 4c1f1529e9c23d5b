"""``iclgd eval``: ZSL and ICL accuracy with a full, atomic record of how the numbers were obtained."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from iclgd.core.io import atomic_write_json
from iclgd.core.models import LoadedModel, as_loaded, model_name, run_versions
from iclgd.core.tasks import load_tasks
from iclgd.engine.scoring import EvalConfig, evaluate, resolve_batch_size, score_split
from iclgd.experiments.protocol import Result

SUMMARY = ("task", "seed", "acc_zsl", "acc_icl", "k_true", "n", "majority_baseline", "zsl_pred_counts", "icl_pred_counts")


@dataclass
class EvalJob:
    """What ``iclgd eval`` runs: one model on every requested task, with the engine's settings."""

    model: str | LoadedModel = "smollm2-135m"  # a name or folder (loaded with dtype, device, bos), or a loaded model
    task: str = "sst2"  # a name, a comma list or 'all'
    task_spec: Path | None = None  # or one user task
    n_test: int | None = None
    data_dir: Path | None = None
    dtype: str = "float32"
    device: str = "auto"
    bos: str | None = None  # the prompts' start token: None for the model's, 'none', or a token
    eval: EvalConfig = field(default_factory=EvalConfig)
    seeds: list[int] | None = None  # demonstration seeds, one ICL run each (None: eval.seed); ZSL is scored once


def run(job: EvalJob, progress: bool = True) -> dict:
    """Evaluate every requested task; the results document (config, provenance, per-task results)."""
    datas, ddir = load_tasks(job.task, job.task_spec, job.data_dir, job.n_test)
    t0 = time.time()
    lm = as_loaded(job.model, dtype=job.dtype, device=job.device, bos=job.bos, need_layout=False)  # no layout needed
    results, files, deviations = [], {}, lm.start_deviations()
    seeds = job.seeds or [job.eval.seed]
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
                   **asdict(job.eval), "seeds": seeds, "batch_size_applied": resolve_batch_size(lm, job.eval.batch_size)},
        "versions": run_versions(),
        "data_sha256": files,
        "deviations": deviations,
        "results": results,
        "timing": {"finished_unix": round(time.time()), "wall_s": round(time.time() - t0, 1)},
    }


def write(doc: dict, out) -> Path:
    path = Path(out) / "results.json"
    atomic_write_json(path, doc)
    return path


def summary_rows(doc: dict) -> list[dict]:
    """One row per task: accuracies, true k, n, the majority baseline and the predictions per class."""
    return [{k: r[k] for k in SUMMARY} for r in doc["results"]]


class EvalResult(Result):
    """``iclgd eval``'s results.json: ZSL and ICL accuracy per task and seed, with the majority baseline."""

    kind = "iclgd.eval"

    @property
    def doc(self) -> dict:
        return self.docs["results.json"]

    def rows(self) -> list[dict]:
        out = []
        for r in self.doc["results"]:
            base = {"task": r["task"], "seed": r.get("seed")}
            out += [{**base, "condition": c, "layer": None, "metric": "acc", "value": r[key]}
                    for c, key in (("zsl", "acc_zsl"), ("icl", "acc_icl"), ("majority", "majority_baseline"))]
        return out
