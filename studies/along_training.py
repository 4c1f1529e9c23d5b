"""Metrics along training, rebuilt (issue 23): how SimAOU, SimAM and Kendall move as ICL emerges, on world models
deep enough that layer 0 is a quarter of the answer, over tasks and true seeds, with CIs.

For each training seed s (1, 2, 3: initialisation and data order; world 0 fixed) a 4-layer world model
(``--size deep``, 8,000 steps, a checkpoint every 500) is trained; at the checkpoints listed in CKPTS each of
4 evaluation tasks (world-0 .. world-3) is compared (ZSL / ICL / K/V FT, k = 8 balanced and shuffled,
``--ft-loss label``, the rate of lowest held-out loss, 200 test examples, demonstrations seeded by s). Per
checkpoint: each metric's mean with a 95% bootstrap CI over the 12 (seed, task) runs, over layers 1-3 and for
layer 0 apart; Kendall by q·q (the paper's FT proxy) and by q·k (the dual form's); the random baselines.

    python studies/along_training.py --out runs/along [--worker 0/2]    # resumable; two workers share the runs
    python studies/along_training.py --out runs/along --table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SEEDS = (1, 2, 3)
TASKS = (0, 1, 2, 3)
CKPTS = (0, 500, 1000, 2000, 3000, 4000, 6000, 8000)
METRICS = {  # name -> (path into a compare seed result, its baseline's path or None)
    "SimAOU": (("simaou",), ("simaou", "baseline_uniform")),
    "SimAM (ICL, FT)": (("simam", "icl_ft"), ("simam", "icl_zsl")),
    "Kendall q·q": (("kendall", "token_qq"), ("kendall", "random_token")),
    "Kendall q·k": (("kendall", "token_qk"), ("kendall", "random_token")),
}


def _at(d: dict, path):
    for k in path:
        d = d[k]
    return d


def train(out: Path, worker: str, size: str = "deep") -> None:
    import iclgd

    i, n = (int(x) for x in worker.split("/"))
    for j, s in enumerate(SEEDS):
        d = out / f"{size}-s{s}"
        if j % n == i and not (d / "final.json").is_file():
            r = iclgd.world_train(d, size=size, seed=s, world_seed=0, device="cpu").to_dict()
            print(f"seed {s}: ICL {r['final']['icl_acc']:.3f} at step {r['config']['steps']}", flush=True)


def compare_all(out: Path, worker: str, size: str = "deep") -> None:
    from iclgd.core.io import atomic_write_json
    from iclgd.core.models import load_model
    from iclgd.core.tasks import load_task, load_task_spec
    from iclgd.experiments.compare import CompareConfig, compare_seed

    i, n = (int(x) for x in worker.split("/"))
    jobs = [(s, step, t) for s in SEEDS for step in CKPTS for t in TASKS]
    for j, (s, step, t) in enumerate(jobs):
        f = out / "compares" / f"s{s}-step{step:05d}-world{t}.json"
        if j % n != i or f.is_file():
            continue
        d = out / f"{size}-s{s}"
        if not (d / "final.json").is_file():  # trained by another worker, not yet finished: rerun later
            print(f"skipped {f.name}: {d} is not trained yet", flush=True)
            continue
        lm = load_model(str(d / "checkpoints" / f"step-{step:06d}"))
        data = load_task(load_task_spec(d / "tasks" / f"world-{t}.json"), d / "data", 200)
        cfg = CompareConfig(k=8, balanced=True, lr_search=True, ft_loss="label", updates_n=0, kendall_n=100)
        r, _, _ = compare_seed(lm, data, cfg, s, progress=False)
        atomic_write_json(f, {"seed": s, "step": step, "task": t, "result": r})


def table(out: Path, size: str = "deep") -> dict:
    import numpy as np

    from iclgd.core.io import atomic_write_json, atomic_write_text
    from iclgd.core.metrics import bootstrap_ci

    rows = [json.loads(f.read_text()) for f in sorted((out / "compares").glob("*.json"))]
    logs = {}
    for s in SEEDS:
        from iclgd.engine.world import read_log

        logs[s] = {int(r["step"]): r for r in read_log(out / f"{size}-s{s}")}
    summary = {}
    for step in CKPTS:
        rs = [r["result"] for r in rows if r["step"] == step]
        if len(rs) < len(SEEDS) * len(TASKS):
            continue
        e = {"n_runs": len(rs), "acc": {c: bootstrap_ci([r["acc"][c] for r in rs]) for c in ("zsl", "icl", "ft")},
             "probe_icl": bootstrap_ci([logs[s][step]["icl_acc"] for s in SEEDS if step in logs[s]])}
        for name, (path, base) in METRICS.items():
            per = np.array([_at(r, path)["per_layer"] for r in rs], dtype=float)  # (runs, L)
            bper = np.array([_at(r, base)["per_layer"] for r in rs], dtype=float)
            e[name] = {"layers_1_up": bootstrap_ci(np.nanmean(per[:, 1:], axis=1)),
                       "layer_0": bootstrap_ci(per[:, 0]),
                       "per_layer": [bootstrap_ci(per[:, l]) for l in range(per.shape[1])],
                       "baseline_layers_1_up": bootstrap_ci(np.nanmean(bper[:, 1:], axis=1)),
                       "baseline_layer_0": bootstrap_ci(bper[:, 0])}
        e["lr_ties"] = sum(len(r["lr_search"]["tied"]) > 1 for r in rs)
        e["ft_changed_predictions"] = float(np.mean([r["ft_changed"]["predictions"] for r in rs]))
        summary[step] = e
    doc = {"kind": "iclgd.study.along_training", "size": size, "seeds": list(SEEDS), "tasks": list(TASKS),
           "checkpoints": list(summary), "summary": summary}
    atomic_write_json(out / "along_training.json", doc)
    atomic_write_text(out / "along_training.md", markdown(doc))
    plot(doc, out / "along_training.png")
    return doc


def _ci(t) -> str:
    return f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"


def markdown(doc: dict) -> str:
    head = ("| step | probe ICL | ZSL | ICL | FT | " + " | ".join(f"{m} (layers 1-3) | rand" for m in METRICS)
            + " | " + " | ".join(f"{m} layer 0" for m in METRICS) + " | lr ties |")
    lines = [f"World models of size {doc['size']} (4 layers), seeds {doc['seeds']}, tasks world-{doc['tasks']}; per checkpoint "
             f"mean [95% bootstrap CI] over the {len(doc['seeds']) * len(doc['tasks'])} (seed, task) compares "
             "(k = 8 balanced, --ft-loss label, lr of lowest held-out loss, n = 200). SimAM's column `rand` is ZSL "
             "SimAM; the others' is the random baseline.", "", head,
             "|" + "---|" * (5 + 2 * len(METRICS) + len(METRICS) + 1)]
    for step, e in doc["summary"].items():
        cells = [str(step), _ci(e["probe_icl"]), *(_ci(e["acc"][c]) for c in ("zsl", "icl", "ft"))]
        for m in METRICS:
            cells += [_ci(e[m]["layers_1_up"]), f"{e[m]['baseline_layers_1_up'][0]:.3f}"]
        cells += [_ci(e[m]["layer_0"]) for m in METRICS]
        cells.append(f"{e['lr_ties']}/{e['n_runs']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(s) for s in doc["summary"]]
    fig, grid = plt.subplots(2, 3, figsize=(13, 7))
    axes, legend_ax = list(grid.flat[:5]), grid.flat[5]
    ax = axes[0]
    for c, color in (("icl", "tab:blue"), ("zsl", "tab:gray"), ("ft", "tab:orange")):
        m = [doc["summary"][str(s) if str(s) in doc["summary"] else s]["acc"][c] for s in steps]
        ax.plot(steps, [x[0] for x in m], "o-", color=color, label=c.upper(), ms=3)
        ax.fill_between(steps, [x[1] for x in m], [x[2] for x in m], color=color, alpha=0.2)
    ax.set_xlabel("training step"), ax.set_ylabel("accuracy"), ax.set_ylim(0, 1), ax.legend(fontsize=7)
    ax.set_title("accuracy (12 compares)", fontsize=9)
    for ax, name in zip(axes[1:], METRICS):
        es = [doc["summary"][str(s) if str(s) in doc["summary"] else s][name] for s in steps]
        L = len(es[0]["per_layer"])
        for l in range(L):
            y = [e["per_layer"][l] for e in es]
            ax.plot(steps, [v[0] for v in y], "o-" if l else "s--", ms=3, color=f"C{l}",
                    label=f"layer {l}" + (" (K/V FT leaves its queries)" if l == 0 else ""))
            ax.fill_between(steps, [v[1] for v in y], [v[2] for v in y], color=f"C{l}", alpha=0.15)
        ax.plot(steps, [e["baseline_layers_1_up"][0] for e in es], "k:", lw=1,
                label="ZSL SimAM" if name.startswith("SimAM") else "random")
        ax.set_xlabel("training step"), ax.set_ylabel(name), ax.set_title(name + " (mean, 95% CI band)", fontsize=9)
    handles, labels = axes[1].get_legend_handles_labels()
    legend_ax.axis("off")
    legend_ax.legend(handles, [x.replace("random", "random / ZSL SimAM baseline (layers 1-3)") for x in labels],
                     loc="center", fontsize=9, title="per layer, 12 compares (3 seeds x 4 tasks)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--worker", default="0/1")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--size", default="deep", help="deep (2-word items) or deep-long (4-word items: longer queries)")
    a = ap.parse_args()
    if not a.table:
        train(a.out, a.worker, a.size)
        compare_all(a.out, a.worker, a.size)
    print(markdown(table(a.out, a.size)))


if __name__ == "__main__":
    main()
