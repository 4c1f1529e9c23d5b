"""``iclgd reproduce``: the paper's analyses as independent units that resume after any interruption.

A unit is one (model × task × seed) compare (and its untrained control), the model's dual-form check,
the synthetic calibration, or (with ``--momentum``) the momentum study. Each unit writes
``units/<id>/result.json`` atomically (timings go to ``timing.json`` beside it), so after ``kill -9`` at
any moment the same command skips every finished unit and completes the rest with results identical to
an uninterrupted run. ``--shard i/n`` runs every n-th unit starting at i (for job arrays).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from iclgd.errors import IclgdError
from iclgd.io import atomic_write_json, ensure_dir, library_versions


@dataclass(frozen=True)
class Unit:
    id: str
    kind: str
    params: tuple  # sorted (key, value) pairs: hashable, and the unit's full identity

    def p(self) -> dict:
        return dict(self.params)


@dataclass
class SweepConfig:
    model: str = "smollm2-135m"
    tasks: list[str] = field(default_factory=lambda: ["sst2"])
    seeds: list[int] = field(default_factory=lambda: [1])
    n_test: int | None = 200
    k: int = 32
    untrained: bool = True
    dual: bool = True
    synthetic: bool = True
    synthetic_steps: int = 2000
    momentum: bool = False
    momentum_steps: int = 150
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None
    preset: str | None = None


PRESETS = {
    # make demo: offline, <= 15 min on 2 CPU cores
    "demo": dict(tasks=["sst2", "cb"], seeds=[1], n_test=100, k=32, untrained=True, dual=True, synthetic=True,
                 synthetic_steps=1000, momentum=False),
}


def _unit(uid: str, kind: str, **params) -> Unit:
    return Unit(uid, kind, tuple(sorted(params.items())))


def plan(cfg: SweepConfig) -> list[Unit]:
    units = []
    if cfg.dual:
        units.append(_unit(f"dual-{cfg.tasks[0]}", "dual", model=cfg.model, task=cfg.tasks[0], k=8, seed=1,
                           dtype="float64"))
    for task in cfg.tasks:
        for seed in cfg.seeds:
            base = dict(model=cfg.model, task=task, seed=seed, n_test=cfg.n_test, k=cfg.k, dtype=cfg.dtype)
            units.append(_unit(f"compare-{task}-s{seed}", "compare", untrained=False, **base))
            if cfg.untrained:
                units.append(_unit(f"compare-{task}-s{seed}-untrained", "compare", untrained=True, **base))
    if cfg.synthetic:
        units.append(_unit("synthetic-1L", "synthetic", layers=1, steps=cfg.synthetic_steps, seed=1))
    if cfg.momentum:
        units.append(_unit("momentum-tinyshakespeare", "momentum", corpus="tinyshakespeare",
                           seeds=tuple(cfg.seeds), steps=cfg.momentum_steps, eta=0.9))
    return units


def parse_shard(value: str | None) -> tuple[int, int]:
    """``i/n``; without it, ``accelerate launch`` (or torchrun) processes take RANK/WORLD_SIZE as their shard."""
    if not value:
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is not None and world is not None:
            value = f"{rank}/{world}"
        else:
            return 0, 1
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise IclgdError(f"--shard {value!r}: expected i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise IclgdError(f"--shard {value!r}: expected 0 <= i < n")
    return i, n


def read_result(path: Path) -> dict | None:
    """A finished unit's result, None if absent; a damaged file is the user's to know about."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise IclgdError(f"{path}: corrupted result file (not valid JSON); delete it to recompute that unit") from None


class _Models:
    """Loads each model variant once per process, lazily."""

    def __init__(self, cfg: SweepConfig, out: Path):
        self.cfg, self.out, self.cache = cfg, out, {}

    def get(self, variant: str):
        if variant not in self.cache:
            import torch

            from iclgd.finetune import reinit_untrained
            from iclgd.models import load_model

            dtype = "float32" if variant == "dual" else self.cfg.dtype
            device = self.cfg.device
            if device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per launched process
                device = f"cuda:{os.environ['LOCAL_RANK']}"
            lm = load_model(self.cfg.model, dtype=dtype, device=device, device_map=self.cfg.device_map)
            if variant == "untrained":
                reinit_untrained(lm, seed=0)
            if variant == "dual":
                lm.model.to(torch.float64)
            self.cache[variant] = lm
        return self.cache[variant]


def run_unit(unit: Unit, models: _Models, data_dir, progress: bool) -> dict:
    p = unit.p()
    from iclgd.tasks import load_task, resolve_data_dir, resolve_task

    if unit.kind == "compare":
        from iclgd.compare import CompareConfig, compare_seed

        from iclgd.compare import compare_deviations
        from iclgd.finetune import reinit_untrained

        data = load_task(resolve_task(p["task"]), resolve_data_dir(data_dir), p["n_test"])
        lm = models.get("untrained" if p["untrained"] else "trained")
        cfg = CompareConfig(k=p["k"])
        if p["untrained"]:  # the control's init follows the run seed, so its CI includes init variance
            reinit_untrained(lm, seed=p["seed"])
        result, _, phases = compare_seed(lm, data, cfg, p["seed"], progress)
        if p["untrained"]:
            result["untrained_init_seed"] = p["seed"]
        return {"result": result, "data_sha256": data.files, "deviations": data.deviations + compare_deviations(cfg),
                "_timing": phases}
    if unit.kind == "dual":
        from iclgd import dual

        lm = models.get("dual")
        ids, span, meta = dual.icl_prompt(lm, p["task"], p["k"], p["seed"], data_dir)
        rows = dual.verify_layers(lm, ids, span)
        table = dual.per_layer(rows)
        return {"per_layer": table, "meta": {k: v for k, v in meta.items() if k != "files"}, "data_sha256": meta["files"],
                "summary": dual.summarize(rows, table)}
    if unit.kind == "synthetic":
        from iclgd import synthetic as S

        r = S.run(layers=p["layers"], steps=p["steps"], seed=p["seed"], progress=progress)
        r.pop("_sens")
        return r
    if unit.kind == "momentum":
        from iclgd.momentum_study import compare_attention

        doc = compare_attention(p["corpus"], list(p["seeds"]), p["eta"], models.out / "momentum", steps=p["steps"],
                                data_dir=data_dir, progress=progress)
        return {k: doc[k] for k in ("config", "summary", "runs")}
    raise AssertionError(unit.kind)


def reproduce(cfg: SweepConfig, out, data_dir=None, shard: str | None = None, progress: bool = True) -> dict:
    """Run this shard's unfinished units; then (re)write the report from every finished unit."""
    from tqdm.auto import tqdm

    from iclgd.tasks import parse_task_list

    cfg.tasks = parse_task_list(",".join(cfg.tasks))
    if not cfg.seeds:
        raise IclgdError("--seeds: expected a comma list of integers, e.g. 1,2,3")
    out = ensure_dir(out)
    i, n = parse_shard(shard)
    units = plan(cfg)
    mine = units[i::n]
    sweep_doc = {"kind": "iclgd.reproduce", "config": {k: v for k, v in vars(cfg).items()},
                 "units": [u.id for u in units], "versions": library_versions()}
    sweep_file = out / "sweep.json"
    old = read_result(sweep_file)
    if old is not None and old["config"] != json.loads(json.dumps(sweep_doc["config"])):
        raise IclgdError(f"{sweep_file}: this folder holds a sweep with another configuration; use another --out")
    atomic_write_json(sweep_file, sweep_doc)
    models = _Models(cfg, out)
    done = skipped = 0
    for unit in tqdm(mine, desc="units", disable=not progress):
        d = out / "units" / unit.id
        prev = read_result(d / "result.json")
        if prev is not None and prev.get("unit", {}).get("params") == json.loads(json.dumps(unit.p())):
            skipped += 1
            continue
        t0 = time.time()
        res = run_unit(unit, models, data_dir, progress)
        timing = res.pop("_timing", None)
        atomic_write_json(d / "result.json", {"unit": {"id": unit.id, "kind": unit.kind, "params": unit.p()}, **res})
        atomic_write_json(d / "timing.json", {"wall_s": round(time.time() - t0, 2), "phases_s": timing,
                                              "finished_unix": round(time.time())})
        done += 1
    from iclgd.report import write_report

    report = write_report(out)
    return {"units": len(units), "this_shard": len(mine), "ran": done, "skipped": skipped, "report": str(report)}
