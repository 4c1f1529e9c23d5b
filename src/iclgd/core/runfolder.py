"""Run folders with integrity: one writer at a time, and nothing of an earlier run replaced silently.

A folder remembers the configuration that produced it; a run with another configuration is refused
unless the user asks for ``--overwrite``. A lock file (``fcntl.flock``, released by the kernel when the
process ends, so a killed run never leaves a stale lock) refuses a second concurrent writer.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from iclgd.core.errors import IclgdError
from iclgd.core.io import ensure_dir


def _locked_file(path: Path, wait: bool):
    """Open and flock ``path``; None when another process holds it (and not ``wait``). A holder removes the file
    when it is done, so the lock taken is checked to be on the file that is still at ``path`` (else retried)."""
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return f, False
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return f, True
        f.close()  # the holder removed it between our open and our lock: take the new one


@contextmanager
def lock(folder: Path, name: str = "writer", wait: bool = False) -> Iterator[None]:
    """Hold ``folder/.iclgd-<name>.lock`` for the block; a second holder is refused (or waits, ``wait``). The lock
    file is removed when the block ends (a killed process leaves it, unlocked: the kernel releases the lock)."""
    top = None  # the outermost folder this call creates
    for p in [Path(folder), *Path(folder).parents]:
        if p.exists():
            break
        top = p
    folder = ensure_dir(folder)
    path = folder / f".iclgd-{name}.lock"
    f, ok_lock = _locked_file(path, wait)
    ok = False
    try:
        if not ok_lock:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise IclgdError(f"{folder}: another iclgd process (pid {pid}) is writing to this folder ({path.name}); "
                             "wait for it to finish, or use another --out") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
        ok = True
    finally:
        if ok_lock:
            try:
                path.unlink()  # while still holding it: a waiter that opened it retries on a fresh file
            except FileNotFoundError:
                pass
        if not ok and top is not None and not os.listdir(folder):  # a failed first run leaves no folder
            for p in [folder, *folder.parents]:
                p.rmdir()
                if p == top:
                    break
        f.close()  # closing releases the lock


@contextmanager
def claim(folder: Path, name: str = "claim") -> Iterator[bool]:
    """Non-blocking: True while holding ``folder/.iclgd-<name>.lock``, False when another process holds it.

    A sweep's processes claim each unit so; the kernel releases the claim of a process that dies."""
    folder = ensure_dir(folder)
    with open(folder / f".iclgd-{name}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """An earlier run's result file is never replaced without ``--overwrite``."""
    for p in paths:
        if p.exists() and not overwrite:
            raise IclgdError(f"{p}: exists from an earlier run; pass --overwrite to replace it, or use another --out")


def differing_keys(old: dict, new: dict) -> list[str]:
    new = json.loads(json.dumps(new))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def read_json_object(path: Path, what: str, keys: tuple[str, ...] = ()) -> dict | None:
    """A JSON object file with the given keys, None when absent; any other content is a one-line error."""
    from iclgd.core.io import read_result

    doc = read_result(path)
    if doc is None:
        return None
    lacking = [k for k in keys if k not in doc]
    if lacking:
        raise IclgdError(f"{path}: not an iclgd {what} (lacks {', '.join(lacking)}); delete it or use another folder")
    return doc
