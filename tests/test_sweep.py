import json
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
    # tidy: a row per task, seed, condition, layer and metric, with the figure's baseline and the unit it came from
    import json as jsonlib

    import pandas as pd

    csv = pd.read_csv(cut / "results.csv")
    raw = pd.read_csv(cut / "results.csv", dtype=str)
    assert raw.seed.dropna().str.fullmatch(r"\d+").all() and raw.layer.dropna().str.fullmatch(r"\d+").all()  # 1, not 1.0
    assert list(csv.columns) == ["task", "seed", "condition", "layer", "metric", "value", "baseline", "unit"]
    simaou = csv[(csv.metric == "simaou") & csv.layer.isna()]
    assert set(simaou.condition) <= {"trained", "untrained"} and simaou.baseline.notna().all()
    for _, row in simaou.iterrows():
        unit = jsonlib.loads((cut / "units" / row.unit / "result.json").read_text())["result"]
        assert row.seed == unit["seed"] and row.value == pytest.approx(unit["simaou"]["overall"])
        assert row.baseline == pytest.approx(unit["simaou"]["baseline_uniform"]["overall"])
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


def test_plan_ids_are_unique():
    from iclgd.experiments.sweep import SweepConfig, plan

    units = plan(SweepConfig(tasks=["sst2", "cb"], seeds=[1, 2]))
    assert len({u.id for u in units}) == len(units) == 1 + 2 * 2 * 2 + 1


def test_queue_runs_longest_first_and_skips_a_unit_claimed_by_another_process(tmp_path):
    from iclgd.core.runfolder import claim
    from iclgd.experiments.sweep import SweepConfig, plan, queue, reproduce

    cfg = SweepConfig(model="tiny-random-llama", tasks=["sst2"], seeds=[1], n_test=3, k=2, synthetic=False)
    assert [u.kind for u in queue(plan(cfg))] == ["compare", "compare", "dual"]  # compare units before the dual check
    held = tmp_path / "units" / "compare-sst2-s1"
    with claim(held) as mine:  # as another process running that unit would
        assert mine
        with claim(held) as again:
            assert not again  # a second claim on the same unit is refused
        r = reproduce(cfg, tmp_path, progress=False)
    assert (r["ran"], r["elsewhere"], r["unfinished"]) == (2, 1, ["compare-sst2-s1"])
    assert not (held / "result.json").exists()
    r = reproduce(cfg, tmp_path, progress=False)  # claim released: the next process takes it
    assert (r["ran"], r["skipped"], r["unfinished"]) == (1, 2, [])


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
    assert len(ranks) == 2 and sum(int(line.split(" units run")[0]) for line in ranks) == 5  # each unit once
    rep = subprocess.run([sys.executable, "-m", "iclgd.cli", "report", str(out)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert _results(out) == _results(single_process_run)  # every unit, byte for byte (timings live elsewhere)
    assert "Units finished: 5 of 5" in (out / "report.md").read_text()


def test_eval_only_sweep_scores_zsl_once_and_equals_iclgd_eval(tmp_path, data_dir):
    from iclgd.core.tasks import TASKS, load_task
    from iclgd.engine.scoring import EvalConfig, evaluate
    from iclgd.experiments.sweep import _Models, SweepConfig, reproduce
    from iclgd.report import load_units

    cfg = SweepConfig(model="tiny-random-llama", tasks=["sst2"], seeds=[1, 2], n_test=4, k=2, eval_only=True,
                      dual=False, synthetic=False)
    r = reproduce(cfg, tmp_path, progress=False)
    units = load_units(tmp_path)
    assert sorted(units) == ["icl-sst2-s1", "icl-sst2-s2", "zsl-sst2"] and r["ran"] == 3  # one ZSL for both seeds
    lm = _Models(cfg, tmp_path).get("trained")
    for seed in (1, 2):
        ref = evaluate(lm, load_task(TASKS["sst2"], data_dir, 4), EvalConfig(k=2, seed=seed), progress=False)
        icl = units[f"icl-sst2-s{seed}"]["result"]
        assert icl["acc"] == ref["acc_icl"] and icl["pred_counts"] == ref["icl_pred_counts"]
        assert [x["logprobs"] for x in icl["records"]] == [x["icl_logprobs"] for x in ref["records"]]
        assert units["zsl-sst2"]["result"]["acc"] == ref["acc_zsl"]
    report = (tmp_path / "report.md")
    from iclgd.report import write_report

    write_report(tmp_path)
    assert "## Accuracy (%): ZSL and ICL" in report.read_text() and (tmp_path / "plots" / "accuracy.png").is_file()
