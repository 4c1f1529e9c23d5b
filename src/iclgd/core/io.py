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


def cache_root() -> Path:
    """``$ICLGD_CACHE``, else ``~/.cache/iclgd`` (where bug logs go, and what a path under it is blamed on)."""
    return Path(os.environ.get("ICLGD_CACHE") or Path.home() / ".cache" / "iclgd")


def ensure_dir(path: str | Path) -> Path:
    path = Path(path)
    from iclgd.core.errors import setting_for

    what = setting_for(path)
    what = "--out" if what == "its folder" else what
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IclgdError(f"{what} {path}: cannot create the output directory ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise IclgdError(f"{what} {path}: the output directory is not writable")
    return path


def file_mode() -> int:
    """The mode a plain ``open`` gives a new file (0644 under the usual umask 022): results are readable by the
    group like any file the user writes; a temporary file of ``mkstemp`` alone would stay 0600."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    from iclgd.core.errors import disk_error

    path = Path(path)
    ensure_dir(path.parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        err = disk_error(e, path)
        if err is not None:
            raise err from None
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


TIDY_COLUMNS = ("task", "seed", "condition", "layer", "metric", "value", "baseline")  # every tidy results table


def tidy_frame(rows: list[dict], columns=TIDY_COLUMNS):
    """A tidy table as a DataFrame: ``seed`` and ``layer`` stay integers (pandas' nullable Int64) where a row has
    none (a figure over all layers), instead of turning the whole column into floats (seed 1.0)."""
    import pandas as pd

    df = pd.DataFrame(rows, columns=list(columns))
    for c in ("seed", "layer"):
        if c in df and df[c].notna().any():
            vals = df[c].dropna()
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() for v in vals):
                df[c] = df[c].astype("Int64")
    return df


UNDEFINED = "undefined_values"  # where strict JSON holds null for a value that is not a number (NaN, ±inf)


def strict(obj: Any) -> Any:
    """``obj`` as strict JSON can hold it: every NaN or infinity becomes null, and an object gets an
    ``undefined_values`` entry (their count, each one's path of keys and indices, and what it was) so that
    :func:`restore` gives the values back. A figure is undefined where, e.g., FT fixed no ZSL error (Rec2FTP)."""
    import math

    paths, values = [], []

    def walk(v, path):
        if isinstance(v, float) and not math.isfinite(v):
            paths.append(path), values.append("NaN" if v != v else ("Infinity" if v > 0 else "-Infinity"))
            return None
        if isinstance(v, dict):
            return {k: walk(x, [*path, k]) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, [*path, i]) for i, x in enumerate(v)]
        return v

    out = walk(obj, [])
    if paths and isinstance(out, dict):
        out[UNDEFINED] = {"count": len(paths), "paths": paths, "values": values}
    return out


def restore(doc: Any) -> Any:
    """A document :func:`strict` wrote, with its undefined values back in place (and the bookkeeping removed)."""
    if not isinstance(doc, dict) or not isinstance(doc.get(UNDEFINED), dict):
        return doc
    und = doc.pop(UNDEFINED)
    for path, value in zip(und.get("paths", []), und.get("values", [])):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = json.loads(value)  # the json module's own NaN and infinities, as a non-strict read gives
    return doc


def to_json(obj: Any) -> str:
    """Deterministic strict JSON (sorted keys, fixed float repr; undefined values as null, :func:`strict`) so equal
    results give equal bytes and any JSON parser reads them."""
    return json.dumps(strict(obj), indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def read_json(path: str | Path) -> Any:
    """A JSON file iclgd wrote, its undefined values restored (:func:`restore`)."""
    return restore(json.loads(Path(path).read_text(encoding="utf-8")))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj))


def atomic_write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(strict(r), sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
                                    for r in rows))


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
    """Library versions (torch-free: the report reads this module; runs add the hardware,
    :func:`iclgd.core.models.run_versions`)."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ["iclgd", "torch", "transformers", "tokenizers", "numpy", "scipy", "gguf", "accelerate"]:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def read_result(path: Path) -> dict | None:
    """A JSON object file iclgd wrote (a unit's result, a run's record), None if absent; a damaged file is the
    user's to know about, with the remedy that fits it (a unit is recomputed; any other file is its run's)."""
    path = Path(path)
    fix = ("delete it to recompute that unit" if "units" in path.parts else
           "it was edited or damaged: restore it, or rerun into another --out (or with --overwrite)")
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise IclgdError(f"{path}: corrupted file (not valid JSON); {fix}") from None
    except OSError as e:
        raise IclgdError(f"{path}: cannot read the file ({e.strerror})") from None
    if not isinstance(doc, dict):
        raise IclgdError(f"{path}: not an iclgd file (a JSON {type(doc).__name__}, expected an object); {fix}")
    try:
        return restore(doc)
    except (KeyError, IndexError, TypeError, ValueError):
        raise IclgdError(f"{path}: its {UNDEFINED} do not match the document; {fix}") from None
