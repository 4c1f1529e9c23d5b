"""Atomic result files and provenance (library versions, data checksums)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from iclgd.core.errors import IclgdError


def ensure_dir(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IclgdError(f"--out {path}: cannot create the output directory ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise IclgdError(f"--out {path}: the output directory is not writable")
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(path: str | Path, rows: list[dict], fields: list[str]) -> None:
    """A CSV with a header row of ``fields``, written atomically (training logs)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fields)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def to_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, fixed float repr) so equal results give equal bytes."""
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=True) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj))


def atomic_write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))


_SHA_CACHE: dict[tuple[str, float, int], str] = {}


def sha256_file(path: str | Path) -> str:
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime, st.st_size)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def library_versions() -> dict:
    """Library versions, and where torch is loaded the hardware and the determinism flags in force."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ["iclgd", "torch", "transformers", "tokenizers", "numpy", "scipy", "gguf", "accelerate"]:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    if "torch" in sys.modules:  # a report never imports torch
        out["hardware"] = hardware()
    return out


def hardware() -> dict:
    """CPU threads, GPUs with the driver, CUDA and cuDNN versions, and the flags that decide determinism."""
    import torch

    hw = {"cpu_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
          "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
    if torch.cuda.is_available():
        hw.update({"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                   "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                   "driver": _nvidia_driver(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                   "cudnn_benchmark": torch.backends.cudnn.benchmark,
                   "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")})
    return hw


def _nvidia_driver() -> str:
    import subprocess

    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        return r.stdout.split()[0] if r.returncode == 0 and r.stdout.split() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def read_result(path: Path) -> dict | None:
    """A finished unit's result, None if absent; a damaged file is the user's to know about."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise IclgdError(f"{path}: corrupted result file (not valid JSON); delete it to recompute that unit") from None
    except OSError as e:
        raise IclgdError(f"{path}: cannot read the result file ({e.strerror})") from None
    if not isinstance(doc, dict):
        raise IclgdError(f"{path}: not an iclgd result file (a JSON {type(doc).__name__}, expected an object); "
                         "delete it to recompute that unit")
    return doc
