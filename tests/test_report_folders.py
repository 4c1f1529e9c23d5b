"""`iclgd report DIR` on the folder of each command's run: report.md with a narrow summary table and the plots
embedded, and a tidy results.csv whose rows are the result's own (to_pandas)."""

import csv

import pytest
from typer.testing import CliRunner

from iclgd.cli import app

TINY = ["--model", "tiny-random-llama"]
RUNS = {
    "eval": ["eval", *TINY, "--task", "sst2", "--k", "2", "--seeds", "1,2,3", "--n-test", "8"],
    "compare": ["compare", *TINY, "--task", "sst2", "--k", "2", "--seeds", "1", "--n-test", "8", "--no-untrained"],
    "mechanisms": ["mechanisms", *TINY, "--task", "sst2", "--k", "2", "--seeds", "1", "--n-test", "6", "--no-untrained",
                   "--n-dev", "4", "--n-dummy", "2", "--n-cie", "2", "--n-link", "2", "--induction-seqs", "2",
                   "--induction-len", "4"],
    "dual verify": ["dual", "verify", *TINY, "--task", "sst2", "--k", "2"],
    "synthetic": ["synthetic", "--seeds", "1", "--steps", "20", "--n-eval", "16"],
    "world train": ["world", "train", "--size", "tiny", "--steps", "20"],
}


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_report_on_a_single_run_folder(kind, tmp_path, data_dir):
    out = tmp_path / kind.replace(" ", "-")
    res = CliRunner().invoke(app, [*RUNS[kind], "--out", str(out)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    md = (out / "report.md").read_text()
    assert md.startswith(f"# iclgd {kind}: ")
    assert "| metric |" in md or "| layer |" in md  # the summary table (dual verify's is per layer)
    widths = [len(line) for line in md.splitlines() if line.startswith("|")]
    assert max(widths) < 200  # long, not wide: one row per figure
    for png in out.rglob("*.png"):
        assert f"]({png.relative_to(out).as_posix()})" in md  # embedded, not linked
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == ["task", "seed", "condition", "layer", "metric", "value", "baseline"]
    for c in ("seed", "layer"):  # integers as written: 1, not 1.0
        assert all(r[c] == "" or r[c].isdigit() for r in rows), (c, {r[c] for r in rows})
    if kind == "eval":  # three seeds: the spread is shown
        assert " ± " in md


def test_report_refuses_a_folder_without_results(tmp_path):
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code != 0
    assert "no iclgd results here" in res.output


@pytest.mark.parametrize("kind", ["eval", "compare", "synthetic", "world train"])
def test_every_format_prints_the_result_itself(kind, tmp_path, data_dir):
    """--format csv is the tidy table to_pandas gives (the same rows a folder's results.csv holds), json the
    documents as strict JSON (NaN as null), md and latex the summary table row for row; stdout holds nothing else."""
    import io
    import json

    import pandas as pd

    from iclgd.experiments.protocol import experiments
    from iclgd.report.folder import summary_table

    out = tmp_path / "run"
    res = CliRunner().invoke(app, [*RUNS[kind], "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = experiments()[kind].result.load(out)
    want = result.to_pandas()
    printed = {}
    for fmt in ("csv", "json", "md", "latex"):
        again = ["--out", str(tmp_path / fmt)] if kind == "world train" else []  # world train needs a folder
        res = CliRunner().invoke(app, [*RUNS[kind], *again, "--format", fmt])
        assert res.exit_code == 0, res.output
        printed[fmt] = res.stdout
    got = pd.read_csv(io.StringIO(printed["csv"]))
    assert list(got.columns) == list(want.columns) and len(got) == len(want)
    assert sorted(got.metric) == sorted(want.metric)  # the same rows (a loaded folder may list its files in another order)
    doc = json.loads(printed["json"], parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert doc["kind"] == next(iter(result.docs.values()))["kind"] if len(result.docs) == 1 else isinstance(doc, dict)
    table = summary_table(want)
    md_rows = [line for line in printed["md"].splitlines() if line.startswith("| ")][1:]
    assert sorted(r.split(" | ")[0][2:] for r in md_rows) == sorted(str(i) for i in table.index)
    assert printed["latex"].startswith("\\begin{tabular}") and printed["latex"].rstrip().endswith("\\end{tabular}")
    assert printed["latex"].count("\\\\") == len(table) + 1  # a header row and one per figure


def test_a_narrow_compare_table_has_a_row_per_figure(tmp_path, data_dir):
    res = CliRunner().invoke(app, ["compare", *TINY, "--task", "sst2", "--k", "2", "--seeds", "1,2", "--n-test", "4",
                                   "--kendall-n", "2", "--updates-n", "2"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.split() == ["sst2", "sst2", "[untrained]"])
    assert lines[header + 2].split()[0] == "ZSL" and max(map(len, lines)) < 100
    assert "[" not in lines[header + 2].replace("[untrained]", "")  # two seeds: a mean, no bootstrap CI
