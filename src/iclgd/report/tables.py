"""Tables of results as lists of rows (formatted cells), for the CLI and report.md alike."""

from __future__ import annotations

from iclgd.core.metrics import fmt_aggregate

CALIBRATED = ("rec2ftp", "simaou", "simam", "kendall")  # the four metrics the synthetic testbed calibrates


def calibration_table(r: dict) -> list[dict]:
    """One row per model (construction / trained / untrained): each metric beside its random baseline."""
    rows = []
    for name, c in r["calibration"].items():
        rows.append({"model": name, "Rec2FTP (den)": f"{c['rec2ftp']:.3f} ({c['rec2ftp_den']})",
                     "SimAOU | rand": f"{c['simaou']:.3f} | {c['simaou_random']:.3f}",
                     "SimAM | rand": f"{c['simam']:.3f} | {c['simam_random']:.3f}",
                     "Kendall | rand": f"{c['kendall']:.3f} | {c['kendall_random']:.3f}",
                     "SimAM, Kendall unsigned": f"{c['simam_raw']:.3f}, {c['kendall_raw']:.3f}"})
    return rows


def summary_table(summary: dict) -> list[dict]:
    """Like ``calibration_table``, with mean [95% CI] over seeds."""
    def f(v):
        return f"{v[0]:.3f}" if v[1] == v[2] else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    return [{"model": name, **{m: f(c[m]) for m in CALIBRATED}, "SimAM rand": f(c["simam_random"]),
             "Kendall rand": f(c["kendall_random"])} for name, c in summary["calibration"].items()]




def compare_rows(doc: dict) -> list[dict]:
    """The paper-style rows of an ``iclgd compare`` results.json: the model, then its untrained control."""
    name = doc["config"]["task"]["name"]
    rows = [_compare_row(name, doc["aggregate"], doc["seeds"])]
    if doc.get("untrained"):
        rows.append(_compare_row(f"{name} [untrained]", doc["untrained"]["aggregate"], doc["untrained"]["seeds"]))
    return rows


def _compare_row(task: str, agg: dict, results: list[dict]) -> dict:
    """Accuracies, Rec2FTP, each similarity beside its baseline."""
    f = lambda name: fmt_aggregate(agg, name)  # noqa: E731
    return {
        "task": task, "ZSL": f("acc_zsl"), "FT": f("acc_ft"), "ICL": f("acc_icl"),
        "Rec2FTP (den)": f"{f('rec2ftp')} ({sum(r['rec2ftp']['denominator'] for r in results)})",
        "SimAOU | rand": f"{f('simaou')} | {f('simaou_random_uniform')}",
        "SimAM | ZSL SimAM": f"{f('simam_ft')} | {f('simam_zsl')}",
        "SimAM_Δ": f("simam_delta"),
        "Kendall | rand": f"{f('kendall_token')} | {f('kendall_random')}",
        "Kendall ex. | unscaled": f"{f('kendall_example')} | {f('kendall_example_unscaled')}",
        "cos ΔW | rand": f"{f('dw_cos')} | {f('dw_cos_random')}",
        "cos ΔWq | rand": f"{f('dw_cos_effect')} | {f('dw_cos_effect_random')}",
        "‖ΔW_FT‖/‖ΔW_ICL‖": f("dw_norm_ratio"),
        "k": results[0]["k_true"], "lr": results[0]["lr"],
    }


def momentum_rows(doc: dict) -> list[dict]:
    """Each metric of an ``iclgd momentum compare`` results.json: vanilla, momentum, their paired difference."""
    f = lambda t: f"{t[0]:.4g} [{t[1]:.4g}, {t[2]:.4g}]"  # noqa: E731
    variants = doc["config"].get("variants", ["vanilla", "momentum"])
    return [{"metric": key, **{x: f(v[x]) for x in variants},
             **{f"{x} - vanilla (paired)": f(v[f"paired_diff_{x}_minus_vanilla"]) for x in variants[1:]}}
            for key, v in doc["summary"].items()]
