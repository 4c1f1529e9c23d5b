"""``iclgd eval``: ZSL and ICL accuracy with a full, atomic record of how the numbers were obtained."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from iclgd.core.io import atomic_write_json, library_versions
from iclgd.core.models import load_model
from iclgd.core.tasks import load_tasks
from iclgd.engine.scoring import EvalConfig, evaluate


def run_eval(model: str, task: str, task_spec: Path | None = None, k: int = 32, seed: int = 1,
             n_test: int | None = None, balanced: bool = False, separator: str = "\n", max_len: int = 2048,
             batch_size: int = 8, data_dir: Path | None = None, dtype: str = "float32", device: str = "cpu",
             out: Path | None = None, progress: bool = True, bos: str | None = None) -> list[dict]:
    """Evaluate every requested task; write ``out/results.json`` atomically; return the summary rows."""
    datas, ddir = load_tasks(task, task_spec, data_dir, n_test)
    specs = [d.spec for d in datas]
    cfg = EvalConfig(k=k, seed=seed, balanced=balanced, separator=separator, max_len=max_len, batch_size=batch_size)
    t0 = time.time()
    lm = load_model(model, dtype=dtype, device=device, bos=bos, need_layout=False)  # accuracy needs no layout
    results, files, deviations = [], {}, lm.start_deviations()
    for d in datas:
        results.append(evaluate(lm, d, cfg, progress=progress))
        files.update(d.files)
        deviations += d.deviations
    if out is not None:
        atomic_write_json(Path(out) / "results.json", {
            "kind": "iclgd.eval",
            "config": {"model": model, "model_source": lm.source, "model_type": lm.model_type, "dtype": dtype,
                       "device": device, "start_token": lm.start, "n_test": n_test, "data_dir": str(ddir) if ddir else "hf-hub",
                       "tasks": [s.to_dict() for s in specs], "prediction": "argmax of mean label-token log-prob",
                       **asdict(cfg)},
            "versions": library_versions(),
            "data_sha256": files,
            "deviations": deviations,
            "results": results,
            "timing": {"finished_unix": round(time.time()), "wall_s": round(time.time() - t0, 1)},
        })
    return [{k: r[k] for k in ("task", "acc_zsl", "acc_icl", "k_true", "n", "majority_baseline", "zsl_pred_counts",
                               "icl_pred_counts")} for r in results]
