"""report.md, results.csv and every plot of a sweep folder, from its results files alone.

One section per experiment, in the order the report shows them; each takes the sweep's configuration
and its finished units (``units/<id>/result.json``) and returns its lines of Markdown and its rows of
results.csv. A report never reruns a model, and this package imports neither torch nor the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from iclgd.core.io import TIDY_COLUMNS, atomic_write_text, read_result, tidy_frame
from iclgd.core.metrics import METRICS, fmt_mean_ci, per_layer_of, scalar
from iclgd.core.tasks import TASKS
from iclgd.report.paper import PAPER
from iclgd.report.plots import plot_accuracy, plot_compare, plot_curves, plot_verify
from iclgd.report.tables import calibration_table
from iclgd.report.world import report_lines as world_report_lines


@dataclass
class Sweep:
    """What every section reads: the sweep folder, its configuration and its finished units."""

    out: Path
    cfg: dict
    units: dict[str, dict]
    csv_rows: list[dict] = field(default_factory=list)

    @property
    def plots(self) -> Path:
        return self.out / "plots"

    def compare(self, task: str, untrained: bool) -> list[dict]:
        """The compare results of one task (one per seed), of the trained model or its untrained control."""
        return [u["result"] for u in self.units.values() if u["unit"]["kind"] == "compare"
                and u["unit"]["params"]["task"] == task and u["unit"]["params"]["untrained"] == untrained]

    def csv(self, unit: str, metric: str, layer, value, *, task=None, seed=None, condition=None,
            baseline=None) -> None:
        """One tidy row of results.csv (layer None: the figure over all layers); ``unit`` names the unit it
        comes from, ``baseline`` is the figure's baseline on the same task, seed and layer."""
        self.csv_rows.append({"task": task, "seed": seed, "condition": condition, "layer": layer, "metric": metric,
                              "value": value, "baseline": baseline, "unit": unit})


CSV_COLUMNS = [*TIDY_COLUMNS, "unit"]


def load_units(out: Path) -> dict[str, dict]:
    return {f.parent.name: read_result(f) for f in sorted((Path(out) / "units").glob("*/result.json"))}


def write_report(out) -> Path:
    """report.md, results.csv and plots/ from ``out/units/*/result.json`` and ``out/sweep.json`` alone."""
    out = Path(out)
    sweep = json.loads((out / "sweep.json").read_text())
    sw = Sweep(out, sweep["config"], load_units(out))
    sw.plots.mkdir(exist_ok=True)
    lines = header(sw, sweep["units"])
    for section in SECTIONS:
        lines += _section_lines(section, sw)
    lines += ["## Deviations from the paper", ""] + [f"- {d}" for d in deviations(sw.cfg, sw.units)] + [""]
    lines += ["All numbers: [results.csv](results.csv). Regenerate this file with `iclgd report "
              f"{out}`; it reads the results files only.", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    buf = tidy_frame(sw.csv_rows, CSV_COLUMNS).to_csv(index=False)
    atomic_write_text(out / "results.csv", buf)
    return out / "report.md"


SHAPE_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError)  # a unit file iclgd did not write so


def _section_lines(section, sw: Sweep) -> list[str]:
    """A section's lines; when a (hand-edited) unit file breaks it, one line naming that unit's file, found by
    running the section on each unit alone (plots of that probe go to a temporary folder)."""
    import tempfile

    from iclgd.core.errors import IclgdError

    try:
        return section(sw)
    except SHAPE_ERRORS as e:
        culprit = None
        with tempfile.TemporaryDirectory() as tmp:
            for uid, unit in sw.units.items():
                probe = Sweep(Path(tmp), sw.cfg, {uid: unit})
                probe.plots.mkdir(exist_ok=True)
                try:
                    section(probe)
                except SHAPE_ERRORS:
                    culprit = uid
                    break
        where = sw.out / "units" / culprit / "result.json" if culprit else sw.out / "units"
        raise IclgdError(f"{where}: not a result of the shape iclgd writes ({section.__name__} failed: "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:80]}); delete the unit and rerun reproduce "
                         "to recompute it") from None


def header(sw: Sweep, planned: list[str]) -> list[str]:
    cfg = sw.cfg
    lines = [f"# iclgd reproduction report: {cfg['model']}", ""]
    if cfg.get("preset"):
        lines += [f"**Preset `{cfg['preset']}`**: a reduced run (tasks {', '.join(cfg['tasks'])}; "
                  f"{cfg['n_test']} test examples per task; seeds {cfg['seeds']}) that finishes in minutes on 2 CPU "
                  "cores. Its numbers are indicative only; run `iclgd reproduce` without the preset for the full "
                  "set.", ""]
    missing = [u for u in planned if u not in sw.units]
    lines += [f"Units finished: {len(sw.units)} of {len(planned)}" + (f" (missing: {', '.join(missing)})" if missing
                                                                      else "") + ".", ""]
    return lines


# ----------------------------------------------------------------------------- compare


def compare_section(sw: Sweep) -> list[str]:
    """Accuracy, the paper's metrics beside their controls, per-layer plots, and the paper's averages."""
    tasks = [t for t in sw.cfg["tasks"] if sw.compare(t, False)]
    if not tasks:
        return []
    acc_rows, met_rows = [], []
    for t in tasks:
        rs, us = sw.compare(t, False), sw.compare(t, True)
        acc_rows.append(_accuracy_row(t, rs))
        met_rows.append(_metrics_row(t, rs, us))
        for untrained, rr in ((False, rs), (True, us)):
            for r in rr:
                _csv_compare(sw, f"compare-{t}-s{r['seed']}" + ("-untrained" if untrained else ""), r, t,
                             "untrained" if untrained else "trained")
        d = sw.plots / t
        d.mkdir(exist_ok=True)
        plot_compare(rs, d, f"{sw.cfg['model']} · {t}", us or None)
    lines = ["## Accuracy (%): ZSL, FT, ICL", "",
             pd.DataFrame(acc_rows).to_markdown(index=False, disable_numparse=True), "",
             "Mean over seeds, with a 95% bootstrap CI where there are several. Accuracy at the majority "
             "baseline with all predictions in one class is a model that ignores the input.", ""]
    lines += ["## The paper's metrics, each beside its controls", "",
              pd.DataFrame(met_rows).to_markdown(index=False, disable_numparse=True), "",
              "Random: SimAOU against a uniform[0,1) vector (the official baseline), Kendall against a "
              "uniform random ranking. Untrained: the same pipeline on the model with attention and MLP "
              "weights re-initialised (Deutch et al. 2024). \"SimAOU − untrained\" is the paired difference, seed by "
              "seed, on the same demonstrations and test examples. A metric no higher than its untrained "
              "control does not speak for ICL ≈ GD in this model. ΔW columns: ΔW_ICL (Eq. 7) against ΔW_FT = "
              "W_ZSL(after FT) − W_ZSL(before) (Eq. 8) per layer and head on the test examples' prompts, cosine "
              "of the matrices and of their effects on the test query, beside a random update R ~ N(0, I) "
              "(LMOps issue #22).", ""]
    lines += ["Per-layer plots: " + ", ".join(f"[{t}](plots/{t}/simaou_layers.png) "
                                              f"([SimAM](plots/{t}/simam_layers.png), "
                                              f"[Kendall](plots/{t}/kendall_layers.png), "
                                              f"[ΔW](plots/{t}/updates_layers.png))" for t in tasks), ""]
    return lines + _paper_table(sw, tasks)


def _accuracy_row(t: str, rs: list[dict]) -> dict:
    g = lambda name: [scalar(r, name) for r in rs]  # noqa: E731
    return {"task": t, "ZSL": fmt_mean_ci(g("acc_zsl"), True), "FT": fmt_mean_ci(g("acc_ft"), True),
            "ICL": fmt_mean_ci(g("acc_icl"), True), "majority": fmt_mean_ci([r["acc"]["majority"] for r in rs], True),
            "k (true)": rs[0]["k_true"], "n": rs[0]["n"], "FT lr": rs[0]["lr"],
            "ICL predictions per class (first seed)": str(rs[0]["pred_counts"]["icl"])}


def _metrics_row(t: str, rs: list[dict], us: list[dict]) -> dict:
    g = lambda name: fmt_mean_ci([scalar(r, name) for r in rs])  # noqa: E731
    u = (lambda name: fmt_mean_ci([scalar(r, name) for r in us])) if us else (lambda name: "–")
    untrained_of = {r["seed"]: r for r in us}

    def paired(name):  # trained − untrained, seed by seed (same demonstrations and test examples)
        d = [scalar(r, name) - scalar(untrained_of[r["seed"]], name) for r in rs if r["seed"] in untrained_of]
        return fmt_mean_ci(d) if d else "–"

    return {
        "task": t,
        "Rec2FTP (den)": f"{fmt_mean_ci([scalar(r, 'rec2ftp') for r in rs], True)} "
                         f"({sum(r['rec2ftp']['denominator'] for r in rs)})",
        "SimAOU": g("simaou"), "SimAOU random": g("simaou_random_uniform"),
        "SimAOU untrained": u("simaou"), "SimAOU − untrained": paired("simaou"),
        "SimAM": g("simam_ft"), "ZSL SimAM": g("simam_zsl"), "SimAM_Δ": g("simam_delta"),
        "SimAM untrained": u("simam_ft"),
        "Kendall": g("kendall_token"), "Kendall random": g("kendall_random"),
        "Kendall untrained": u("kendall_token"),
        "cos(ΔW_ICL, ΔW_FT)": g("dw_cos"), "cos ΔW random": g("dw_cos_random"), "cos ΔW untrained": u("dw_cos"),
        "cos(ΔW_ICL q, ΔW_FT q)": g("dw_cos_effect"), "cos ΔWq random": g("dw_cos_effect_random"),
        "cos ΔWq untrained": u("dw_cos_effect"), "‖ΔW_FT‖/‖ΔW_ICL‖": g("dw_norm_ratio"),
    }


def _csv_compare(sw: Sweep, unit: str, r: dict, task: str, condition: str) -> None:
    where = {"task": task, "seed": r["seed"], "condition": condition}
    for name, m in METRICS.items():
        base = scalar(r, m.baselines[0]) if m.baselines else None
        sw.csv(unit, name, None, scalar(r, name), baseline=base, **where)
    for name, m in METRICS.items():
        if m.csv_layers:
            bases = per_layer_of(r, m.baselines[0]) if m.baselines else []
            for layer, x in enumerate(per_layer_of(r, name)):
                sw.csv(unit, m.csv_layers, layer, x, baseline=bases[layer] if layer < len(bases) else None, **where)


def _paper_table(sw: Sweep, tasks: list[str]) -> list[str]:
    """Every registered metric with a published value: the paper's averages beside ours (mean over tasks)."""
    means = {name: float(np.mean([np.mean([scalar(r, name) for r in sw.compare(t, False)]) for t in tasks]))
             for name in METRICS}
    lines = ["## The paper's published averages beside ours", "",
             "| metric | paper 1.3B | paper 2.7B | ours (mean over tasks) |", "|---|---|---|---|"]
    for name, m in PAPER.items():
        ours = m.ours.format(**means) if means[name] == means[name] else f"n/a ({m.undefined})"
        lines.append(f"| {m.label} | {m.paper[0]} | {m.paper[1]} | {ours} |")
    return lines + [""]


# ----------------------------------------------------------------------------- eval units (--eval-only)


def eval_section(sw: Sweep) -> list[str]:
    """ZSL (one pass per test set, shared by the seeds) and ICL per seed, beside majority and prediction counts."""
    rows, plot_rows = [], []
    for t in sw.cfg["tasks"]:
        z = sw.units.get(f"zsl-{t}")
        icl = [sw.units[f"icl-{t}-s{s}"]["result"] for s in sw.cfg["seeds"] if f"icl-{t}-s{s}" in sw.units]
        if z is None or not icl:
            continue
        z = z["result"]
        accs = [r["acc"] for r in icl]
        rows.append({"task": t, "n": z["n"], "majority": f"{100 * z['majority_baseline']:.1f}",
                     "ZSL": f"{100 * z['acc']:.1f}", "ZSL predictions": str(z["pred_counts"]),
                     "ICL": fmt_mean_ci(accs, True), "ICL per seed": ", ".join(f"{100 * a:.1f}" for a in accs),
                     "ICL predictions per seed": "; ".join(str(r["pred_counts"]) for r in icl),
                     "k (true)": ", ".join(sorted({str(r["k_true"]) for r in icl}))})
        plot_rows.append({"task": t, "zsl": z["acc"], "icl": accs, "majority": z["majority_baseline"]})
        sw.csv(f"zsl-{t}", "acc_zsl", None, z["acc"], task=t, condition="zsl", baseline=z["majority_baseline"])
        for r in icl:
            sw.csv(f"icl-{t}-s{r['seed']}", "acc_icl", None, r["acc"], task=t, seed=r["seed"], condition="icl",
                   baseline=r.get("majority_baseline", z["majority_baseline"]))
    if not rows:
        return []
    plot_accuracy(plot_rows, sw.plots / "accuracy.png", f"{sw.cfg['model']}: ZSL vs ICL (k={sw.cfg['k']})")
    return ["## Accuracy (%): ZSL and ICL", "", pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), "",
            "ZSL is scored once per test set (unit `zsl-<task>`) and shared by every seed; ICL is one unit per seed "
            "(each seed draws other demonstrations); mean with a 95% bootstrap CI over seeds. Prediction counts are "
            "per class in label order: all predictions in one class is a model that ignores the input. "
            "[plot](plots/accuracy.png)", ""]


# ----------------------------------------------------------------------------- synthetic


def synthetic_section(sw: Sweep) -> list[str]:
    syn = sw.units.get("synthetic-1L")
    if not syn:
        return []
    if "simam" not in syn["calibration"]["construction"]:  # written by iclgd before SimAM/Kendall were calibrated
        return ["## Calibration on a known case", "", "`units/synthetic-1L/result.json` was written by an older "
                "iclgd (no SimAM/Kendall calibration); delete that folder and rerun `iclgd reproduce` with the same "
                "options to recompute it.", ""]
    rows = calibration_table(syn)
    md = lambda cells: "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    lines = ["## Calibration on a known case (synthetic in-context regression, 1 linear attention layer)", "",
             md(rows[0]), "|" + "---|" * len(rows[0])]
    lines += [md(row.values()) for row in rows]
    L = syn["loss"]
    lines += ["", f"Losses on fresh tasks: trained {L['trained']:.4g}, one GD step {L['gd_1step']:.4g}, "
                  f"zero predictor {L['zero']:.4g}, OLS {L['ols']:.3g}; sensitivity cosine trained vs GD "
                  f"{syn['trained_vs_gd']['sensitivity_cos']:.4f}. Where ICL is GD by construction every metric "
                  "is 1; read the LM's numbers against that, against the untrained control and against "
                  "random. SimAM and Kendall here compare maps over the demonstrations (the test input is one "
                  "token); \"unsigned\" shows them without fixing linear attention's sign symmetry.", ""]
    for k, v in syn["calibration"].items():
        for metric in ("simaou", "rec2ftp", "simam", "kendall"):
            sw.csv("synthetic-1L", metric, None, v[metric], condition=k)
    return lines


# ----------------------------------------------------------------------------- dual form


def dual_section(sw: Sweep) -> list[str]:
    lines = []
    for uid, u in sw.units.items():
        if u["unit"]["kind"] != "dual":
            continue
        s = u["summary"]
        plot_verify(u["per_layer"], sw.plots / "dual_verify.png", f"{sw.cfg['model']} · dual form")
        lines += ["## Dual form on the real layers", "",
                  f"Identity ICL = (W_ZSL + ΔW_ICL)q on every layer and head (fp64): max relative error "
                  f"{s['identity_max']:.2e}; our q/k/v reproduce the model's attention to {s['recon_max']:.2e}. "
                  f"Softmax attention vs its linear relaxation: median cosine over layers "
                  f"{s['median_softmax_cos']:.3f}, median relative error {s['median_softmax_relerr']:.3g}; "
                  f"median ‖ΔW_ICL‖/‖W_ZSL‖ {s['median_dW_ratio']:.3g}. [plot](plots/dual_verify.png)", ""]
        for k, v in s.items():
            sw.csv(uid, k, None, v)
    return lines


# ----------------------------------------------------------------------------- momentum


def momentum_section(sw: Sweep) -> list[str]:
    mom = sw.units.get("momentum-tinyshakespeare")
    if not mom:
        return []
    runs = sw.out / "momentum"
    variants = mom["config"].get("variants", ["vanilla", "momentum"])
    if runs.is_dir():
        plot_curves(runs, mom["config"]["seeds"], variants)
    others = variants[1:]
    lines = ["## Momentum attention (small LMs trained here)", "",
             "| metric | " + " | ".join(variants) + " | " + " | ".join(f"{v} − vanilla (paired)" for v in others) + " |",
             "|---|" + "---|" * (len(variants) + len(others))]
    for k, v in mom["summary"].items():
        diffs = [v[f"paired_diff_{o}_minus_vanilla"] for o in others]
        lines.append(f"| {k} | " + " | ".join(f"{v[x][0]:.4g}" for x in variants) + " | "
                     + " | ".join(f"{d[0]:.4g} [{d[1]:.3g}, {d[2]:.3g}]" for d in diffs) + " |")
    return lines + [""]


def world_section(sw: Sweep) -> list[str]:
    return world_report_lines(sw.units, sw.plots)


def mechanisms_section(sw: Sweep) -> list[str]:
    """One table per task: every account's figure, with shuffled labels and for the untrained model; the task
    vector's and function vector's dev curves over the layers."""
    from iclgd.report.plots import plot_layer_curves
    from iclgd.report.tables import mechanisms_doc, mechanisms_rows

    units = [u for u in sw.units.values() if u["unit"]["kind"] == "mechanisms"]
    if not units:
        return []
    lines = ["## The rival accounts: task vectors, function vectors, induction heads", "",
             "Same demonstrations and test rows as compare (docs/mechanisms.md). Mean over seeds (95% bootstrap CI "
             "from three seeds on).", ""]
    for task in sw.cfg["tasks"]:
        tr = [u["result"] for u in units if u["unit"]["params"]["task"] == task and not u["unit"]["params"]["untrained"]]
        un = [u["result"] for u in units if u["unit"]["params"]["task"] == task and u["unit"]["params"]["untrained"]]
        if not tr:
            continue
        rows = mechanisms_rows(mechanisms_doc(tr, un))
        lines += [f"### {task}", "", "| figure | model | shuffled labels | untrained |", "|---|---|---|---|"]
        lines += [f"| {r['figure']} | {r['model']} | {r['shuffled labels']} | {r['untrained']} |" for r in rows]
        png = plot_layer_curves(tr, un, sw.plots / f"mechanisms_{task}.png", task)
        lines += ["", f"![per-layer curves, {task}](plots/{png.name})", ""]
        for r in tr:
            for name in ("task_vector", "function_vector"):
                sw.csv(f"mechanisms-{task}-s{r['seed']}", f"acc_{name}", None, r["acc"][name], task=task,
                       seed=r["seed"], condition="trained", baseline=r["acc"].get("majority"))
    return lines


SECTIONS = (eval_section, compare_section, mechanisms_section, synthetic_section, dual_section, momentum_section,
            world_section)


def deviations(cfg: dict, units: dict) -> list[str]:
    """Generated from the sweep's configuration and the units' recorded facts."""
    out = []
    if cfg["model"] != "KoboldAI/fairseq-dense-1.3B":
        out.append(f"Model: {cfg['model']} instead of the paper's fairseq dense 1.3B / 2.7B.")
    if cfg["model"] == "smollm2-135m":
        out.append("SmolLM2-135M-Instruct weights come as GGUF Q4_1, dequantized to fp32.")
    if cfg.get("n_test"):
        out.append(f"Test examples: the first {cfg['n_test']} of each evaluation split after the seed-1 shuffle "
                   "(the paper: up to 2,000).")
    out.append(f"Seeds: {cfg['seeds']} (the paper's per-task seeds were 2–5, one run each).")
    compares = [u for u in units.values() if u["unit"]["kind"] == "compare"]
    if compares and not any(u["unit"]["kind"] == "compare" and any(d.startswith("prediction position")
                                                        for d in u.get("deviations", [])) for u in units.values()):
        out.append("Prediction position: the last prompt token (the official code appends option 0's label token "
                   "and reads there; `iclgd compare --position label-token` reproduces it).")
    out.append("Separator after each demonstration: a newline (the paper's code: the `</s>` token).")
    lrs = sorted({(u["unit"]["params"]["task"], u["result"]["lr"]) for u in units.values()
                  if u["unit"]["kind"] == "compare"})
    if lrs:
        out.append("FT learning rates: the paper's per-task rates for its 1.3B model, not tuned for this model: "
                   + ", ".join(f"{t} {lr:g}" for t, lr in lrs) + ".")
    devs = sorted({d for u in units.values() if u["unit"]["kind"] in ("compare", "zsl", "icl")
                   for d in u.get("deviations", [])})
    out += [d[0].upper() + d[1:] + "." for d in devs]
    ks = sorted({(u["unit"]["params"]["task"], u["result"]["k_true"]) for u in units.values()
                 if u["unit"]["kind"] == "compare" and u["result"]["k_true"] < u["unit"]["params"]["k"]})
    if ks:
        out.append("Demonstrations dropped to fit the 2,048-token context: " + ", ".join(f"{t} k={k}" for t, k in ks)
                   + f" (of {cfg['k']}).")
    out += [note[0].upper() + note[1:] + "." for t in cfg["tasks"] if t in TASKS for note in TASKS[t].notes]
    return out


def report_is_fresh(out: Path) -> bool:
    """report.md is newer than sweep.json (rewritten by every reproduce start) and than every unit result."""
    rep = out / "report.md"
    if not rep.is_file():
        return False
    newest = max([(out / "sweep.json").stat().st_mtime_ns,
                  *(f.stat().st_mtime_ns for f in (out / "units").glob("*/result.json"))])
    return rep.stat().st_mtime_ns > newest

