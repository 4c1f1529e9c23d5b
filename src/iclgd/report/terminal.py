"""What each command prints at the terminal, from its result documents alone (the CLI only echoes these)."""

from __future__ import annotations

import pandas as pd

from iclgd.report.tables import calibration_table, compare_rows, mechanisms_rows, momentum_rows, summary_table


def _table(rows: list[dict], columns: list[str] | None = None, fmt: str = "{:.4g}") -> str:
    return pd.DataFrame(rows, columns=columns).to_string(index=False, float_format=lambda x: fmt.format(x))


EVAL_COLUMNS = ("task", "seed", "acc_zsl", "acc_icl", "k_true", "n", "majority_baseline", "zsl_pred_counts",
                "icl_pred_counts")


def eval_text(doc: dict) -> str:
    """One row per task and seed: accuracies, true k, n, the majority baseline and the predictions per class."""
    return _table([{k: r[k] for k in EVAL_COLUMNS} for r in doc["results"]], list(EVAL_COLUMNS))


def compare_text(docs: list[dict]) -> str:
    """Narrow: a row per figure, a column per task (and its untrained control); a 95% CI only with 3 or more
    seeds (fewer give no honest spread)."""
    c = docs[0]["config"]
    rows = [row for d in docs for row in compare_rows(d)]
    table = pd.DataFrame(rows).set_index("task").T
    table.index.name, table.columns.name = "figure", None
    return (f"prediction position: {c['position']}; FT: {c['ft_params']} params, {c['ft_mode']}\n"
            + table.to_string())


def mechanisms_text(docs: list[dict]) -> str:
    """One table per task: every account's figure for the model, with shuffled labels, and untrained."""
    out = []
    for d in docs:
        c = d["config"]
        out.append(f"{c['model']} on {c['task']['name']}, k = {c['k']}, seeds {c['seeds']}, "
                   f"{d['seeds'][0]['n']} test examples")
        out.append(pd.DataFrame(mechanisms_rows(d)).to_string(index=False))
    return "\n".join(out)


def verify_text(r: dict, model: str) -> str:
    summary, meta = r["summary"], r["config"]
    lines = [_table(r["per_layer"], ["layer", "identity_max", "recon_max", "dW/WZSL", "softmax_relerr", "softmax_cos"]),
             f"{model} {meta['task']} k_true={meta['k_true']} tokens={meta['n_tokens']} {meta['dtype']}: identity max "
             f"{summary['identity_max']:.2e} (tolerance {summary['tolerance']:g}: "
             f"{'OK' if summary['within_tolerance'] else 'FAILED'}); median over layers: "
             f"softmax cos {summary['median_softmax_cos']:.4f}, rel. error "
             f"{summary['median_softmax_relerr']:.4g}, ‖ΔW_ICL‖/‖W_ZSL‖ {summary['median_dW_ratio']:.4g}"]
    if meta.get("sliding_windows"):
        w = meta["sliding_windows"]
        lines.append(f"sliding-window layers {','.join(map(str, w))} (window {sorted(set(w.values()))}): "
                     "their sums cover only the last tokens of the window")
    return "\n".join(lines)


def updates_text(r: dict) -> str:
    table = pd.DataFrame(r["rows"]).groupby("layer")[["cos_dW", "norm_ratio_ft_over_icl", "cos_effect_on_q"]].median()
    return table.reset_index().to_string(index=False, float_format=lambda x: f"{x:.4g}")


def synthetic_text(runs: list[dict], summary: dict | None) -> str:
    lines = []
    for r in runs:
        c = r["config"]
        lines.append(f"seed {c['seed']}: {c['model']}; losses on {c['n_eval']} fresh tasks (mean squared error of the "
                     "query prediction):")
        lines.append(pd.DataFrame([r["loss"]]).T.rename(columns={0: "mse"}).to_string(float_format=lambda x: f"{x:.4g}"))
        lines.append(f"trained vs {c['layers']}-step GD: prediction mse {r['trained_vs_gd']['pred_mse']:.4g}, "
                     f"sensitivity cosine {r['trained_vs_gd']['sensitivity_cos']:.4f}")
        lines.append(f"calibration against {c['layers']}-step GD (each metric beside its random baseline):")
        lines.append(pd.DataFrame(calibration_table(r)).to_string(index=False))
    if summary is not None:
        lines.append(f"over seeds {summary['seeds']}: mean [95% bootstrap CI]")
        lines.append(pd.DataFrame(summary_table(summary)).to_string(index=False))
    return "\n".join(lines)


def momentum_text(doc: dict) -> str:
    return (f"{len(doc['config']['seeds'])} seeds, mean [95% bootstrap CI]\n"
            + pd.DataFrame(momentum_rows(doc)).to_string(index=False))


def apply_text(doc: dict) -> str:
    r, c = doc["results"], doc["config"]
    rows = [{"metric": f"ppl@{L}", "vanilla": r["vanilla"]["ppl"][L], "momentum": r["momentum"]["ppl"][L]}
            for L in r["vanilla"]["ppl"]]
    rows += [{"metric": f"ICL acc {t}", "vanilla": r["vanilla"]["icl"][t], "momentum": r["momentum"]["icl"][t]}
             for t in r["vanilla"]["icl"]]
    return (f"{c['model']}, eta {c['eta']}, no training; perplexity on {c['corpus']} test; ICL k={c['k']}, "
            f"n={c['n_test']}\n" + _table(rows))


def world_text(summary: dict) -> str:
    f, c = summary["final"], summary["config"]
    line = (f"step {c['steps']}: ICL acc {f['icl_acc']:.3f}, ZSL acc {f['zsl_acc']:.3f} (chance "
            f"{1 / c['world']['n_labels']:.3f}), eval loss {f['eval_loss']:.4f}, {f['wall_s']:.0f} s on "
            f"{summary.get('device', 'cpu')}")
    z = summary.get("zsl_null")
    if z:
        line += (f"\nZSL on the fixed tasks {z['fixed_mean']:.3f} vs its null over {z['n_assign']} random label "
                 f"assignments {z['null_mean']:.3f} (SD of a mean over as many tasks {z['null_set_mean_sd']:.3f}; "
                 f"P(null >= fixed) {z['p_null_set_mean_at_least_fixed']:.2f})")
    return line


FORMATS = ("table", "csv", "json", "md", "latex")  # --format: what a command prints


def formatted(res, fmt: str) -> str:
    """A result as ``--format`` asks: ``csv`` its tidy rows (task, seed, condition, layer, metric, value, baseline),
    ``json`` its documents as the files hold them (strict: an undefined value is null, counted under
    ``undefined_values``), ``md`` or ``latex`` the narrow table report.md shows (a row per figure, a column per task
    and condition, the mean over seeds, ± sd only with 3 or more)."""
    from iclgd.core.io import to_json
    from iclgd.report.folder import _markdown, summary_table

    if fmt == "json":
        return to_json(res.to_dict()).rstrip("\n")
    tidy = res.to_pandas()
    if fmt == "csv":
        return tidy.to_csv(index=False).rstrip("\n")
    table = summary_table(tidy)
    if fmt == "md":
        return _markdown(table)
    if fmt == "latex":
        table = table.fillna("—").rename_axis(index=table.index.name or "metric", columns=None).reset_index()
        return table.to_latex(index=False, escape=True).rstrip("\n")
    raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
