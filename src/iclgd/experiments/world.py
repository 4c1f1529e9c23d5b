"""The three experiments the ICL world enables, as sweep units, and their report section.

1. ICL vs FT where ICL works: ``compare`` (ZSL / ICL / K/V FT with --lr-search, the four metrics with their
   random baselines) on each seed's vanilla world model, and the untrained control (same model re-initialised).
2. Metrics along training: the same compare and the dual-form summary at every checkpoint of one run.
3. Momentum where ICL exists: vanilla vs MoAttn (η 0.5, η 0.9 fixed, η learnable from 0.5), per seed the
   same initialisation and data order; ICL accuracy against step, steps to 50% / 90%, final accuracy
   and loss, paired differences (variant − vanilla) with 95% bootstrap CIs.

This module knows nothing of the sweep: ``plan_units`` returns (id, kind, params) triples, ``run_unit``
computes one; the report section (:mod:`iclgd.report.world`) reads finished unit results alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from iclgd.core import options as O
from iclgd.core.io import read_json
from iclgd.experiments.protocol import Experiment, Result, UnitKind

VARIANTS = {  # name -> training options
    "vanilla": dict(attention="vanilla"),
    "momentum-0.5": dict(attention="momentum", eta=0.5),
    "momentum-0.9": dict(attention="momentum", eta=0.9),
    "momentum-learnable": dict(attention="momentum", eta=0.5, learnable_eta=True),
}
THRESHOLDS = (0.5, 0.9)


def _world_sizes() -> tuple[str, ...]:
    from iclgd.engine.world import SIZES

    return tuple(SIZES)


@dataclass
class WorldJob:
    """``iclgd world train``: one world model, of a size, with its training options."""

    attention: str = O.attention_field()
    eta: float = O.eta_field(help="momentum coefficient strictly between 0 and 1 (fixed, or the initial value with "
                                  "--learnable-eta)")
    learnable_eta: bool = O.learnable_eta_field()
    gate: bool = O.gate_field()
    seed: int = O.option(1, "initialisation and data order", check=O.a_seed)
    size: str = O.option("default", "default (the ICL >= 0.9 goal), deep (4 layers), demo (<= 3 min) or tiny (tests)",
                         choices=_world_sizes())
    steps: int | None = O.option(None, "training steps (default: the size's)", type=int, check=O.min_int(1))
    world_seed: int = O.option(0, "the world: prototypes and evaluation tasks", check=O.a_seed)
    ckpt_every: int | None = O.option(None, "resume state and an HF checkpoint every N steps", type=int,
                                      check=O.min_int(1))
    threads: int | None = O.option(None, "torch threads (default 1: faster than 2 on shared cores)", type=int,
                                   check=O.min_int(1))
    device: str = O.device_field()

    def __post_init__(self):
        O.validate(self)

    def config(self):
        """The training configuration (:class:`iclgd.engine.world.WorldTrainConfig`) these options give."""
        from iclgd.engine.world import sized

        over = {k: v for k, v in dict(steps=self.steps, ckpt_every=self.ckpt_every, threads=self.threads).items()
                if v is not None}
        cfg = sized(self.size, attention=self.attention, eta=self.eta, learnable_eta=self.learnable_eta,
                    gate=self.gate, seed=self.seed, world_seed=self.world_seed, **over)
        cfg.check()
        return cfg


class WorldTrainResult(Result):
    """``iclgd world train``'s final.json: the configuration, the final ICL / ZSL accuracy and loss, the device."""

    kind = "iclgd.world.train"
    doc_name = "final.json"

    def rows(self) -> list[dict]:
        doc = next(iter(self.docs.values()))
        c = doc["config"]
        base = {"task": f"world-{c['world']['seed']}", "seed": c["seed"], "condition": c["attention"], "layer": None}
        return [{**base, "metric": k, "value": float(v)} for k, v in doc["final"].items()]


def train_job(job: WorldJob, out, overwrite: bool = False, progress: bool = True) -> WorldTrainResult:
    """Train (or resume) the world model of ``job`` into ``out``; a folder of another configuration is refused
    (``overwrite`` removes the earlier run and starts over)."""
    from dataclasses import asdict

    from iclgd.engine.world import train
    from iclgd.experiments.protocol import writing

    cfg = job.config()
    with writing(out, "world train", asdict(cfg), overwrite, resumable=True):
        summary = train(cfg, out, progress=progress, device=job.device)
    return WorldTrainResult({"final.json": summary})


def longest_k(size: str) -> int:
    """The most demonstrations whose prompt (with the query) a world model of ``size`` saw in training: one fewer
    than the pairs of a training sequence. Past it accuracy measures length generalisation (and iclgd warns)."""
    from iclgd.engine.world import sized

    return sized(size).world.n_pairs - 1


def plan_units(size: str, seeds: list[int], k: int, n_test: int, momentum: bool = True, along: bool = True,
               tasks: int | None = None) -> list[tuple[str, str, dict]]:
    """Training runs first (every later unit reads a run folder; one that is missing is trained first).
    ``tasks``: compare each seed's model on evaluation tasks world-0 .. world-(tasks-1); None: on one task per
    seed (seed s on world-((s-1) mod n), the layout before 0.2)."""
    from iclgd.engine.world import sized

    units = []
    variants = list(VARIANTS) if momentum else ["vanilla"]
    for seed in seeds:
        for v in variants:
            units.append((f"world-train-{v}-s{seed}", "world-train", dict(variant=v, seed=seed, size=size)))
    for seed in seeds:
        for t in [None] if tasks is None else range(tasks):
            for untrained in (False, True):
                uid = f"world-compare-s{seed}" + ("" if t is None else f"-world{t}") + ("-untrained" if untrained else "")
                units.append((uid, "world-compare", dict(size=size, seed=seed, k=k, n_test=n_test, untrained=untrained,
                                                         lr_search=True, **({} if t is None else {"task": t}))))
    if along:
        cfg = sized(size)
        for step in range(0, cfg.steps + 1, cfg.ckpt_every):
            units.append((f"world-ckpt-{step:06d}", "world-ckpt",
                          dict(size=size, seed=seeds[0], step=step, k=k, n_test=n_test)))
    return units


def run_dir(out: Path, size: str, variant: str, seed: int) -> Path:
    return Path(out) / "world" / f"{size}-{variant}-s{seed}"


def ensure_trained(out: Path, size: str, variant: str, seed: int, progress: bool) -> Path:
    """The run folder of (size, variant, seed), trained (or resumed) if it is not finished."""
    from iclgd.engine.world import sized, train

    from iclgd.core.runfolder import lock

    d = run_dir(out, size, variant, seed)
    if not (d / "final.json").is_file():
        with lock(d.parent, f"train-{d.name}", wait=True):  # another process of the sweep may be training it
            if not (d / "final.json").is_file():
                train(sized(size, seed=seed, **VARIANTS[variant]), d, progress=progress)
    return d


def first_step(rows: list[dict], thr: float) -> int | None:
    return next((int(r["step"]) for r in rows if r["icl_acc"] is not None and r["icl_acc"] >= thr), None)


def _task_for(d: Path, seed: int) -> Path:
    """Seed s is evaluated on task world-((s-1) mod n): each seed another fixed assignment."""
    tasks = sorted((d / "tasks").glob("world-*.json"))
    return tasks[(seed - 1) % len(tasks)]


def _compare(lm, d: Path, seed: int, k: int, n_test: int, lr_search: bool, progress: bool,
             task: int | None = None) -> dict:
    from iclgd.core.tasks import load_task, load_task_spec
    from iclgd.experiments.compare import CompareConfig, compare_seed

    spec_file = _task_for(d, seed) if task is None else d / "tasks" / f"world-{task}.json"
    data = load_task(load_task_spec(spec_file), d / "data", n_test)
    # every class in the prompt; the loss the world models were trained with (label positions only)
    cfg = CompareConfig(k=k, lr_search=lr_search, lr=None, balanced=True, ft_loss="label")
    result, _, phases = compare_seed(lm, data, cfg, seed, progress)
    return {"result": result, "task": data.spec.name, "data_sha256": data.files, "_timing": phases}


def _dual_summary(lm, d: Path, seed: int, k: int) -> dict:
    import torch

    from iclgd.experiments.dual import verify_prompt

    lm.model.to(torch.float64)
    try:  # k random demonstrations of the seed's task
        v = verify_prompt(lm, "", k, seed, None, task_spec=_task_for(d, seed))
    finally:
        lm.model.to(torch.float32)
    return {**v["summary"], "n_tokens": v["meta"]["n_tokens"]}


def run_unit(kind: str, p: dict, out: Path, progress: bool) -> dict:
    import json

    import torch

    from iclgd.core.models import load_model
    from iclgd.engine.finetune import reinit_untrained
    from iclgd.engine.world import read_log, sized

    torch.set_num_threads(sized(p["size"]).threads)
    if kind == "world-train":
        d = ensure_trained(out, p["size"], p["variant"], p["seed"], progress)
        rows = read_log(d)
        final = read_json(d / "final.json")
        eta = None
        if VARIANTS[p["variant"]].get("learnable_eta"):
            lm = load_model(str(d / "model"))
            eta = [torch.sigmoid(lm.attention(l).momentum_theta).tolist() for l in range(lm.n_layers)]
        return {"run_dir": str(d.relative_to(out)), "curve": rows, "final": final["final"],
                "steps_to": {str(t): first_step(rows, t) for t in THRESHOLDS}, "eta_learned": eta,
                "config": final["config"], "n_params": final["n_params"],
                # the hardware stays beside the unit (timing.json): its result must not depend on the machine
                "versions": {k: v for k, v in final["versions"].items() if k != "hardware"},
                "_timing": {"train_wall_s": final["final"]["wall_s"], "steps_per_s": final["steps_per_s"]}}
    if kind == "world-compare":
        d = ensure_trained(out, p["size"], "vanilla", p["seed"], progress)
        lm = load_model(str(d / "model"))
        if p["untrained"]:
            reinit_untrained(lm, seed=0)
        return {**_compare(lm, d, p["seed"], p["k"], p["n_test"], p["lr_search"], progress, p.get("task")),
                "run_dir": str(d.relative_to(out))}
    if kind == "world-ckpt":
        d = ensure_trained(out, p["size"], "vanilla", p["seed"], progress)
        folder = d / "checkpoints" / f"step-{p['step']:06d}"
        lm = load_model(str(folder))
        res = _compare(lm, d, p["seed"], p["k"], p["n_test"], True, progress)
        res["dual"] = _dual_summary(lm, d, p["seed"], min(p["k"], 8))
        res["checkpoint"] = str(folder.relative_to(out))
        return res
    raise AssertionError(kind)


def _unit(kind: str):
    def run(p: dict, models, data_dir, progress: bool) -> dict:
        return run_unit(kind, p, models.out, progress)

    return run


# a world model's training comes first in the queue: the world's other units read its folder (and wait for it)
UNITS = (UnitKind("world-train", _unit("world-train"), cost=lambda p: 1e9),
         UnitKind("world-compare", _unit("world-compare"), cost=lambda p: 3 * (p.get("n_test") or 200)),
         UnitKind("world-ckpt", _unit("world-ckpt"), cost=lambda p: p.get("n_test") or 200))


EXPERIMENTS = (Experiment("world train", WorldJob, train_job, WorldTrainResult, UNITS),)
