"""Progress where users run long work: a bar on a terminal, whole lines in a log file (Slurm, nohup), none with
--quiet or ICLGD_PROGRESS=off; the results on stdout untouched."""

import io
import os
import subprocess
import sys

import pytest

from iclgd.core import progress as P

ARGS = ["eval", "--model", "tiny-random-llama", "--task", "sst2", "--k", "2", "--n-test", "4"]


def _run(tmp_path, env_progress, *pre):
    env = {k: v for k, v in os.environ.items() if k != "ICLGD_PROGRESS"}
    if env_progress is not None:
        env["ICLGD_PROGRESS"] = env_progress
    out = tmp_path / f"ev-{env_progress}-{len(pre)}"
    r = subprocess.run([sys.executable, "-m", "iclgd.cli", *pre, *ARGS, "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=300)  # stderr a pipe, as in a log file
    assert r.returncode == 0, r.stderr
    return r


def test_a_log_file_gets_whole_progress_lines_and_stdout_only_the_results(tmp_path):
    r = _run(tmp_path, None)
    lines = [x for x in r.stderr.splitlines() if "it/s]" in x]
    assert any(x.startswith("sst2 ZSL: 100%|") for x in lines), r.stderr
    assert any(x.startswith("sst2 ICL k=2: 100%|") for x in lines), r.stderr
    assert "\r" not in r.stderr  # no redraws: one line per update
    assert "it/s" not in r.stdout and r.stdout.splitlines()[0].split()[:3] == ["task", "seed", "acc_zsl"]


@pytest.mark.parametrize("how", ["quiet", "off", "tty"])
def test_no_progress_with_quiet_off_or_tty_mode_off_a_terminal(tmp_path, how):
    r = _run(tmp_path, *({"quiet": (None, "--quiet"), "off": ("off",), "tty": ("tty",)}[how]))
    assert "it/s" not in r.stderr, r.stderr


def test_the_line_writer_drops_redraws_and_blank_clears():
    buf = io.StringIO()
    w = P._Lines(buf)
    w.write("\rscoring:  50%|#####     | 2/4   ")
    w.write("\r" + " " * 40 + "\r")  # tqdm clearing a bar with leave=False
    w.write("\n")
    assert buf.getvalue() == "scoring:  50%|#####     | 2/4\n"


def test_an_unknown_mode_is_auto(monkeypatch):
    monkeypatch.setenv("ICLGD_PROGRESS", "sometimes")
    assert P.mode() == "auto" and P.shown()


def test_a_log_gets_the_first_and_last_state_and_at_most_a_line_a_minute(monkeypatch, capsys):
    """set_postfix redraws at every call (world training calls it every 100 steps): in a log that is one line a
    minute, not one per call; nested bars' cursor moves are not written."""
    monkeypatch.setenv("ICLGD_PROGRESS", "lines")
    outer = P.bar(range(2), desc="units", position=0)
    for u in outer:
        b = P.bar(range(50), desc="steps", position=1)
        for i in b:
            b.set_postfix(loss=i)
        b.close()
    err = capsys.readouterr().err
    steps = [x for x in err.splitlines() if x.startswith("steps")]
    assert len(steps) <= 2 * 3 and steps[-1].startswith("steps: 100%|"), err  # per bar: first, (final) and last
    assert "\x1b" not in err and "\r" not in err
