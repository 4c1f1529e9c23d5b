"""Checks of option values, run by the CLI before any model is loaded, any work done or any file written.

Each check raises an :class:`~iclgd.core.errors.IclgdError` whose one line names the option, the value
and what was expected.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from iclgd.core.errors import IclgdError

DTYPES = ("float32", "float64", "bfloat16", "float16")
MAX_SEED = 2**32 - 1  # numpy's default_rng and torch.manual_seed both accept 0 .. 2**32-1 everywhere


def at_least(option: str, value: int | None, low: int) -> None:
    """``value >= low`` (None: the option was not given)."""
    if value is not None and value < low:
        want = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
        raise IclgdError(f"{option} {value}: expected {want}")


def batch_size(value: str) -> int | str:
    """``--batch-size``: 'auto' or a positive integer; returns the int, or 'auto'."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise IclgdError(f"--batch-size {value!r}: expected 'auto' or a positive integer") from None
    at_least("--batch-size", n, 1)
    return n


def positive_float(option: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise IclgdError(f"{option} {value}: expected a finite positive number")


def seed(option: str, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise IclgdError(f"{option} {value}: expected a seed between 0 and {MAX_SEED}")


def seed_list(option: str, values: list[int]) -> None:
    """Seeds are independent repetitions: each valid, none twice (a duplicate would count one run twice)."""
    for v in values:
        seed(option, v)
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise IclgdError(f"{option} {','.join(map(str, values))}: seed {dup[0]} appears twice (expected distinct seeds)")


def distinct(option: str, values: list) -> None:
    dup = sorted({str(v) for v in values if values.count(v) > 1})
    if dup:
        raise IclgdError(f"{option}: {dup[0]} appears twice (expected distinct values)")


def one_of(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise IclgdError(f"{option} {value!r}: expected one of {', '.join(allowed)}")


def dtype(value: str, allowed: tuple[str, ...] = DTYPES, option: str = "--dtype") -> None:
    one_of(option, value, allowed)


def device(value: str, option: str = "--device") -> None:
    """auto (CUDA, then MPS, else CPU), cpu, cuda or cuda:N (an available GPU), or mps (an available Apple GPU)."""
    if value == "auto":
        return
    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", value)
    if m is None or (m.group(1) != "cuda" and m.group(2) is not None):
        raise IclgdError(f"{option} {value!r}: expected auto, cpu, cuda, cuda:N or mps")
    if m.group(1) == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise IclgdError(f"{option} {value}: no CUDA GPU is available on this machine (use --device cpu)")
        if m.group(2) is not None and int(m.group(2)) >= torch.cuda.device_count():
            raise IclgdError(f"{option} {value}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if m.group(1) == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise IclgdError(f"{option} {value}: no Apple MPS GPU is available on this machine (use --device cpu)")


def device_map(value: str | None, dev: str) -> None:
    """``auto`` spreads a model over the GPUs; it replaces --device, so both at once would record a false device."""
    if value is None:
        return
    if value != "auto":
        raise IclgdError(f"--device-map {value!r}: expected auto")
    import torch

    if not torch.cuda.is_available():
        raise IclgdError("--device-map auto: no CUDA GPU is available on this machine")
    if not dev.startswith("cuda"):
        raise IclgdError(f"--device-map auto places the model on the GPUs; --device {dev} would be recorded "
                         "falsely (give --device cuda)")


def out_dir(path: Path | None, option: str = "--out") -> None:
    """An output folder that can be created and written, checked without creating it (nothing is left
    behind when a later check fails)."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise IclgdError(f"{option} {path}: exists and is not a directory")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise IclgdError(f"{option} {path}: cannot create the output directory ({probe} is not a directory)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise IclgdError(f"{option} {path}: the output directory is not writable ({probe})")


def text(option: str, value: str | None, allow_empty: bool = True) -> None:
    """A string option without NUL characters (they cannot reach a tokenizer or a file name)."""
    if value is None:
        return
    if "\x00" in value:
        raise IclgdError(f"{option}: contains a NUL character")
    if not allow_empty and not value.strip():
        raise IclgdError(f"{option} {value!r}: expected a non-empty value")
