"""The ICL world's section of report.md: its three experiments, from finished unit results alone (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iclgd.core.metrics import bootstrap_ci, scalar
from iclgd.report.plots import _plt, _save

VARIANT_ORDER = ("vanilla", "momentum-0.5", "momentum-0.9", "momentum-learnable")  # iclgd.experiments.world.VARIANTS


def _cell(values, digits: int = 3) -> str:
    vals = [float(v) for v in values if v is not None and v == v]
    if not vals:
        return "n/a"
    m, lo, hi = bootstrap_ci(vals)
    return f"{m:.{digits}f}" if len(vals) == 1 else f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _md(rows: list[dict]) -> list[str]:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return out + ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |" for r in rows]


def _pair_key(r: dict) -> tuple:
    return r["seed"], r.get("_task", "")


def compare_rows(units: dict) -> list[dict]:
    """Trained vs its untrained control, paired by (seed, task); mean [95% CI] over every (seed, task) compare."""
    res = {uid: u for uid, u in units.items() if u["unit"]["kind"] == "world-compare"}
    tr = [{**u["result"], "_task": u.get("task", "")} for u in res.values() if not u["unit"]["params"]["untrained"]]
    un = [{**u["result"], "_task": u.get("task", "")} for u in res.values() if u["unit"]["params"]["untrained"]]
    rows = []
    for name, label in (("acc_zsl", "ZSL acc"), ("acc_icl", "ICL acc"), ("acc_ft", "FT acc"), ("rec2ftp", "Rec2FTP"),
                        ("simaou", "SimAOU"), ("simaou_random_uniform", "SimAOU random"), ("simam_ft", "SimAM (ICL, FT)"),
                        ("simam_zsl", "ZSL SimAM (ICL, ZSL)"), ("simam_delta", "SimAM_Δ"),
                        ("kendall_token", "Kendall"), ("kendall_random", "Kendall random")):
        rows.append({"metric": label, "trained": _cell([scalar(r, name) for r in tr]),
                     "untrained control": _cell([scalar(r, name) for r in un]),
                     "trained − untrained (paired)": _cell([scalar(a, name) - scalar(b, name) for a, b in
                                                           zip(sorted(tr, key=_pair_key), sorted(un, key=_pair_key))])})
    return rows


def ckpt_rows(units: dict) -> list[dict]:
    rows = []
    for uid in sorted(u for u in units if units[u]["unit"]["kind"] == "world-ckpt"):
        r, dd = units[uid]["result"], units[uid]["dual"]
        rows.append({"step": units[uid]["unit"]["params"]["step"], "ICL acc": round(scalar(r, "acc_icl"), 3),
                     "ZSL acc": round(scalar(r, "acc_zsl"), 3), "FT acc": round(scalar(r, "acc_ft"), 3),
                     "Rec2FTP": round(scalar(r, "rec2ftp"), 3), "SimAOU": round(scalar(r, "simaou"), 3),
                     "SimAM": round(scalar(r, "simam_ft"), 3), "ZSL SimAM": round(scalar(r, "simam_zsl"), 3),
                     "Kendall": round(scalar(r, "kendall_token"), 3), "FT lr": r["lr"],
                     "softmax cos (dual)": round(dd["median_softmax_cos"], 3),
                     "‖ΔW_ICL‖/‖W_ZSL‖": round(dd["median_dW_ratio"], 3), "identity max": f"{dd['identity_max']:.1e}"})
    return rows


def momentum_tables(units: dict) -> tuple[list[dict], list[dict]]:
    runs = {}
    for u in units.values():
        if u["unit"]["kind"] == "world-train":
            p = u["unit"]["params"]
            runs[(p["variant"], p["seed"])] = u
    seeds = sorted({s for _, s in runs})
    variants = [v for v in VARIANT_ORDER if any((v, s) in runs for s in seeds)]
    steps = max((u["config"]["steps"] for u in runs.values()), default=0)

    def val(u, what):
        if what == "final ICL acc":
            return u["final"]["icl_acc"]
        if what == "final eval loss":
            return u["final"]["eval_loss"]
        if what == "mean ICL acc over the curve":
            return float(np.mean([r["icl_acc"] for r in u["curve"]]))
        s = u["steps_to"][what.split("@")[1]]
        return float(s) if s is not None else None

    whats = ["final ICL acc", "final eval loss", "mean ICL acc over the curve", "steps to@0.5", "steps to@0.9"]
    table = []
    for v in variants:
        us = [runs[(v, s)] for s in seeds if (v, s) in runs]
        row = {"variant": v, "seeds": len(us)}
        for w in whats:
            xs = [val(u, w) for u in us]
            reached = [x for x in xs if x is not None]
            cell = _cell(reached, 0 if w.startswith("steps") else 3)
            if w.startswith("steps") and len(reached) < len(xs):
                cell += f" ({len(xs) - len(reached)} of {len(xs)} never, > {steps})"
            row[w.replace("@", " ")] = cell
        if v == "momentum-learnable":
            etas = [np.mean(u["eta_learned"]) for u in us if u.get("eta_learned")]
            row["learned η (mean)"] = _cell(etas)
        table.append(row)
    paired = []
    for v in variants[1:]:
        row = {"variant − vanilla": v}
        for w in whats:
            d = []
            for s in seeds:
                if (v, s) in runs and ("vanilla", s) in runs:
                    a, b = val(runs[(v, s)], w), val(runs[("vanilla", s)], w)
                    # a run that never reaches the threshold counts as reaching it at the last step
                    if w.startswith("steps") and (a is None) != (b is None):
                        a, b = a if a is not None else steps, b if b is not None else steps
                    if a is not None and b is not None:
                        d.append(a - b)
            if d:
                m, lo, hi = bootstrap_ci(d)
                dig = 0 if w.startswith("steps") else 3
                row[w.replace("@", " ")] = f"{m:+.{dig}f} [{lo:+.{dig}f}, {hi:+.{dig}f}] (n={len(d)})"
            else:
                row[w.replace("@", " ")] = "n/a"
        paired.append(row)
    return table, paired


def plot_momentum(units: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, v in enumerate(VARIANT_ORDER):
        us = [u for u in units.values() if u["unit"]["kind"] == "world-train" and u["unit"]["params"]["variant"] == v]
        for j, u in enumerate(sorted(us, key=lambda u: u["unit"]["params"]["seed"])):
            ax.plot([r["step"] for r in u["curve"]], [r["icl_acc"] for r in u["curve"]], "-", color=f"C{i}", lw=1,
                    alpha=0.8, label=v if j == 0 else None)
    ax.axhline(0.25, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("training step"), ax.set_ylabel("ICL accuracy (evaluation tasks)")
    ax.set_title("ICL world: vanilla vs momentum attention (one line per seed; chance dotted)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_along(rows: list[dict], path: Path) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [r["step"] for r in rows]
    for key in ("ICL acc", "ZSL acc", "FT acc"):
        a1.plot(steps, [r[key] for r in rows], "o-", ms=3, label=key)
    a1.set_xlabel("training step"), a1.set_title("accuracy at each checkpoint", fontsize=9), a1.legend(fontsize=8)
    icl = [r["ICL acc"] for r in rows]
    for key in ("Rec2FTP", "SimAOU", "SimAM", "ZSL SimAM", "Kendall", "softmax cos (dual)"):
        a2.plot(icl, [r[key] for r in rows], "o-", ms=3, label=key)
    for r in rows:
        a2.annotate(str(r["step"]), (r["ICL acc"], r["SimAOU"]), fontsize=6, alpha=0.7)
    a2.set_xlabel("ICL accuracy of the checkpoint"), a2.set_title("metrics vs ICL accuracy (labels: step)", fontsize=9)
    a2.axhline(0, color="grey", lw=0.6), a2.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def report_lines(units: dict, plots: Path) -> list[str]:
    """The world section of report.md (empty when the sweep has no world units)."""
    units = {k: u for k, u in units.items() if u["unit"]["kind"].startswith("world-")}
    if not units:
        return []
    lines = ["## ICL world: models trained here that learn in context", "",
             "Token-level few-shot classification (see README, \"The ICL world\"): per training sequence the labels of "
             "its classes are a fresh permutation, so ZSL is at chance by construction; evaluation tasks are fixed "
             "assignments never used in training. Chance = 0.25.", ""]
    train = [u for u in units.values() if u["unit"]["kind"] == "world-train"]
    if train:
        lines += ["### Training runs", ""] + _md([{
            "run": u["unit"]["id"], "steps": u["config"]["steps"], "wall s": round(u["final"]["wall_s"]),
            "s/step": round(u["final"]["wall_s"] / u["config"]["steps"], 3), "ICL acc": round(u["final"]["icl_acc"], 3),
            "ZSL acc": round(u["final"]["zsl_acc"], 3), "eval loss": round(u["final"]["eval_loss"], 4),
            "steps to 0.5": u["steps_to"]["0.5"], "steps to 0.9": u["steps_to"]["0.9"]}
            for u in sorted(train, key=lambda u: u["unit"]["id"])]) + [
            "", "ICL/ZSL accuracy here: the in-training probe (512 held-out sequences on the evaluation tasks' "
            "assignments, argmax over the label words; wall time on 2 shared CPU cores, training and probes).", ""]
    if any(u["unit"]["kind"] == "world-compare" for u in units.values()):
        cmp = [u for u in units.values() if u["unit"]["kind"] == "world-compare" and not u["unit"]["params"]["untrained"]]
        r0 = cmp[0]["result"] if cmp else None
        per_task = any("task" in u["unit"]["params"] for u in cmp)
        where = ("tasks " + ", ".join(sorted({u.get("task", "?") for u in cmp})) if per_task
                 else "seed s: task world-((s−1) mod 4)")
        seeds = sorted({u["result"]["seed"] for u in cmp})
        lines += ["### 1. ICL vs finetuning where ICL works", "",
                  f"`iclgd compare` on each seed's vanilla model ({where}; k={r0['k_true'] if r0 else '?'}, "
                  f"n={r0['n'] if r0 else '?'}, K/V FT on the label tokens, lr of lowest held-out loss); mean [95% "
                  f"bootstrap CI] over {len(cmp)} compares (seeds {seeds}). Untrained: the same model with attention "
                  "and MLP weights re-initialised (at chance on fresh assignments; on one fixed task its label "
                  "preferences can land above or below chance).", ""]
        lines += _md(compare_rows(units)) + [""]
        lines += ["FT learning rates chosen: " + ", ".join(
            f"s{u['result']['seed']}{' ' + u['task'] if per_task else ''} {u['result']['lr']:g}"
            for u in sorted(cmp, key=lambda u: (u['result']['seed'], u.get('task', '')))), ""]
    rows = ckpt_rows(units)
    if rows:
        plot_along(rows, plots / "world_metrics_along_training.png")
        lines += ["### 2. The metrics along training", "",
                  "Each checkpoint of the first seed's vanilla run through the same compare (and the dual-form check in "
                  "fp64): if a metric measures \"ICL behaves like FT\", it should rise as ICL emerges.", ""]
        lines += _md(rows) + ["", "![metrics along training](plots/world_metrics_along_training.png)", ""]
        icl = np.array([r["ICL acc"] for r in rows])
        if len(rows) >= 3 and icl.std() > 0:
            from scipy.stats import spearmanr

            cor = {k: spearmanr(icl, [r[k] for r in rows])[0] for k in ("Rec2FTP", "SimAOU", "SimAM", "Kendall",
                                                                          "softmax cos (dual)")}
            lines += ["Spearman correlation with ICL accuracy over the checkpoints: " +
                      ", ".join(f"{k} {v:+.2f}" for k, v in cor.items()) + ".", ""]
    if any(u["unit"]["params"].get("variant", "vanilla") != "vanilla" for u in train):
        table, paired = momentum_tables(units)
        plot_momentum(units, plots / "world_momentum.png")
        lines += ["### 3. Momentum attention where ICL exists", "",
                  "Per seed, every variant starts from the same initial weights and sees the same batches. Mean [95% "
                  "bootstrap CI] over seeds; steps to a threshold at the probe's resolution (every eval_every steps).", ""]
        lines += _md(table) + ["", "Paired differences, variant − vanilla, seed by seed (a run that never reaches a "
                                   "threshold counts as reaching it at the last step):", ""]
        lines += _md(paired) + ["", "![momentum](plots/world_momentum.png)", ""]
    return lines
