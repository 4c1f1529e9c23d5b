"""Every plot of iclgd, each written atomically, from result files or result dicts (numpy only, no torch)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from iclgd.core.metrics import mean_defined
from iclgd.report.tables import CALIBRATED


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write the figure so that readers see either the old file or the whole new one."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.png", dir=path.parent)  # unique per writer
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        from iclgd.core.io import file_mode

        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _seed_layers(results: list[dict], *keys) -> np.ndarray | None:
    """Per-layer values of every seed that has them, (n_seeds, n_layers); None where no seed has them."""
    rows = []
    for r in results:
        v = r
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        if v is not None:
            rows.append(v["per_layer"])
    return np.asarray(rows, dtype=float) if rows else None


def _mean_layers(results: list[dict], *keys) -> np.ndarray | None:
    """Per-layer values, mean over the seeds where they are defined; None where no seed has them."""
    rows = _seed_layers(results, *keys)
    return None if rows is None else mean_defined(rows, axis=0)[0]


def _layer_axis(ax, ylabel: str) -> None:
    """Integer layer ticks (a 2-layer model has layers 0 and 1, not 0.5), labelled axes, the legend below."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer"), ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)


def plot_compare(results: list[dict], out_dir: Path, title: str, control: list[dict] | None = None) -> list[str]:
    """Per-layer SimAOU, SimAM and Kendall with their baselines: the mean over seeds, and with 3 or more seeds a band
    from the lowest to the highest seed; dashed: untrained model."""
    plt = _plt()
    out_dir = Path(out_dir)
    panels = {
        "simaou_layers.png": ("SimAOU per layer", "cosine", [
            (("simaou",), "SimAOU (ICL vs FT)"), (("simaou", "baseline_uniform"), "random: uniform[0,1)"),
            (("simaou", "baseline_gaussian"), "random: Gaussian ΔFT")]),
        "simam_layers.png": ("SimAM per layer", "cosine of attention maps", [
            (("simam", "icl_ft"), "SimAM (ICL, FT)"), (("simam", "icl_zsl"), "ZSL SimAM (ICL, ZSL)"),
            (("simam", "delta"), "SimAM_Δ")]),
        "kendall_layers.png": ("Kendall τ per layer", "Kendall τ", [
            (("kendall", "token_qq"), "token, q·q (official)"), (("kendall", "token_qk"), "token, q·k (dual form)"),
            (("kendall", "example_qq"), "example level, q·q"), (("kendall", "random_token"), "random")]),
        "updates_layers.png": ("ΔW_ICL vs ΔW_FT per layer", "cosine", [
            (("updates", "cos_dW"), "cos(ΔW_ICL, ΔW_FT)"), (("updates", "cos_dW_random"), "random: cos(ΔW_ICL, R)"),
            (("updates", "cos_effect_on_q"), "cos(ΔW_ICL q, ΔW_FT q)"),
            (("updates", "cos_effect_random"), "random: cos(ΔW_ICL q, R q)")]),
    }
    written = []
    for fname, (ttl, ylabel, lines) in panels.items():
        if _mean_layers(results, *lines[0][0]) is None:  # e.g. --updates-n 0: nothing to draw
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, (keys, label) in enumerate(lines):
            y = _mean_layers(results, *keys)
            if y is None:
                continue
            ax.plot(range(len(y)), y, "o-", ms=3, color=f"C{i}", label=label)
            seeds = _seed_layers(results, *keys)
            if len(seeds) >= 3:  # fewer seeds give no honest spread
                ax.fill_between(range(len(y)), np.nanmin(seeds, 0), np.nanmax(seeds, 0), color=f"C{i}", alpha=0.15)
            yc = _mean_layers(control, *keys) if control else None
            if yc is not None:
                ax.plot(range(len(yc)), yc, "--", color=f"C{i}", alpha=0.6, label=f"{label} [untrained]")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(f"{ttl} · {title}" + (f" · band: range over {len(results)} seeds" if len(results) >= 3 else ""),
                     fontsize=9)
        _layer_axis(ax, ylabel)
        fig.tight_layout()
        _save(fig, out_dir / fname)
        plt.close(fig)
        written.append(fname)
    return written


def plot_layer_curves(results: list[dict], control: list[dict] | None, path, title: str) -> Path:
    """The task vector's and the function vector's dev accuracy per patched layer (mean over seeds, band: min-max
    over seeds), beside ZSL's dev accuracy, and the cosine of ICL's effect with ΔW_ICL q per layer (dashed: untrained
    model). Integer layer ticks, labelled axes, legends below the panels."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (key, label) in enumerate((("task_vector", "task vector (replace)"), ("function_vector",
                                                                                "function vector (add)"))):
        for rs, style, suffix in ((results, "-", ""), (control or [], "--", " [untrained]")):
            if not rs:
                continue
            y = np.asarray([r[key]["dev_curve"] for r in rs], dtype=float)
            x = np.arange(y.shape[1])
            axes[0].plot(x, y.mean(0), style, marker="o", ms=3, color=f"C{i}", label=label + suffix)
            if len(rs) > 1:
                axes[0].fill_between(x, y.min(0), y.max(0), color=f"C{i}", alpha=0.15)
    zsl = np.mean([r["task_vector"]["dev_zsl"] for r in results])
    axes[0].axhline(zsl, color="grey", lw=0.8, ls=":", label="ZSL (dev)")
    axes[0].set_xlabel("patched layer L"), axes[0].set_ylabel("dev accuracy")
    axes[0].set_title(f"patched zero-shot prompts · {title}", fontsize=9)
    for rs, style, suffix in ((results, "-", ""), (control or [], "--", " [untrained]")):
        if not rs:
            continue
        y = np.asarray([r["link"]["cos_effect_dw_q"]["per_layer"] for r in rs], dtype=float)
        yr = np.asarray([r["link"]["cos_random"]["per_layer"] for r in rs], dtype=float)
        x = np.arange(y.shape[1])
        axes[1].plot(x, y.mean(0), style, marker="o", ms=3, color="C2", label="cos(ICL effect, W_O ΔW_ICL q)" + suffix)
        axes[1].plot(x, yr.mean(0), style, color="grey", lw=0.8, label="random direction" + suffix)
        if len(rs) > 1:
            axes[1].fill_between(x, y.min(0), y.max(0), color="C2", alpha=0.15)
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].set_xlabel("layer"), axes[1].set_ylabel("cosine")
    axes[1].set_title(f"dual form vs ICL's effect on the attention output · {title}", fontsize=9)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_compare_file(results_json) -> list[str]:
    """The per-layer plots of an ``iclgd compare`` results.json, beside it."""
    from iclgd.core.io import read_json

    path = Path(results_json)
    doc = read_json(path)
    c = doc["config"]
    control = doc["untrained"]["seeds"] if doc.get("untrained") else None
    return plot_compare(doc["seeds"], path.parent, f"{c['model']} · {c['task']['name']} · k={c['k']} · {c['position']}",
                        control)


def plot_verify(layer_rows: list[dict], path, title: str) -> None:
    plt = _plt()
    layers = [r["layer"] for r in layer_rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    a1.plot(layers, [1 - r["softmax_cos"] for r in layer_rows], "o-", label="1 − cos(softmax, relaxed)")
    a1.plot(layers, [r["softmax_relerr"] for r in layer_rows], "s-", label="rel. error (softmax vs relaxed)")
    a1.set_title("gap: softmax attention vs its linear relaxation", fontsize=9)
    ratio = [r["dW/WZSL"] for r in layer_rows]
    a2.plot(layers, ratio, "o-", color="C2", label="‖ΔW_ICL‖ / ‖W_ZSL‖")
    a2.set_title("‖ΔW_ICL‖ / ‖W_ZSL‖ (median over heads)", fontsize=9)
    for ax, ylabel, ys in ((a1, "gap (log scale where it spans decades)", [1 - r["softmax_cos"] for r in layer_rows]
                            + [r["softmax_relerr"] for r in layer_rows]), (a2, "norm ratio", ratio)):
        _log_if_wide(ax, ys)
        _layer_axis(ax, ylabel)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)


def plot_curves(out: Path, seeds: list[int], variants=("vanilla", "momentum")) -> None:
    """Validation perplexity over steps, one line per (variant, seed), from each run's log.csv."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, variant in enumerate(variants):
        for j, sd in enumerate(seeds):
            rows = [r for r in csv.DictReader(open(out / f"{variant}-s{sd}" / "log.csv")) if r["val_ppl"]]
            ax.plot([int(r["step"]) for r in rows], [float(r["val_ppl"]) for r in rows], "o-", ms=3, color=f"C{i}",
                    alpha=0.8, label=variant if j == 0 else None)
    ax.set_xlabel("step"), ax.set_ylabel("validation perplexity"), ax.set_yscale("log")
    ax.set_title(f"{' vs '.join(variants)} attention (one line per seed)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    _save(fig, out / "val_curves.png")
    plt.close(fig)


def plot_calibration(summary: dict, path, title: str) -> None:
    """Bars per metric: construction / trained / untrained / random (the construction's random baseline),
    with 95% CIs over seeds where there are 3 or more (fewer give no honest spread)."""
    plt = _plt()
    cal = summary["calibration"]
    several = len(summary["seeds"]) >= 3
    bars = [(name, lambda m, n=name: cal[n][m]) for name in cal]
    bars.append(("random", lambda m: cal["construction"].get(f"{m}_random", (np.nan,) * 3)))
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    w = 0.8 / len(bars)
    for i, (name, get) in enumerate(bars):
        vals = np.array([get(m) for m in CALIBRATED], dtype=float)  # (metrics, 3): mean, lo, hi
        err = np.abs(vals[:, 1:].T - vals[:, 0])
        ax.bar(np.arange(len(CALIBRATED)) + (i - (len(bars) - 1) / 2) * w, vals[:, 0], w,
               yerr=err if several else None, capsize=2, label=name)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylabel("metric (1: ICL is GD exactly)")
    ax.set_xticks(range(len(CALIBRATED)), ["Rec2FTP", "SimAOU", "SimAM", "Kendall"])
    ax.set_title(f"{title} · seeds {summary['seeds']}" + (" · 95% CI over seeds" if several else ""), fontsize=9)
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.1)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)


def _log_if_wide(ax, values) -> None:
    """A log y-axis only where the positive values span more than a factor of 10 (a ratio between 2.9 and 3.7
    reads better on a linear axis)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x) and x > 0], dtype=float)
    if len(v) and v.max() / v.min() > 10:
        ax.set_yscale("log")


def plot_synthetic(r: dict, summary: dict, out) -> None:
    """Three PNGs of one synthetic run: training loss vs the GD losses; trained vs GD sensitivities (the
    run's in-memory ``_sens`` arrays); calibration (``summary``: ``summarize_seeds([r])``)."""
    plt = _plt()
    out = Path(out)
    L = r["config"]["layers"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    c = np.asarray(r["train_curve"])
    w = max(1, len(c) // 50)
    # the training loss is ½ squared error; drawn as the mean squared error the terminal and results print
    ax.plot(2 * np.convolve(c, np.ones(w) / w, mode="valid"), label="trained model (train MSE, smoothed)")
    lines = {"gd_1step": ("GD, 1 step", "--")}
    if L > 1:  # with one layer these three are the same construction: one line, not three names
        lines |= {f"gd_{L}steps": (f"GD, {L} steps", ":"), f"gdpp_{L}steps": (f"GD++, {L} steps", "-.")}
    else:
        lines["gd_1step"] = ("GD, 1 step (= GD++ with 1 step)", "--")
    for key, (label, style) in lines.items():
        ax.axhline(r["loss"][key], ls=style, color="k", lw=0.8, label=f"{label} (eval MSE)")
    _log_if_wide(ax, [*(2 * c), *(r["loss"][k] for k in lines)])
    ax.set_xlabel("step"), ax.set_ylabel("mean squared error")
    ax.set_title(f"in-context linear regression: {r['config']['model']}", fontsize=9), ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "loss.png")
    plt.close(fig)
    s_tr, s_gd = r["_sens"]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(s_gd.flatten()[:4000], s_tr.flatten()[:4000], s=2, alpha=0.4)
    lim = float(np.abs(s_gd).max())
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.7)
    ax.set_xlabel(f"∂ŷ/∂x_q, {L}-step GD"), ax.set_ylabel("∂ŷ/∂x_q, trained model")
    ax.set_title(f"sensitivities, cos {r['trained_vs_gd']['sensitivity_cos']:.4f}", fontsize=9)
    fig.tight_layout()
    _save(fig, out / "sensitivities.png")
    plt.close(fig)
    plot_calibration(summary, out / "calibration.png", r["config"]["model"])


def plot_synthetic_result(res, out) -> str:
    """The plots of an ``iclgd synthetic`` result (its in-memory runs): per seed loss, sensitivities and
    calibration; with several seeds each in ``seed-S/`` and the calibration over seeds at the top. Returns what
    was written, as words."""
    out = Path(out)
    summary = res.docs.get("summary.json")
    if summary is None:
        plot_synthetic(res.runs[0], res.per_seed[0], out)
        return f"{out / 'results.json'}, loss.png, sensitivities.png, calibration.png"
    for r, s in zip(res.runs, res.per_seed):
        plot_synthetic(r, s, out / f"seed-{r['config']['seed']}")
    plot_calibration(summary, out / "calibration.png", res.runs[0]["config"]["model"])
    return f"{out}/seed-*/, {out / 'summary.json'}, {out / 'calibration.png'}"


def plot_accuracy(rows: list[dict], path, title: str) -> None:
    """ZSL, ICL (each seed a dot, the mean a bar) and the majority baseline per task, in %."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 3.6))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [100 * r["zsl"] for r in rows], 0.4, label="ZSL", color="tab:gray")
    ax.bar(x + 0.2, [100 * np.mean(r["icl"]) for r in rows], 0.4, label="ICL (mean over seeds)", color="tab:blue")
    for j, r in enumerate(rows):
        ax.plot([j + 0.2] * len(r["icl"]), [100 * a for a in r["icl"]], "k.", ms=4)
        ax.hlines(100 * r["majority"], j - 0.45, j + 0.45, colors="tab:red", linestyles="--",
                  label="majority" if j == 0 else None)
    ax.set_xticks(x, [r["task"] for r in rows])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)
