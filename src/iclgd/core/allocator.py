"""The host allocator, set by the process itself: glibc's mmap threshold fixed at 1 MiB.

glibc raises its mmap threshold to the size of the largest buffer freed so far (up to 32 MiB); after the first
multi-MB tensor is freed, later ones of that size come from the heap, whose freed pieces fragment, and the peak host
memory of a scoring pass then moves by hundreds of MB from run to run (benchmarks/bench_scale.py). A fixed threshold
sends every buffer of 1 MiB or more to its own mapping, returned to the OS when freed. iclgd sets it through
``mallopt`` when a model is loaded, unless the environment already chose (``MALLOC_MMAP_THRESHOLD_``) or asked for
glibc's default (``ICLGD_MALLOC=default``); every results file records what applies (``versions.hardware.allocator``).
"""

from __future__ import annotations

import ctypes
import os
import platform

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
THRESHOLD = 1 << 20
_STATE: dict | None = None


def tune() -> dict:
    """Fix glibc's mmap threshold once per process (idempotent); returns what applies."""
    global _STATE
    if _STATE is not None:
        return _STATE
    libc, version = platform.libc_ver()
    if libc != "glibc":
        _STATE = {"allocator": libc or "unknown", "mmap_threshold": None, "set_by": "not glibc: left as it is"}
    elif os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        _STATE = {"allocator": f"glibc {version}", "mmap_threshold": os.environ["MALLOC_MMAP_THRESHOLD_"],
                  "set_by": "the environment (MALLOC_MMAP_THRESHOLD_)"}
    elif os.environ.get("ICLGD_MALLOC") == "default":
        _STATE = {"allocator": f"glibc {version}", "mmap_threshold": "dynamic (glibc's default)",
                  "set_by": "ICLGD_MALLOC=default"}
    else:
        ok = ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1
        _STATE = {"allocator": f"glibc {version}", "mmap_threshold": THRESHOLD if ok else "dynamic (mallopt failed)",
                  "set_by": "iclgd (mallopt)" if ok else "nobody: mallopt refused"}
    return _STATE


def state() -> dict | None:
    """What :func:`tune` applied in this process (None: not called)."""
    return _STATE
