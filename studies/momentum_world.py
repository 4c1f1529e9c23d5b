"""Momentum beyond Eq. 9 on the ICL world (issue 23): does a variant delay or prevent in-context learning?

Trains world models at the default size for 5,000 steps, per true seed (initialisation and data order; the world
fixed), for each variant paired with vanilla (same seed: same initial weights, batches and evaluation):

  vanilla        softmax attention
  eq9-0.9        Eq. (9), η = 0.9 fixed (the paper's form)
  eq9-gated      Eq. (9), η learnable from 0.1, times a learnable per-head gate initialised at 0
  ema            the authors' code variant: a learnable 8-component EMA over the values

then reads each run's log (ICL accuracy on held-out tasks every 100 steps) and writes, beside the runs,
momentum_world.json and momentum_world.md: steps to 50% and 90% ICL (None: not reached within the run), final
ICL/ZSL accuracy and loss, and each variant's paired difference from vanilla with a 95% bootstrap CI.

    python studies/momentum_world.py --out runs/momentum-world [--worker 0/2]   # resumable; two workers share
    python studies/momentum_world.py --out runs/momentum-world --table          # the table from the logs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VARIANTS = {
    "vanilla": dict(attention="vanilla"),
    "eq9-0.9": dict(attention="momentum", eta=0.9),
    "eq9-gated": dict(attention="momentum", eta=0.1, learnable_eta=True, gate=True),
    "ema": dict(attention="ema"),
}
SEEDS = (1, 2, 3)
THRESHOLDS = (0.5, 0.9)


def runs(out: Path, size: str, steps: int):
    for seed in SEEDS:
        for name, kw in VARIANTS.items():
            yield name, seed, out / f"{size}-{name}-s{seed}", dict(size=size, steps=steps, seed=seed, world_seed=0,
                                                                     device="cpu", **kw)


def train(out: Path, size: str, steps: int, worker: str) -> None:
    import iclgd

    i, n = (int(x) for x in worker.split("/"))
    for j, (name, seed, d, kw) in enumerate(runs(out, size, steps)):
        if j % n != i or (d / "final.json").is_file():
            continue
        r = iclgd.world_train(d, progress=False, **kw).to_dict()
        print(f"{name} seed {seed}: ICL {r['final']['icl_acc']:.3f} after {steps} steps, {r['final']['wall_s']:.0f} s",
              flush=True)


def table(out: Path, size: str, steps: int) -> dict:
    import numpy as np

    from iclgd.core.metrics import bootstrap_ci
    from iclgd.engine.world import read_log
    from iclgd.experiments.world import first_step

    per = {}
    for name, seed, d, _ in runs(out, size, steps):
        rows = read_log(d)
        last = rows[-1]
        if int(last["step"]) != steps:
            raise SystemExit(f"{d}: unfinished ({int(last['step'])} of {steps} steps); train first")
        final = json.loads((d / "final.json").read_text())
        if "zsl_null" not in final:  # runs trained before zsl_null was recorded: computed from the saved model
            from iclgd.core.models import load_model
            from iclgd.engine.world import World, WorldTrainConfig, zsl_null

            cfg = WorldTrainConfig.from_dict(final["config"])
            final["zsl_null"] = zsl_null(load_model(str(d / "model")), World(cfg.world))
        per[(name, seed)] = {"zsl_null": {k: final["zsl_null"][k] for k in ("fixed_mean", "null_mean", "null_sd",
                                                                               "null_set_mean_sd",
                                                                               "p_null_set_mean_at_least_fixed",
                                                                               "icl_random_assignments")},
                             "steps_to": {str(t): first_step(rows, t) for t in THRESHOLDS},
                             "final_icl": last["icl_acc"], "final_zsl": last["zsl_acc"],
                             "final_eval_loss": last["eval_loss"], "curve": [(r["step"], r["icl_acc"]) for r in rows]}
    summary = {}
    for name in VARIANTS:
        s = {}
        for key in ("final_icl", "final_zsl", "final_eval_loss"):
            vals = [per[(name, sd)][key] for sd in SEEDS]
            diff = [per[(name, sd)][key] - per[("vanilla", sd)][key] for sd in SEEDS]
            s[key] = {"mean_ci": bootstrap_ci(vals), "paired_diff_ci": bootstrap_ci(diff) if name != "vanilla" else None}
        for t in THRESHOLDS:
            got = [per[(name, sd)]["steps_to"][str(t)] for sd in SEEDS]
            reached = [g for g in got if g is not None]
            diff = [g - per[("vanilla", sd)]["steps_to"][str(t)] for g, sd in zip(got, SEEDS)
                    if g is not None and per[("vanilla", sd)]["steps_to"][str(t)] is not None]
            s[f"steps_to_{t}"] = {"per_seed": got, "reached": f"{len(reached)}/{len(SEEDS)}",
                                  "mean": float(np.mean(reached)) if reached else None,
                                  "paired_delay_ci": bootstrap_ci(diff) if diff and name != "vanilla" else None,
                                  "n_pairs": len(diff)}
        summary[name] = s
    doc = {"kind": "iclgd.study.momentum_world", "size": size, "steps": steps, "seeds": list(SEEDS), "world_seed": 0,
           "variants": VARIANTS, "summary": summary,
           "runs": {f"{k[0]}-s{k[1]}": v for k, v in per.items()}}
    from iclgd.core.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "momentum_world.json", doc)
    atomic_write_text(out / "momentum_world.md", markdown(doc))
    plot(doc, out / "momentum_world.png")
    return doc


def _ci(t) -> str:
    if t is None:
        return "–"
    f = (lambda x: f"{x:.0f}") if abs(t[0]) >= 10 else (lambda x: f"{x:.3f}")  # steps, or accuracies and losses
    return f"{f(t[0])} [{f(t[1])}, {f(t[2])}]"


def markdown(doc: dict) -> str:
    lines = [f"World models, size {doc['size']}, {doc['steps']} steps, seeds {doc['seeds']} (true seeds: initialisation "
             "and data order), world 0. Mean [95% bootstrap CI] over seeds; paired = variant − vanilla, same seed.", "",
             "| variant | steps to 50% ICL (per seed) | delay to 50% (paired seeds) | steps to 90% ICL (per seed) | "
             "delay to 90% (paired seeds) | final ICL | final ICL − vanilla | final ZSL | final eval loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in doc["summary"].items():
        st = lambda t: f"{s[f'steps_to_{t}']['per_seed']} ({s[f'steps_to_{t}']['reached']} reached)"  # noqa: E731
        dl = lambda t: ("–" if s[f"steps_to_{t}"]["paired_delay_ci"] is None else  # noqa: E731
                        f"{_ci(s[f'steps_to_{t}']['paired_delay_ci'])} ({s[f'steps_to_{t}']['n_pairs']})")
        lines.append(f"| {name} | {st(0.5)} | {dl(0.5)} | {st(0.9)} | {dl(0.9)} | "
                     f"{_ci(s['final_icl']['mean_ci'])} | {_ci(s['final_icl']['paired_diff_ci'])} | "
                     f"{_ci(s['final_zsl']['mean_ci'])} | {_ci(s['final_eval_loss']['mean_ci'])} |")
    lines += ["", "ZSL against its null (each run: the fixed tasks' mean, the null over 64 random assignments, "
              "P(a mean over as many random tasks >= the fixed mean)), and ICL on fresh random assignments:", "",
              "| run | ZSL fixed | ZSL null | P(null >= fixed) | ICL fresh assignments |", "|---|---|---|---|---|"]
    for key, r in doc["runs"].items():
        z = r["zsl_null"]
        lines.append(f"| {key} | {z['fixed_mean']:.3f} | {z['null_mean']:.3f} ± {z['null_sd']:.3f} | "
                     f"{z['p_null_set_mean_at_least_fixed']:.2f} | {z['icl_random_assignments']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4))
    colors = dict(zip(doc["summary"], ("k", "tab:red", "tab:blue", "tab:green")))
    for key, r in doc["runs"].items():
        name = key.rsplit("-s", 1)[0]
        steps, icl = zip(*r["curve"])
        ax.plot(steps, icl, color=colors[name], lw=1, alpha=0.8,
                label=name if key.endswith(f"-s{doc['seeds'][0]}") else None)
    ax.axhline(0.25, color="gray", ls=":", lw=1, label="chance (4 labels)")
    ax.set_xlabel("training step"), ax.set_ylabel("ICL accuracy (held-out tasks)"), ax.set_ylim(0, 1)
    ax.set_title(f"ICL world, {doc['size']} size: momentum variants, {len(doc['seeds'])} seeds each", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), title="one line per seed", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", default="default")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--worker", default="0/1", help="i/n: train every n-th run, from the i-th")
    ap.add_argument("--table", action="store_true", help="only tabulate finished runs")
    a = ap.parse_args()
    if not a.table:
        train(a.out, a.size, a.steps, a.worker)
    if a.table or a.worker == "0/1":
        print(markdown(table(a.out, a.size, a.steps)))


if __name__ == "__main__":
    main()
