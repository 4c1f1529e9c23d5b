"""``iclgd reproduce``: the paper's analyses as independent units that resume after any interruption.

A unit is one (model × task × seed) compare (and its untrained control), the model's dual-form check,
the synthetic calibration, or (with ``--momentum``) the momentum study. Each unit writes
``units/<id>/result.json`` atomically (timings go to ``timing.json`` beside it), so after ``kill -9`` at
any moment the same command skips every finished unit and completes the rest with results identical to
an uninterrupted run. Processes of one sweep (``--shard i/n``, job arrays, ``accelerate launch``) share one
queue: each takes the longest unclaimed unit first and claims it through a lock file in its folder, so no
two run the same unit and they finish together; the process that finds every unit finished writes the report.
"""

from __future__ import annotations

import json
import os
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from iclgd.core import options as O
from iclgd.core.errors import IclgdError
from iclgd.core.io import atomic_write_json, library_versions, read_result


@dataclass(frozen=True)
class Unit:
    id: str
    kind: str
    params: tuple  # sorted (key, value) pairs: hashable, and the unit's full identity

    def p(self) -> dict:
        return dict(self.params)


def _shown(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _preset(flag: str, value) -> None:
    if value is not None and value not in PRESETS:
        raise IclgdError(f"{flag} {value!r}: expected one of {', '.join(PRESETS)}")


def _task_names(flag: str, value) -> list[str]:
    return [t for t in value.split(",") if t.strip()] if isinstance(value, str) else list(value)


@dataclass
class SweepConfig:
    """``iclgd reproduce``: the paper's analyses as resumable units (model x task x seed), recorded in sweep.json."""

    model: str = O.model_field()
    tasks: list[str] = O.option(help="task name, comma list or 'all'", factory=lambda: ["all"], name="--tasks",
                                aliases=("--task",), parse=_task_names, type=str)
    seeds: list[int] = O.seeds_field(help="one seed or a comma list of distinct seeds (one compare unit per task and "
                                          "seed)")
    n_test: int | None = O.n_test_field(200, "test examples per task (>= 1)")
    k: int = O.k_field(32, 1, "demonstrations (>= 1)")
    untrained: bool = O.option(True, "the untrained-model control units")
    dual: bool = O.option(True, "the dual-form check unit")
    mechanisms: bool = O.option(False, "the rival accounts per task and seed: task vector, function vector, "
                                       "induction heads (iclgd mechanisms; minutes per unit)")
    synthetic: bool = O.option(True, "the synthetic calibration unit")
    synthetic_steps: int = O.option(2000, "training steps of the synthetic unit", cli=False,
                                    applies=("synthetic", (True,)))
    momentum: bool = O.option(False, "also train vanilla vs momentum LMs (minutes per seed)")
    momentum_steps: int = O.option(150, "training steps of each momentum run", cli=False,
                                   applies=("momentum", (True,)))
    dtype: str = O.dtype_field()
    device: str = O.device_field()
    device_map: str | None = O.option(None, "'auto': spread a large model over the GPUs (HF Accelerate; needs "
                                            "--device cuda)", type=str)
    bos: str | None = O.bos_field()  # the prompts' start token; None: the model's
    preset: str | None = O.option(None, "demo: sst2 and cb, 100 test examples, one seed, a 4-layer ICL-world model "
                                        "compared on 4 tasks (<= 15 min on 2 cores); world: the ICL world's three "
                                        "experiments on models trained here (<= 45 min)", type=str, check=lambda f, v: _preset(f, v))
    world: bool = O.option(False, "the ICL-world experiments (iclgd.experiments.world)", cli=False)
    world_size: str = O.option("demo", "the world models' size", cli=False, applies=("world", (True,)))
    world_tasks: int | None = O.option(None, "evaluation tasks each world model is compared on (None: one per seed)",
                                       cli=False, applies=("world", (True,)))
    world_momentum: bool = O.option(True, "the world's momentum experiment", cli=False, applies=("world", (True,)))
    world_along: bool = O.option(True, "the world's metrics-along-training experiment", cli=False,
                                 applies=("world", (True,)))
    eval_only: bool = O.option(False, "ZSL/ICL accuracy units (one ZSL per task, one ICL per task and seed) "
                                      "instead of compare units; any causal LM")
    batch_size: int | str = O.batch_size_field()  # prompts scored per forward pass

    def __post_init__(self):
        O.validate(self)
        from iclgd.experiments.compare import no_start_token

        no_start_token(self.bos)

    def apply_preset(self, name: str) -> None:
        """Overwrite the fields a preset sets (see :data:`PRESETS`)."""
        if name not in PRESETS:
            raise IclgdError(f"--preset {name!r}: expected one of {', '.join(PRESETS)}")
        fields = {f.name: f for f in dataclasses.fields(self)}
        for key, v in PRESETS[name].items():  # an option set away from its default is never silently overridden
            given = getattr(self, key)
            if given != O.default_of(fields[key]) and given != v:
                raise IclgdError(f"{O.flag_of(fields[key])} {_shown(given)}: --preset {name} sets it to {_shown(v)}; "
                                 "drop one of the two")
        for key, v in PRESETS[name].items():
            setattr(self, key, v)
        self.preset = name


PRESETS = {
    # make demo: offline, <= 15 min on 2 CPU cores
    # its world model: 4 layers, 8,000 steps, ICL >= 0.9 on 3 of 3 seeds (README), compared on 4 tasks
    "demo": dict(tasks=["sst2", "cb"], seeds=[1], n_test=100, k=32, untrained=True, dual=True, synthetic=True,
                 synthetic_steps=1000, momentum=False, world=True, world_momentum=False, world_along=False,
                 world_size="deep", world_tasks=4),
    # the ICL world's three experiments (<= 45 min on 2 CPU cores): models trained here, no SmolLM2
    # k = 7: a training sequence holds 8 pairs, so 7 demonstrations and the query (experiments.world.longest_k)
    "world": dict(model="world (trained here)", tasks=[], seeds=[1, 2, 3], n_test=200, k=7, untrained=False,
                  dual=False, synthetic=False, momentum=False, world=True, world_size="demo"),
}


def _unit(uid: str, kind: str, **params) -> Unit:
    return Unit(uid, kind, tuple(sorted(params.items())))


def plan(cfg: SweepConfig) -> list[Unit]:
    units = []
    if cfg.dual:
        units.append(_unit(f"dual-{cfg.tasks[0]}", "dual", model=cfg.model, task=cfg.tasks[0], k=8, seed=1,
                           dtype="float64"))
    for task in cfg.tasks if cfg.eval_only else []:
        # ZSL depends on the test set only: one unit per task, shared by every seed's ICL unit
        base = dict(model=cfg.model, task=task, n_test=cfg.n_test, dtype=cfg.dtype)
        units.append(_unit(f"zsl-{task}", "zsl", **base))
        units += [_unit(f"icl-{task}-s{seed}", "icl", seed=seed, k=cfg.k, **base) for seed in cfg.seeds]
    for task in [] if cfg.eval_only else cfg.tasks:
        for seed in cfg.seeds:
            base = dict(model=cfg.model, task=task, seed=seed, n_test=cfg.n_test, k=cfg.k, dtype=cfg.dtype)
            units.append(_unit(f"compare-{task}-s{seed}", "compare", untrained=False, **base))
            if cfg.untrained:
                units.append(_unit(f"compare-{task}-s{seed}-untrained", "compare", untrained=True, **base))
            if cfg.mechanisms:
                units.append(_unit(f"mechanisms-{task}-s{seed}", "mechanisms", untrained=False, **base))
                if cfg.untrained:
                    units.append(_unit(f"mechanisms-{task}-s{seed}-untrained", "mechanisms", untrained=True, **base))
    if cfg.synthetic:
        units.append(_unit("synthetic-1L", "synthetic", layers=1, steps=cfg.synthetic_steps, seed=1))
    if cfg.momentum:
        units.append(_unit("momentum-tinyshakespeare", "momentum", corpus="tinyshakespeare",
                           seeds=tuple(cfg.seeds), steps=cfg.momentum_steps, eta=0.9))
    return units + world_units(cfg)


def world_units(cfg: SweepConfig) -> list[Unit]:
    """The ICL world's units (iclgd.experiments.world); k and test size of their own in the demo preset."""
    if not cfg.world:
        return []
    from iclgd.experiments.world import longest_k, plan_units

    # the demo's k = 32 is for the LMs; its world units take the longest prompt the world's training sequences hold
    k, n_test = (longest_k(cfg.world_size), 200) if cfg.preset == "demo" else (cfg.k, cfg.n_test or 200)
    return [_unit(uid, kind, **params) for uid, kind, params in
            plan_units(cfg.world_size, cfg.seeds, k, n_test, cfg.world_momentum, cfg.world_along, cfg.world_tasks)]


def unit_cost(unit: Unit) -> float:
    """A rough relative cost, only for ordering the queue longest first (it never changes a result). A world
    model's training comes first: the world's other units read its folder (and wait for it)."""
    kind = unit_kinds().get(unit.kind)
    return kind.cost(unit.p()) if kind is not None else 100


def queue(units: list[Unit]) -> list[Unit]:
    """The sweep's units, longest first (ties in plan order)."""
    return sorted(units, key=lambda u: -unit_cost(u))


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


class _Models:
    """Loads each model variant once per process, lazily."""

    def __init__(self, cfg: SweepConfig, out: Path):
        from iclgd.experiments.compare import ZslCache

        self.cfg, self.out, self.cache, self.zsl = cfg, out, {}, ZslCache()

    def batch_size(self) -> int | None:
        """The batch size the scoring units use (--batch-size auto resolved on the loaded model)."""
        from iclgd.engine.scoring import resolve_batch_size

        return resolve_batch_size(self.cache["trained"], self.cfg.batch_size) if "trained" in self.cache else None

    def get(self, variant: str):
        if variant not in self.cache:
            import torch

            from iclgd.core.models import load_model
            from iclgd.engine.finetune import reinit_untrained

            dtype = "float32" if variant == "dual" else self.cfg.dtype
            # under accelerate launch / torchrun, load_model gives each process its own GPU (core.models.placement)
            lm = load_model(self.cfg.model, dtype=dtype, device=self.cfg.device, device_map=self.cfg.device_map,
                            bos=self.cfg.bos, need_layout=not self.cfg.eval_only or variant == "dual")
            if variant == "untrained":
                reinit_untrained(lm, seed=0)
            if variant == "dual":
                lm.model.to(torch.float64)
            self.cache[variant] = lm
        return self.cache[variant]


def run_unit(unit: Unit, models: _Models, data_dir, progress: bool) -> dict:
    """The unit's result (without its ``unit`` header), from the experiment that declares its kind."""
    return unit_kinds()[unit.kind].run(unit.p(), models, data_dir, progress)


def unit_kinds() -> dict:
    """Every unit kind, as the experiment modules declare them (``UNITS`` beside each experiment's code)."""
    from iclgd.experiments.protocol import experiments

    return {u.name: u for e in experiments().values() for u in e.units}


def check_units(out) -> None:
    """Every finished unit must belong to the folder's sweep: its parameters those the sweep's configuration
    plans for its id, its data files those the sweep recorded. A unit of another configuration (copied in,
    or written by a run with other data) is refused rather than averaged into the report."""
    from iclgd.core.runfolder import read_json_object

    out = Path(out)
    sweep = read_json_object(out / "sweep.json", "sweep file", ("config", "units"))
    if not isinstance(sweep["config"], dict) or not isinstance(sweep["units"], list):
        raise IclgdError(f"{out / 'sweep.json'}: not an iclgd sweep file (config must be an object, units a list)")
    try:
        planned = {u.id: json.loads(json.dumps(u.p())) for u in plan(SweepConfig(**sweep["config"]))}
    except TypeError as e:
        raise IclgdError(f"{out / 'sweep.json'}: not an iclgd sweep configuration ({e})") from None
    files = (sweep.get("data") or {}).get("sha256")
    for f in sorted((out / "units").glob("*/result.json")):
        doc = read_json_object(f, "unit result", ("unit",))
        if not isinstance(doc["unit"], dict):
            raise IclgdError(f"{f}: not a unit result of the shape iclgd writes (its unit is a JSON "
                             f"{type(doc['unit']).__name__}, expected an object); delete it to recompute that unit")
        unit = doc["unit"]
        uid = f.parent.name
        if uid not in planned or unit.get("params") != planned[uid]:
            raise IclgdError(f"{f}: this unit's configuration differs from {out / 'sweep.json'} "
                             "(not planned by it); remove the unit, or run reproduce --overwrite")
        used = doc.get("data_sha256") if isinstance(doc.get("data_sha256"), dict) else {}
        for path, sha in used.items() if isinstance(files, dict) else ():
            if Path(path).resolve().is_relative_to(out.resolve()):
                continue  # data the sweep wrote itself (the ICL world's tasks): fixed by the unit's parameters
            if files.get(str(Path(path).resolve())) != sha:
                raise IclgdError(f"{f}: computed from data file {path} (sha256 {str(sha)[:12]}), not the sweep's "
                                 "data; remove the unit, or run reproduce --overwrite")


def data_fingerprint(tasks: list[str], data_dir) -> dict:
    """The data directory and the sha256 of every data file the sweep's tasks read (part of its identity)."""
    from iclgd.core.io import sha256_file
    from iclgd.core.tasks import resolve_data_dir, resolve_task

    ddir = resolve_data_dir(data_dir)
    if ddir is None:
        return {"data_dir": "hf-hub", "sha256": {}}
    files = {}
    for t in tasks:
        spec = resolve_task(t)
        for rel in (spec.eval_file, spec.demo_file):
            p = ddir / rel
            if p.is_file():
                files[str(p.resolve())] = sha256_file(p)  # resolved: another spelling of the same folder is equal
    return {"data_dir": str(ddir.resolve()), "sha256": files}


def reproduce(cfg: SweepConfig, out, data_dir=None, shard: str | None = None, progress: bool = True,
              overwrite: bool = False) -> dict:
    """Run this shard's unfinished units (the CLI then writes the report from every finished unit).

    ``sweep.json`` records the configuration, the data directory and the data checksums; a folder holding
    finished units of another one is refused, unless ``overwrite`` discards them."""
    from iclgd.core.progress import bar as progress_bar

    from iclgd.core.runfolder import claim, run_folder
    from iclgd.core.tasks import parse_task_list

    cfg.tasks = parse_task_list(",".join(cfg.tasks)) if cfg.tasks or not cfg.world else []
    if not cfg.seeds:
        raise IclgdError("--seeds: expected a comma list of integers, e.g. 1,2,3")
    i, n = parse_shard(shard)
    units = plan(cfg)
    sweep_doc = {"kind": "iclgd.reproduce", "config": {k: v for k, v in vars(cfg).items()},
                 "data": data_fingerprint(cfg.tasks, data_dir),
                 "units": [u.id for u in units], "versions": library_versions()}
    sweep_file = out / "sweep.json"
    # the run-folder guard: a folder of another configuration (or data) is refused, or emptied with --overwrite;
    # shards started together agree on it under its lock, then share the folder
    with run_folder(out, "reproduce", {**sweep_doc["config"], "data": sweep_doc["data"]}, overwrite,
                    resumable=True, exclusive=False):
        atomic_write_json(sweep_file, sweep_doc)
    models = _Models(cfg, out)
    done = skipped = elsewhere = 0
    bar = progress_bar(queue(units), desc="units", enabled=bool(progress))
    for unit in bar:
        bar.set_postfix_str(unit.id, refresh=True)  # the bar names the unit running now
        d = out / "units" / unit.id
        if _finished(d, unit):
            skipped += 1
            continue
        with claim(d) as mine:
            if not mine:  # another process of this sweep runs it
                elsewhere += 1
                continue
            if _finished(d, unit):  # finished by another process since the check above
                skipped += 1
                continue
            t0 = time.time()
            res = run_unit(unit, models, data_dir, progress)
            timing = res.pop("_timing", None)
            atomic_write_json(d / "result.json", {"unit": {"id": unit.id, "kind": unit.kind, "params": unit.p()},
                                                  **res})
            atomic_write_json(d / "timing.json", {"wall_s": round(time.time() - t0, 2), "phases_s": timing,
                                                  "finished_unix": round(time.time()), "process": f"{i}/{n}",
                                                  "batch_size": models.batch_size(), "hardware": _hardware()})  # beside the result, which it never changes
        done += 1
    unfinished = [u.id for u in units if not _finished(out / "units" / u.id, u)]
    return {"units": len(units), "ran": done, "skipped": skipped, "elsewhere": elsewhere, "unfinished": unfinished,
            "process": f"{i}/{n}"}


def _hardware() -> dict:
    from iclgd.core.models import hardware

    return hardware()


def _finished(d: Path, unit: Unit) -> bool:
    prev = read_result(d / "result.json")
    header = prev.get("unit") if prev is not None else None
    return isinstance(header, dict) and header.get("params") == json.loads(json.dumps(unit.p()))


def preflight(cfg: SweepConfig, data_dir) -> None:
    """Everything a unit would find wrong, found before the sweep folder is written: the plan, every task's data
    (both splits, through the schemas) and the model (known and readable, its attention layout derivable)."""
    from iclgd.core.models import check_model
    from iclgd.core.tasks import load_task, parse_task_list, resolve_data_dir, resolve_task

    tasks = parse_task_list(",".join(cfg.tasks)) if cfg.tasks else []
    plan(cfg)
    ddir = resolve_data_dir(data_dir)
    for t in tasks:
        load_task(resolve_task(t), ddir, cfg.n_test)
    if tasks:
        check_model(cfg.model, need_layout=not cfg.eval_only)


def run(cfg: SweepConfig, out, data_dir=None, shard: str | None = None, overwrite: bool = False,
        progress: bool = True) -> dict:
    """``iclgd reproduce`` up to the report: the device resolved (and recorded), a preset applied, the model
    checked readable before the sweep folder is written, then this shard's units under the shard's lock."""
    from iclgd.core import options
    from iclgd.core.models import resolve_device
    from iclgd.core.runfolder import lock

    cfg.device = resolve_device(cfg.device)  # the sweep records the device applied
    options.device_map(cfg.device_map, cfg.device)
    if cfg.preset is not None:
        cfg.apply_preset(cfg.preset)
    i, n = parse_shard(shard)
    preflight(cfg, data_dir)
    with lock(Path(out), f"shard-{i}-of-{n}"):
        return reproduce(cfg, out, data_dir, shard, progress=progress, overwrite=overwrite)
