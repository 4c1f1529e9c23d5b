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


def _mean_layers(results: list[dict], *keys) -> np.ndarray:
    rows = []
    for r in results:
        v = r
        for k in keys:
            v = v[k]
        rows.append(v["per_layer"])
    return np.nanmean(np.asarray(rows, dtype=float), axis=0)


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
    }
    written = []
    for fname, (ttl, lines) in panels.items():
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for i, (keys, label) in enumerate(lines):
            y = _mean_layers(results, *keys)
            ax.plot(range(len(y)), y, "o-", ms=3, color=f"C{i}", label=label)
            if control:
                yc = _mean_layers(control, *keys)
                ax.plot(range(len(yc)), yc, "--", color=f"C{i}", alpha=0.6, label=f"{label} [untrained]")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("layer"), ax.set_title(f"{ttl} · {title}", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        _save(fig, out_dir / fname)
        plt.close(fig)
        written.append(fname)
    return written
