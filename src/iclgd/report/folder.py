"""report.md and a tidy results.csv for the folder of one command's run (``iclgd compare --out DIR``, ``eval``,
``mechanisms``, ``dual verify``, ``dual compare-updates``, ``synthetic``, ``world train``, ``pretrain``,
``momentum``), from its result documents alone. A reproduce folder has its own report (:func:`write_report`).

The table is narrow and long: one row per figure (the metric over all layers), one column per task and condition,
each cell the mean over seeds, with ``± sd`` when there are at least three seeds (fewer give no honest spread).
Per-layer figures stay in results.csv (columns task, seed, condition, layer, metric, value) and in the plots, which
report.md embeds.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from iclgd.core.io import TIDY_COLUMNS, atomic_write_csv, atomic_write_text

_CONFIG_KEYS = ("model", "task", "tasks", "seeds", "k", "n_test", "dtype", "device", "steps", "attention", "eta")


def summary_table(tidy: pd.DataFrame) -> pd.DataFrame:
    """metric × (task, condition): the overall figures (no layer), mean over seeds, '± sd' with ≥ 3 seeds."""
    t = tidy[tidy["layer"].isna()].copy()
    if t.empty:
        return layer_table(tidy)
    t["task"] = t["task"].fillna("").astype(str)
    t["condition"] = t["condition"].fillna("").astype(str)
    t["column"] = [f"{a} {b}".strip() or "value" for a, b in zip(t["task"], t["condition"])]

    def cell(v: pd.Series) -> str:
        v = v.dropna().astype(float)
        if v.empty:
            return "—"
        return f"{v.mean():.4g} ± {v.std(ddof=1):.2g}" if len(v) >= 3 else f"{v.mean():.4g}"

    order = list(dict.fromkeys(t["metric"]))
    table = t.groupby(["metric", "column"], sort=False)["value"].apply(cell).unstack("column")
    return table.reindex(order).reindex(columns=list(dict.fromkeys(t["column"])))


def layer_table(tidy: pd.DataFrame) -> pd.DataFrame:
    """For results with per-layer figures only (dual verify): layer × metric, mean over seeds (and tasks)."""
    t = tidy.dropna(subset=["layer"])
    if t.empty:
        return pd.DataFrame()
    table = t.groupby(["layer", "metric"], sort=False)["value"].mean().unstack("metric")
    table.index = table.index.astype(int)
    return table.map(lambda v: f"{v:.4g}")


def _markdown(df: pd.DataFrame) -> str:
    cols = [str(df.index.name or "metric"), *map(str, df.columns)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([str(idx), *("—" if pd.isna(v) else str(v) for v in row)]) + " |")
    return "\n".join(lines)


def _config_line(doc: dict) -> str:
    c = doc.get("config") or {}
    parts = []
    for k in _CONFIG_KEYS:
        v = c.get(k)
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            v = ",".join(str(x.get("name", "?")) for x in v)
        if isinstance(v, dict):
            v = v.get("name")  # an architecture or a task spec: its name, the rest is in the JSON
        if v is not None:
            parts.append(f"{k} {v}")
    return ", ".join(parts)


def write_folder_report(out: Path, command: str, docs: dict[str, dict], tidy: pd.DataFrame) -> Path:
    """``out/report.md`` (configuration, the summary table, every plot embedded) and ``out/results.csv`` (tidy)."""
    out = Path(out)
    seeds = tidy["seed"].dropna().nunique() if "seed" in tidy else 0
    lines = [f"# iclgd {command}: {out.name}", ""]
    for name, doc in docs.items():
        lines.append(f"- `{name}`: {_config_line(doc)}")
    lines += ["", "## Results", ""]
    table = summary_table(tidy)
    if table.empty:
        lines.append("(no overall figures in these results)")
    else:
        spread = "mean ± sd over seeds" if seeds >= 3 else f"mean over {seeds} seed(s); no spread with fewer than 3"
        what = ("Overall figures" if tidy["layer"].isna().any() else "Per-layer figures (mean over seeds and tasks)")
        lines += [f"{what} ({spread}); every value is in results.csv.", "", _markdown(table)]
    warnings = [w for d in docs.values() for w in (d.get("warnings") or [])]
    if warnings:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in warnings)]
    plots = sorted(p for p in out.rglob("*.png"))
    if plots:
        lines += ["", "## Plots", ""]
        for p in plots:
            rel = p.relative_to(out).as_posix()
            lines += [f"![{p.stem}]({rel})", ""]
    atomic_write_text(out / "report.md", "\n".join(lines).rstrip() + "\n")
    rows = tidy.astype(object).where(pd.notna(tidy), None).to_dict("records")
    rows = [{k: ("" if r.get(k) is None else r[k]) for k in TIDY_COLUMNS} for r in rows]
    atomic_write_csv(out / "results.csv", rows, list(TIDY_COLUMNS))
    return out / "report.md"


__all__ = ["summary_table", "write_folder_report"]
