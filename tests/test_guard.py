"""The one run-folder guard (issue 24, item 3) and the disk errors (item 4).

Every writer goes through :func:`iclgd.core.runfolder.run_folder`: a folder holding another command's or another
configuration's files is refused unless ``--overwrite``, which removes what the earlier run wrote and nothing else;
two writers never share a folder; a run that fails before writing leaves no folder. A full, read-only or
unwritable disk is one line naming the path and the setting that chose it (a real tmpfs where the machine lets a
user namespace mount one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from iclgd.cli import app
from iclgd.core.runfolder import MANIFEST, lock

EVAL = ["eval", "--model", "tiny-random-gpt2", "--n-test", "2", "--k", "1"]
COMPARE = ["compare", "--model", "tiny-random-gpt2", "--n-test", "2", "--k", "2", "--no-untrained"]
SYN = ["synthetic", "--steps", "2", "--layers", "1"]


def run(args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def test_another_command_is_refused_and_overwrite_removes_only_what_the_earlier_run_wrote(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, text = run([*COMPARE, "--out", out])
    assert code == 2 and "no iclgd run recorded (e.g. notes.txt)" in text  # a folder with a user's own files
    code, text = run([*COMPARE, "--out", out, "--overwrite"])
    assert code == 0, text
    written = {p.name for p in out.rglob("*")}
    assert {"records.jsonl", "results.json", MANIFEST} <= written and any(n.endswith(".png") for n in written)
    code, text = run([*EVAL, "--out", out])
    assert code == 2 and "holds a `compare` run" in text and "--overwrite" in text
    code, text = run([*EVAL, "--out", out, "--overwrite"])
    assert code == 0, text
    left = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert left == sorted(["notes.txt", "results.json", MANIFEST])  # no compare records or plots beside eval's
    man = json.loads((out / MANIFEST).read_text())
    assert man["command"] == "eval" and man["status"] == "done" and man["foreign"] == ["notes.txt"]
    assert man["config"]["eval"]["k"] == 1 and json.loads((out / "results.json").read_text())["kind"] == "iclgd.eval"


def test_a_multi_task_compare_of_another_configuration_is_refused(tmp_path):
    out = tmp_path / "cmp"
    assert run([*COMPARE, "--task", "sst2,cb", "--out", out])[0] == 0
    before = (out / "cb" / "results.json").read_bytes()
    code, text = run([*COMPARE[:-3], "--no-untrained", "--task", "sst2,cb", "--k", "3", "--out", out])
    assert code == 2 and "another configuration (differs in" in text and "compare" in text
    assert (out / "cb" / "results.json").read_bytes() == before  # nothing replaced


def test_world_train_into_a_folder_of_another_command_keeps_its_files(tmp_path):
    out = tmp_path / "ev"
    assert run([*EVAL, "--out", out])[0] == 0
    (out / "model").mkdir()
    (out / "model" / "weights.bin").write_bytes(b"x")  # a file the eval run did not write: not the guard's
    code, text = run(["world", "train", "--size", "tiny", "--steps", "1", "--out", out])
    assert code == 2 and "holds a `eval` run" in text
    assert (out / "model" / "weights.bin").read_bytes() == b"x" and (out / "results.json").is_file()


@pytest.mark.parametrize("args", [SYN, ["dual", "verify", "--model", "tiny-random-gpt2", "--k", "2"],
                                  ["dual", "compare-updates", "--before", "tiny-random-gpt2", "--after",
                                   "tiny-random-gpt2", "--k", "2"]])
def test_every_writer_takes_the_folder_lock(tmp_path, args):
    out = tmp_path / "busy"
    with lock(out):
        code, text = run([*args, "--out", out])
    assert code == 2 and "another iclgd process" in text
    assert not [p for p in out.iterdir()]  # the second writer wrote nothing


def test_same_configuration_twice_needs_overwrite_and_a_failed_run_leaves_no_folder(tmp_path):
    out = tmp_path / "syn"
    assert run([*SYN, "--out", out])[0] == 0
    code, text = run([*SYN, "--out", out])
    assert code == 2 and "earlier `synthetic` run of the same configuration" in text
    assert run([*SYN, "--out", out, "--overwrite"])[0] == 0
    nan = tmp_path / "nan"
    code, text = run(["compare", "--model", "tiny-random-gpt2", "--k", "3", "--n-test", "2", "--lr", "1e30",
                      "--no-untrained", "--out", nan])
    assert code == 2 and "loss became nan" in text and not nan.exists()


def test_a_hand_edited_manifest_is_one_line(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / MANIFEST).write_text('{"command": 3, "config": {}}')
    code, text = run([*EVAL, "--out", out])
    assert code == 2 and MANIFEST in text and "Traceback" not in text


# ----------------------------------------------------------------------------- full, read-only, unwritable disks

def _ns_ok() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                        "d=$(mktemp -d) && mount -t tmpfs -o size=16k tmpfs $d"], capture_output=True)
    return r.returncode == 0


NS = _ns_ok()
need_ns = pytest.mark.skipif(not NS, reason="this machine does not let a user namespace mount a tmpfs")


def _in_namespace(tmp_path: Path, mount_opts: str, argv: list[str], env: dict | None = None):
    """Run ``iclgd argv`` with a fresh tmpfs (``mount_opts``) mounted at tmp_path/disk, in a user namespace."""
    disk = tmp_path / "disk"
    disk.mkdir()
    cmd = (f"mount -t tmpfs -o {mount_opts} tmpfs {disk} && mkdir -p {disk}/d; "
           + (f"mount -o remount,ro {disk}; " if "ro" in env_flags(env) else "")
           + " ".join([sys.executable, "-m", "iclgd.cli", *[str(a) for a in argv]]))
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **{k: v for k, v in (env or {}).items() if k != "_flags"}}
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", cmd], capture_output=True,
                          text=True, env=e, timeout=300), disk


def env_flags(env):
    return (env or {}).get("_flags", "")


def _one_error(r) -> str:
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    return errors[0]


@need_ns
def test_a_full_disk_under_out_is_one_line_naming_out(tmp_path):
    r, disk = _in_namespace(tmp_path, "size=8k", [*SYN, "--out", tmp_path / "disk" / "d" / "run"])
    line = _one_error(r)
    assert "no space left" in line and "--out" in line


@need_ns
def test_a_full_tmpdir_where_compare_spills_its_captures_names_tmpdir(tmp_path):
    r, disk = _in_namespace(tmp_path, "size=4k", COMPARE, env={"TMPDIR": str(tmp_path / "disk" / "d")})
    line = _one_error(r)
    assert "no space left" in line and "TMPDIR" in line


@need_ns
def test_a_read_only_out_is_one_line(tmp_path):
    r, disk = _in_namespace(tmp_path, "size=1m", [*SYN, "--out", tmp_path / "disk" / "d" / "run"],
                            env={"_flags": "ro"})
    line = _one_error(r)
    assert "read-only" in line or "not writable" in line


@need_ns
def test_a_full_model_cache_names_iclgd_cache(tmp_path):
    r, disk = _in_namespace(tmp_path, "size=8k", ["eval", "--model", "smollm2-135m", "--n-test", "2", "--k", "1"],
                            env={"ICLGD_CACHE": str(tmp_path / "disk" / "d" / "cache")})
    line = _one_error(r)
    assert "ICLGD_CACHE" in line


def test_results_are_readable_by_the_group_like_any_file_the_user_writes(tmp_path):
    out = tmp_path / "syn"
    assert run([*SYN, "--out", out])[0] == 0
    old = os.umask(0o022)
    os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o666 & ~old}, modes  # results, manifest and plots alike
