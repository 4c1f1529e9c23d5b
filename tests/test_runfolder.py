"""Run folders with integrity (issue 16): one writer at a time, a folder never mixes two configurations,
an invalid value never blocks the corrected command, and the settings recorded are the ones applied."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from iclgd.cli import app
from iclgd.core.runfolder import lock

SWEEP = ["reproduce", "--tasks", "sst2", "--n-test", "2", "--k", "2", "--no-untrained", "--no-dual",
         "--no-synthetic"]


def test_an_invalid_value_recorded_in_sweep_json_does_not_block_the_corrected_command(tmp_path):
    out = tmp_path / "rep"
    bad = CliRunner().invoke(app, [*SWEEP, "--model", "gpt-17", "--out", str(out)])
    assert bad.exit_code == 2 and "unknown model" in bad.output
    good = CliRunner().invoke(app, [*SWEEP, "--model", "tiny-random-gpt2", "--out", str(out)])
    assert good.exit_code == 0, good.output
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["config"]["model"] == "tiny-random-gpt2"
    assert doc["data"]["sha256"] and all(len(v) == 64 for v in doc["data"]["sha256"].values())
    # the finished unit now pins the folder: another model is refused, --overwrite discards and reruns
    other = CliRunner().invoke(app, [*SWEEP, "--model", "tiny-random-llama", "--out", str(out)])
    assert other.exit_code == 2 and "differs in model" in other.output
    again = CliRunner().invoke(app, [*SWEEP, "--model", "tiny-random-llama", "--out", str(out), "--overwrite"])
    assert again.exit_code == 0, again.output
    unit = json.loads((out / "units" / "compare-sst2-s1" / "result.json").read_text())
    assert unit["unit"]["params"]["model"] == "tiny-random-llama"
    assert CliRunner().invoke(app, ["report", str(out)]).exit_code == 0


def test_a_second_concurrent_writer_is_refused(tmp_path):
    out = tmp_path / "rep"
    with lock(out, "shard-0-of-1"):
        res = CliRunner().invoke(app, [*SWEEP, "--model", "tiny-random-gpt2", "--out", str(out)])
    assert res.exit_code == 2 and "another iclgd process" in res.output
    assert not (out / "sweep.json").exists()  # refused before anything was written
    with lock(out, "writer"):
        res = CliRunner().invoke(app, ["pretrain", "--config", "tiny", "--steps", "1", "--out", str(out)])
    assert res.exit_code == 2 and "another iclgd process" in res.output


def small_corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("".join(f"line {i}: the quick brown fox jumps over dog {i % 7}\n" for i in range(600)))
    return str(p)


def test_pretrain_resumes_only_its_own_configuration(tmp_path):
    out = tmp_path / "pre"
    args = ["pretrain", "--config", "tiny", "--steps", "2", "--corpus", small_corpus(tmp_path), "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    cfg = (out / "config.json").read_text()
    final = (out / "final.json").read_text()
    res = CliRunner().invoke(app, [*args, "--attention", "momentum"])
    assert res.exit_code == 2 and "differs in attention" in res.output
    assert (out / "config.json").read_text() == cfg and (out / "final.json").read_text() == final
    assert CliRunner().invoke(app, args).exit_code == 0  # the same configuration resumes (nothing to do) ...
    assert (out / "final.json").read_text() == final  # ... and leaves its summary as it was (not a NaN loss)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus.read_text().replace("fox", "cat"))  # same name, other text
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "corpus data" in res.output and (out / "final.json").read_text() == final
    res = CliRunner().invoke(app, [*args, "--attention", "momentum", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["attention"] == "momentum"
    assert json.loads((out / "final.json").read_text())["config"]["attention"] == "momentum"


def test_dtype_and_device_recorded_are_applied(tmp_path):
    from iclgd.core.models import load_model

    lm = load_model("tiny-random-llama", dtype="float64")
    assert {p.dtype for p in lm.model.parameters()} == {torch.float64}
    out = tmp_path / "ev"
    args = ["eval", "--model", "tiny-random-llama", "--n-test", "2", "--k", "1", "--dtype", "float64", "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    first = (out / "results.json").read_text()
    assert json.loads(first)["config"]["dtype"] == "float64"
    res = CliRunner().invoke(app, [*args[:-4], "--dtype", "float32", "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output and (out / "results.json").read_text() == first
    res = CliRunner().invoke(app, [*args[:-4], "--dtype", "float32", "--out", str(out), "--overwrite"])
    assert res.exit_code == 0 and json.loads((out / "results.json").read_text())["config"]["dtype"] == "float32"


def test_batch_size_checked_in_the_engine_too(tiny, data_dir):
    import pytest

    from iclgd.core.errors import IclgdError
    from iclgd.core.tasks import TASKS, load_task
    from iclgd.engine.scoring import EvalConfig, evaluate

    with pytest.raises(IclgdError, match="--batch-size"):
        evaluate(tiny("tiny-random-llama"), load_task(TASKS["sst2"], data_dir, 2), EvalConfig(k=1, batch_size=-1))


def test_a_failed_first_run_leaves_no_folder(tmp_path):
    res = CliRunner().invoke(app, ["eval", "--model", "tiny-random-llama", "--task", "imdb",
                                   "--out", str(tmp_path / "new" / "deeper")])
    assert res.exit_code == 2 and not (tmp_path / "new").exists()


def test_lock_files_are_removed_when_the_run_ends_and_waiters_still_exclude(tmp_path):
    """Lock files do not outlive their run (issue 28), and removing them keeps mutual exclusion: a waiter that
    opened the old file retries on the new one, so two holders never overlap."""
    import threading
    import time

    from iclgd.core.runfolder import lock

    with lock(tmp_path):
        assert (tmp_path / ".iclgd-writer.lock").is_file()
    assert not list(tmp_path.glob(".iclgd-*.lock"))
    inside, overlaps = [], []

    def worker():
        with lock(tmp_path, "sweep", wait=True):
            inside.append(1)
            if len(inside) > 1:
                overlaps.append(1)
            time.sleep(0.02)
            inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlaps and not list(tmp_path.glob(".iclgd-*.lock"))
