"""Tables of results as lists of rows (formatted cells), for the CLI and report.md alike."""

from __future__ import annotations

from iclgd.core.metrics import fmt_aggregate, fmt_ci

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


MECHANISM_ROWS = (  # (figure, its key in the aggregate, its shuffled-label control's key or None)
    ("ZSL acc", "acc.zsl", None), ("ICL acc", "acc.icl", "shuffled_labels.acc_icl"), ("FT acc", "acc.ft", None),
    ("task vector acc", "acc.task_vector", "shuffled_labels.acc_task_vector"),
    ("function vector acc", "acc.function_vector", "shuffled_labels.acc_function_vector"),
    ("SimAOU", "simaou.overall", None), ("cos(ICL effect, ΔW_ICL q)", "link.cos_effect_dw_q", None),
)


def mechanisms_doc(trained: list[dict], untrained: list[dict]) -> dict:
    """The shape :func:`mechanisms_rows` reads, from reproduce units' results (one per seed)."""
    from iclgd.core.metrics import aggregate_paths

    paths = [k for _, k, _ in MECHANISM_ROWS] + [k for _, _, k in MECHANISM_ROWS if k]
    agg = lambda results: aggregate_paths(results, paths)  # noqa: E731
    return {"aggregate": agg(trained), "seeds": trained, "induction": trained[0].get("induction"),
            "untrained": {"aggregate": agg(untrained), "seeds": untrained} if untrained else None}


def mechanisms_rows(doc: dict) -> list[dict]:
    """The one table of an ``iclgd mechanisms`` results.json: each account's figure for the model, with labels
    shuffled, and for the untrained model (mean [95% CI] over seeds; the CI from three seeds on)."""
    agg, seeds = doc["aggregate"], doc["seeds"]
    un = (doc.get("untrained") or {}).get("aggregate")
    several = len(seeds) >= 3

    def f(a: dict | None, key: str | None) -> str:
        if a is None or key is None or key not in a:
            return "-"
        x = a[key]
        return fmt_ci(x["mean"], *x["ci95"], several)

    rows = [{"figure": name, "model": f(agg, key), "shuffled labels": f(agg, sh), "untrained": f(un, key)}
            for name, key, sh in MECHANISM_ROWS]
    ind = doc.get("induction") or {}
    top = (ind.get("top_heads") or [[None, None, float("nan")]])[0]
    un_top = ((doc.get("untrained") or {}).get("seeds") or [{}])[0].get("induction", {}).get("top_heads")
    rows.append({"figure": f"top induction head (prefix matching, layer.head {top[0]}.{top[1]})",
                 "model": f"{top[2]:.3f}", "shuffled labels": "-",
                 "untrained": f"{un_top[0][2]:.3f}" if un_top else "-"})
    rows.append({"figure": "task vector layer | function vector layer, heads (dev)",
                 "model": ", ".join(f"{r['task_vector']['layer']} | {r['function_vector']['layer']}, "
                                    f"{r['function_vector']['n_heads']}" for r in seeds),
                 "shuffled labels": "-", "untrained": "-"})
    agree = [r["link"].get("cie_vs_cos_dW") for r in seeds if r["link"].get("cie_vs_cos_dW")]
    if agree:
        rows.append({"figure": "heads: Spearman(CIE, cos ΔW) | top-10 overlap (chance)",
                     "model": "; ".join(f"{a['spearman']:.2f} | {a['top_overlap']} ({a['chance_overlap']:.1f})"
                                        for a in agree if a["spearman"] is not None),
                     "shuffled labels": "-", "untrained": "-"})
    return rows


def momentum_rows(doc: dict) -> list[dict]:
    """Each metric of an ``iclgd momentum compare`` results.json: vanilla, momentum, their paired difference."""
    f = lambda t: f"{t[0]:.4g} [{t[1]:.4g}, {t[2]:.4g}]"  # noqa: E731
    variants = doc["config"].get("variants", ["vanilla", "momentum"])
    return [{"metric": key, **{x: f(v[x]) for x in variants},
             **{f"{x} - vanilla (paired)": f(v[f"paired_diff_{x}_minus_vanilla"]) for x in variants[1:]}}
            for key, v in doc["summary"].items()]
