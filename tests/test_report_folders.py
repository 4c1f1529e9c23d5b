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
    assert rows and list(rows[0]) == ["task", "seed", "condition", "layer", "metric", "value"]
    if kind == "eval":  # three seeds: the spread is shown
        assert " ± " in md


def test_report_refuses_a_folder_without_results(tmp_path):
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code != 0
    assert "no iclgd results here" in res.output
