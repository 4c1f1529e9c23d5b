import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from iclgd.cli import app

ARGS = ["reproduce", "--model", "tiny-random-llama", "--tasks", "sst2,cb", "--seeds", "1", "--n-test", "5", "--k", "2",
        "--no-synthetic"]


def _results(d: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted((d / "units").glob("*/result.json"))}


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> Path:
    """The reference: the sweep of ARGS run uninterrupted in this process."""
    out = tmp_path_factory.mktemp("single") / "full"
    res = CliRunner().invoke(app, ARGS + ["--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_sigkill_mid_sweep_then_resume_equals_uninterrupted_byte_for_byte(tmp_path, single_process_run):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "iclgd.cli", *ARGS, "--out", str(cut)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((cut / "units").glob("*/result.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # a real kill -9, mid-sweep
    proc.wait()
    n_before = len(_results(cut))
    assert 1 <= n_before < len(_results(single_process_run))
    assert not list(cut.rglob("*.tmp")) or all(p.name.startswith(".") for p in cut.rglob("*.tmp"))
    resumed = CliRunner().invoke(app, ARGS + ["--out", str(cut)])
    assert resumed.exit_code == 0, resumed.output
    assert f"{n_before} already finished" in resumed.output
    assert _results(cut) == _results(single_process_run)  # identical bytes, unit by unit
    again = CliRunner().invoke(app, ARGS + ["--out", str(cut)])
    assert "0 units run" in again.output  # finished units are never recomputed
    report = (cut / "report.md").read_text()
    assert "## Accuracy" in report and "## Deviations from the paper" in report and "Units finished: 5 of 5" in report
    assert (cut / "results.csv").read_text().startswith("unit,metric,layer,value")
    # the paired control column: trained − untrained SimAOU of the same seed, from the unit files
    import json

    from iclgd.core.metrics import scalar

    unit = lambda name: json.loads((cut / "units" / name / "result.json").read_text())["result"]  # noqa: E731
    diff = scalar(unit("compare-sst2-s1"), "simaou") - scalar(unit("compare-sst2-s1-untrained"), "simaou")
    lines = report.splitlines()
    h = next(i for i, x in enumerate(lines) if "SimAOU − untrained" in x)  # the metrics table's header
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    header = cells(lines[h])
    row = cells(next(x for x in lines[h + 2:] if x.startswith("| sst2")))
    assert float(row[header.index("SimAOU − untrained")]) == pytest.approx(diff, abs=6e-4)


def test_report_regenerates_from_files_alone(tmp_path):
    args = ["reproduce", "--model", "tiny-random-llama", "--tasks", "sst2", "--seeds", "1", "--n-test", "4", "--k", "2",
            "--no-synthetic", "--no-dual", "--no-untrained", "--out", str(tmp_path)]
    assert CliRunner().invoke(app, args).exit_code == 0
    first = (tmp_path / "report.md").read_text()
    (tmp_path / "report.md").unlink()
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 0 and (tmp_path / "report.md").read_text() == first


def test_shards_partition_the_units():
    from iclgd.experiments.sweep import SweepConfig, plan

    units = plan(SweepConfig(tasks=["sst2", "cb"], seeds=[1, 2]))
    shards = [units[i::3] for i in range(3)]
    assert sorted(u.id for s in shards for u in s) == sorted(u.id for u in units)
    assert len({u.id for u in units}) == len(units) == 1 + 2 * 2 * 2 + 1


def test_accelerate_launch_ranks_become_shards(monkeypatch):
    from iclgd.experiments.sweep import parse_shard

    assert parse_shard(None) == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_shard(None) == (2, 4)
    assert parse_shard("1/3") == (1, 3)  # an explicit --shard wins


def test_two_processes_under_accelerate_launch_equal_one_process_byte_for_byte(tmp_path, single_process_run):
    """The README's cluster commands, run as written: 2 CPU processes, each takes RANK/WORLD_SIZE as its shard.

    accelerate's own ``--cpu`` starts several processes only through MPI; ``--multi_gpu`` launches through
    torch.distributed.run, which on a machine without GPUs starts plain CPU processes (iclgd needs no process group).
    """
    out = tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "iclgd.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*launch, *ARGS, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [line for line in res.stdout.splitlines() if "units run" in line]
    assert len(ranks) == 2 and {line.split("(shard: ")[1].split(" of")[0] for line in ranks} == {"3", "2"}
    rep = subprocess.run([sys.executable, "-m", "iclgd.cli", "report", str(out)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert _results(out) == _results(single_process_run)  # every unit, byte for byte (timings live elsewhere)
    assert "Units finished: 5 of 5" in (out / "report.md").read_text()
