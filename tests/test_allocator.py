"""iclgd sets glibc's mmap threshold itself (core/allocator.py) unless the environment chose, and every results file
records what applied (versions.hardware.allocator)."""

import json
import os
import platform
import subprocess
import sys

import pytest

CODE = ("import json; from iclgd.core import allocator; a = allocator.tune(); "
        "from iclgd.core.models import load_model, hardware; load_model('tiny-random-llama'); "
        "print(json.dumps([a, hardware()['allocator']]))")


def _run(**env):
    e = {k: v for k, v in os.environ.items() if k not in ("ICLGD_MALLOC", "MALLOC_MMAP_THRESHOLD_")}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=e, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the mmap threshold is glibc's")
def test_the_threshold_is_set_once_by_iclgd_and_recorded():
    applied, recorded = _run()
    assert applied == recorded
    assert applied["mmap_threshold"] == 1 << 20 and applied["set_by"] == "iclgd (mallopt)"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the mmap threshold is glibc's")
def test_the_environment_wins_and_is_recorded_as_the_environment():
    applied, recorded = _run(MALLOC_MMAP_THRESHOLD_="2097152")
    assert applied == recorded and applied["mmap_threshold"] == "2097152" and "environment" in applied["set_by"]
    applied, recorded = _run(ICLGD_MALLOC="default")
    assert applied == recorded and applied["set_by"] == "ICLGD_MALLOC=default"
    assert applied["mmap_threshold"] == "dynamic (glibc's default)"
