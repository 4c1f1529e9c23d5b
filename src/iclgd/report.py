"""Plots and tables drawn from results files alone (a report never reruns a model)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _mean_layers(results: list[dict], *keys) -> np.ndarray | None:
    """Per-layer values, mean over the seeds where they are defined; None where no seed has them."""
    from iclgd.metrics import mean_defined

    rows = []
    for r in results:
        v = r
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        if v is not None:
            rows.append(v["per_layer"])
    return mean_defined(np.asarray(rows, dtype=float), axis=0)[0] if rows else None


def plot_compare(results: list[dict], out_dir: Path, title: str, control: list[dict] | None = None) -> list[str]:
    """Per-layer SimAOU, SimAM and Kendall with their baselines (mean over seeds); dashed: untrained model."""
    plt = _plt()
    out_dir = Path(out_dir)
    panels = {
        "simaou_layers.png": ("SimAOU per layer", [
            (("simaou",), "SimAOU (ICL vs FT)"), (("simaou", "baseline_uniform"), "random: uniform[0,1)"),
            (("simaou", "baseline_gaussian"), "random: Gaussian ΔFT")]),
        "simam_layers.png": ("SimAM per layer", [
            (("simam", "icl_ft"), "SimAM (ICL, FT)"), (("simam", "icl_zsl"), "ZSL SimAM (ICL, ZSL)"),
            (("simam", "delta"), "SimAM_Δ")]),
        "kendall_layers.png": ("Kendall τ per layer", [
            (("kendall", "token_qq"), "token, q·q (official)"), (("kendall", "token_qk"), "token, q·k (dual form)"),
            (("kendall", "example_qq"), "example level, q·q"), (("kendall", "random_token"), "random")]),
        "updates_layers.png": ("ΔW_ICL vs ΔW_FT per layer", [
            (("updates", "cos_dW"), "cos(ΔW_ICL, ΔW_FT)"), (("updates", "cos_dW_random"), "random: cos(ΔW_ICL, R)"),
            (("updates", "cos_effect_on_q"), "cos(ΔW_ICL q, ΔW_FT q)"),
            (("updates", "cos_effect_random"), "random: cos(ΔW_ICL q, R q)")]),
    }
    written = []
    for fname, (ttl, lines) in panels.items():
        fig, ax = plt.subplots(figsize=(7, 3.6))
        if _mean_layers(results, *lines[0][0]) is None:  # e.g. --updates-n 0: nothing to draw
            plt.close(fig)
            continue
        for i, (keys, label) in enumerate(lines):
            y = _mean_layers(results, *keys)
            if y is None:
                continue
            ax.plot(range(len(y)), y, "o-", ms=3, color=f"C{i}", label=label)
            yc = _mean_layers(control, *keys) if control else None
            if yc is not None:
                ax.plot(range(len(yc)), yc, "--", color=f"C{i}", alpha=0.6, label=f"{label} [untrained]")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("layer"), ax.set_title(f"{ttl} · {title}", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        _save(fig, out_dir / fname)
        plt.close(fig)
        written.append(fname)
    return written


# ----------------------------------------------------------------------------- report.md from a sweep folder

PAPER_AVERAGES = {  # Dai et al. (2022) as summarised in shared/docs/paper-notes.md ([3rd]-party summary)
    "Rec2FTP": ("85.56%", "89.39%"), "SimAOU": ("0.186 (random ≈ 0)", "0.225"),
    "SimAM (after FT) vs ZSL SimAM": ("0.442 vs 0.338", "0.434 vs 0.355"), "Kendall": ("0.193 (random ≈ 0)", "0.214"),
}


def _load_units(out: Path) -> dict[str, dict]:
    from iclgd.sweep import read_result

    units = {}
    for f in sorted((Path(out) / "units").glob("*/result.json")):
        units[f.parent.name] = read_result(f)
    return units


def _ci(values) -> tuple[float, float, float]:
    from iclgd.metrics import bootstrap_ci

    return bootstrap_ci(values)


def _cell(values, pct: bool = False) -> str:
    vals = [v for v in values if v == v]
    if not vals:
        return "n/a"
    m, lo, hi = _ci(vals)
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")
    return f(m) if len(vals) == 1 else f"{f(m)} [{f(lo)}, {f(hi)}]"


def write_report(out) -> Path:
    """report.md, results.csv and plots/ from ``out/units/*/result.json`` and ``out/sweep.json`` alone."""
    import json

    import pandas as pd

    from iclgd.compare import scalar
    from iclgd.io import atomic_write_text

    out = Path(out)
    sweep = json.loads((out / "sweep.json").read_text())
    cfg = sweep["config"]
    units = _load_units(out)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    lines = [f"# iclgd reproduction report: {cfg['model']}", ""]
    if cfg.get("preset"):
        lines += [f"**Preset `{cfg['preset']}`**: a reduced run (tasks {', '.join(cfg['tasks'])}; "
                  f"{cfg['n_test']} test examples per task; seeds {cfg['seeds']}) that finishes in minutes on 2 CPU "
                  "cores. Its numbers are indicative only; run `iclgd reproduce` without the preset for the full set.", ""]
    missing = [u for u in sweep["units"] if u not in units]
    lines += [f"Units finished: {len(units)} of {len(sweep['units'])}" + (f" (missing: {', '.join(missing)})" if missing
                                                                           else "") + ".", ""]
    csv_rows = []

    def by(task, untrained):
        return [u["result"] for k, u in units.items() if u["unit"]["kind"] == "compare"
                and u["unit"]["params"]["task"] == task and u["unit"]["params"]["untrained"] == untrained]

    tasks = [t for t in cfg["tasks"] if by(t, False)]
    # ---- accuracy
    acc_rows, met_rows = [], []
    for t in tasks:
        rs, us = by(t, False), by(t, True)
        g = lambda name, rr=rs: [scalar(r, name) for r in rr]  # noqa: E731
        acc_rows.append({"task": t, "ZSL": _cell(g("acc_zsl"), True), "FT": _cell(g("acc_ft"), True),
                         "ICL": _cell(g("acc_icl"), True), "majority": _cell([r["acc"]["majority"] for r in rs], True),
                         "k (true)": rs[0]["k_true"], "n": rs[0]["n"], "FT lr": rs[0]["lr"],
                         "ICL predictions per class (first seed)": str(rs[0]["pred_counts"]["icl"])})
        u = (lambda name: _cell([scalar(r, name) for r in us])) if us else (lambda name: "–")
        untrained_of = {r["seed"]: r for r in us}

        def paired(name):  # trained − untrained, seed by seed (same demonstrations and test examples)
            d = [scalar(r, name) - scalar(untrained_of[r["seed"]], name) for r in rs if r["seed"] in untrained_of]
            return _cell(d) if d else "–"

        met_rows.append({
            "task": t,
            "Rec2FTP (den)": f"{_cell(g('rec2ftp'), True)} ({sum(r['rec2ftp']['denominator'] for r in rs)})",
            "SimAOU": _cell(g("simaou")), "SimAOU random": _cell(g("simaou_random_uniform")),
            "SimAOU untrained": u("simaou"), "SimAOU − untrained": paired("simaou"),
            "SimAM": _cell(g("simam_ft")), "ZSL SimAM": _cell(g("simam_zsl")), "SimAM_Δ": _cell(g("simam_delta")),
            "SimAM untrained": u("simam_ft"),
            "Kendall": _cell(g("kendall_token")), "Kendall random": _cell(g("kendall_random")),
            "Kendall untrained": u("kendall_token"),
            "cos(ΔW_ICL, ΔW_FT)": _cell(g("dw_cos")), "cos ΔW random": _cell(g("dw_cos_random")),
            "cos ΔW untrained": u("dw_cos"),
            "cos(ΔW_ICL q, ΔW_FT q)": _cell(g("dw_cos_effect")), "cos ΔWq random": _cell(g("dw_cos_effect_random")),
            "cos ΔWq untrained": u("dw_cos_effect"), "‖ΔW_FT‖/‖ΔW_ICL‖": _cell(g("dw_norm_ratio")),
        })
        for untrained, rr in ((False, rs), (True, us)):
            for r in rr:
                for name in ("acc_zsl", "acc_ft", "acc_icl", "rec2ftp", "simaou", "simaou_random_uniform",
                             "simaou_random_gaussian", "simam_ft", "simam_zsl", "simam_delta", "kendall_token",
                             "kendall_token_keys", "kendall_example", "kendall_random", "kendall_example_unscaled",
                             "dw_cos", "dw_cos_random", "dw_cos_effect", "dw_cos_effect_random", "dw_norm_ratio"):
                    csv_rows.append({"unit": f"compare-{t}-s{r['seed']}" + ("-untrained" if untrained else ""),
                                     "metric": name, "layer": "all", "value": scalar(r, name)})
                for group, key in (("simaou", ()), ("simam", ("icl_ft",)), ("kendall", ("token_qq",)),
                                   ("updates", ("cos_dW",)), ("updates", ("cos_effect_on_q",))):
                    v = r.get(group)
                    if v is None:
                        continue
                    for kk in key:
                        v = v[kk]
                    for layer, x in enumerate(v["per_layer"]):
                        csv_rows.append({"unit": f"compare-{t}-s{r['seed']}" + ("-untrained" if untrained else ""),
                                         "metric": f"{group}{'_' + key[0] if key else ''}", "layer": layer, "value": x})
        d = plots / t
        d.mkdir(exist_ok=True)
        plot_compare(rs, d, f"{cfg['model']} · {t}", us or None)
    if acc_rows:
        lines += ["## Accuracy (%): ZSL, FT, ICL", "", pd.DataFrame(acc_rows).to_markdown(index=False, disable_numparse=True), "",
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
        lines += ["## The paper's published averages beside ours", "",
                  "| metric | paper 1.3B | paper 2.7B | ours (mean over tasks) |", "|---|---|---|---|"]
        def mean(name):  # over tasks of the mean over seeds
            import numpy as np

            return float(np.mean([np.mean([scalar(r, name) for r in by(t, False)]) for t in tasks]))

        r2f = mean("rec2ftp")
        ours = {"Rec2FTP": f"{100 * r2f:.2f}%" if r2f == r2f else "n/a (FT fixed no ZSL error on some task)",
                "SimAOU": f"{mean('simaou'):.3f} (random {mean('simaou_random_uniform'):.3f})",
                "SimAM (after FT) vs ZSL SimAM": f"{mean('simam_ft'):.3f} vs {mean('simam_zsl'):.3f}",
                "Kendall": f"{mean('kendall_token'):.3f} (random {mean('kendall_random'):.3f})"}
        for k, (a, b) in PAPER_AVERAGES.items():
            lines.append(f"| {k} | {a} | {b} | {ours[k]} |")
        lines.append("")
    # ---- synthetic calibration
    syn = units.get("synthetic-1L")
    if syn and "simam" not in syn["calibration"]["construction"]:  # written by iclgd before SimAM/Kendall were calibrated
        lines += ["## Calibration on a known case", "", "`units/synthetic-1L/result.json` was written by an older "
                  "iclgd (no SimAM/Kendall calibration); delete that folder and rerun `iclgd reproduce` with the same "
                  "options to recompute it.", ""]
    elif syn:
        from iclgd.synthetic import calibration_table

        rows = calibration_table(syn)
        md = lambda cells: "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"  # noqa: E731
        lines += ["## Calibration on a known case (synthetic in-context regression, 1 linear attention layer)", "",
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
                csv_rows.append({"unit": "synthetic-1L", "metric": f"{metric}_{k}", "layer": "all", "value": v[metric]})
    # ---- dual form
    for uid, u in units.items():
        if u["unit"]["kind"] == "dual":
            s = u["summary"]
            from iclgd.dual import plot_verify

            plot_verify(u["per_layer"], plots / "dual_verify.png", f"{cfg['model']} · dual form")
            lines += ["## Dual form on the real layers", "",
                      f"Identity ICL = (W_ZSL + ΔW_ICL)q on every layer and head (fp64): max relative error "
                      f"{s['identity_max']:.2e}; our q/k/v reproduce the model's attention to {s['recon_max']:.2e}. "
                      f"Softmax attention vs its linear relaxation: median cosine over layers "
                      f"{s['median_softmax_cos']:.3f}, median relative error {s['median_softmax_relerr']:.3g}; "
                      f"median ‖ΔW_ICL‖/‖W_ZSL‖ {s['median_dW_ratio']:.3g}. [plot](plots/dual_verify.png)", ""]
            for k, v in s.items():
                csv_rows.append({"unit": uid, "metric": k, "layer": "all", "value": v})
    mom = units.get("momentum-tinyshakespeare")
    if mom:
        lines += ["## Momentum attention (small LMs trained here)", "", "| metric | vanilla | momentum | paired diff |",
                  "|---|---|---|---|"]
        for k, v in mom["summary"].items():
            lines.append(f"| {k} | {v['vanilla'][0]:.4g} | {v['momentum'][0]:.4g} | "
                         f"{v['paired_diff_momentum_minus_vanilla'][0]:.4g} [{v['paired_diff_momentum_minus_vanilla'][1]:.3g}, "
                         f"{v['paired_diff_momentum_minus_vanilla'][2]:.3g}] |")
        lines.append("")
    lines += ["## Deviations from the paper", ""] + [f"- {d}" for d in deviations(cfg, units)] + [""]
    lines += ["All numbers: [results.csv](results.csv). Regenerate this file with `iclgd report "
              f"{out}`; it reads the results files only.", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    buf = pd.DataFrame(csv_rows, columns=["unit", "metric", "layer", "value"]).to_csv(index=False)
    atomic_write_text(out / "results.csv", buf)
    return out / "report.md"


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
    if not any(u["unit"]["kind"] == "compare" and u.get("deviations") and any(
            d.startswith("prediction position") for d in u["deviations"]) for u in units.values()):
        out.append("Prediction position: the last prompt token (the official code appends option 0's label token and "
                   "reads there; `iclgd compare --position label-token` reproduces it).")
    out.append("Separator after each demonstration: a newline (the paper's code: the `</s>` token).")
    lrs = sorted({(u["unit"]["params"]["task"], u["result"]["lr"]) for u in units.values()
                  if u["unit"]["kind"] == "compare"})
    if lrs:
        out.append("FT learning rates: the paper's per-task rates for its 1.3B model, not tuned for this model: "
                   + ", ".join(f"{t} {lr:g}" for t, lr in lrs) + ".")
    devs = sorted({d for u in units.values() if u["unit"]["kind"] == "compare" for d in u.get("deviations", [])})
    out += [d[0].upper() + d[1:] + "." for d in devs]
    ks = sorted({(u["unit"]["params"]["task"], u["result"]["k_true"]) for u in units.values()
                 if u["unit"]["kind"] == "compare" and u["result"]["k_true"] < u["unit"]["params"]["k"]})
    if ks:
        out.append("Demonstrations dropped to fit the 2,048-token context: " + ", ".join(f"{t} k={k}" for t, k in ks)
                   + f" (of {cfg['k']}).")
    out.append("SST-2 demonstrations from GLUE train phrases and MR from the HF rotten_tomatoes split, as the "
               "paper's code; Subj's local split matches SetFit/subj in size, not membership.")
    return out
