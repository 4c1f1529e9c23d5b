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


def differing_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ, nested ones as dotted paths (``run.heads``)."""
    new = json.loads(json.dumps(new))
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differing_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(prefix + k)
    return out


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


# ----------------------------------------------------------------------------- the one run-folder guard

MANIFEST = "iclgd-run.json"  # what a run folder says of itself: command, configuration, files not its own


def _listing(folder: Path) -> set[str]:
    """Every file (or link) under ``folder`` as a relative path, the guard's own files apart."""
    out = set()
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST and not (name.startswith(".iclgd-") and name.endswith(".lock")):
                out.add(rel)
    return out


def _remove(folder: Path, files: set[str]) -> None:
    """Remove ``files`` (relative to ``folder``), then the folders they leave empty."""
    dirs = set()
    for rel in sorted(files):
        p = folder / rel
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        dirs.update(str(q) for q in Path(rel).parents if str(q) != ".")
    for rel in sorted(dirs, key=lambda d: -d.count(os.sep)):
        try:
            (folder / rel).rmdir()
        except OSError:  # not empty: it holds files that are not this run's
            pass


def json_config(obj):
    """A configuration as JSON values: dataclasses as dicts, paths as strings, a model object by its name."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: json_config(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): json_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_config(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    name = getattr(obj, "name", None) or getattr(getattr(obj, "config", None), "_name_or_path", None)
    return f"<{type(obj).__name__} {name}>" if name else f"<{type(obj).__name__}>"


def _read_manifest(folder: Path) -> dict | None:
    doc = read_json_object(folder / MANIFEST, "run manifest", ("command", "config"))
    if doc is not None and not (isinstance(doc["command"], str) and isinstance(doc.get("foreign", []), list)):
        raise IclgdError(f"{folder / MANIFEST}: not an iclgd run manifest (command or foreign of the wrong type); "
                         "delete the folder's results, or use another --out")
    return doc


def plan_folder(out, command: str, config, overwrite: bool, resumable: bool = False) -> tuple[str, set[str], set[str]]:
    """What a run of ``command`` with ``config`` may do in ``out``: ("fresh" | "resume" | "replace", the files it will
    remove, the files that are not iclgd's). Refused (one line) when the folder holds another command's or another
    configuration's files, or an earlier run's results, unless ``overwrite``. Reads only: nothing is written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IclgdError(f"--out {out}: exists and is not a directory")
    if not out.is_dir():
        return "fresh", set(), set()
    present = _listing(out)
    man = _read_manifest(out)
    config = json_config(config)
    if man is None:
        if present and not overwrite:
            raise IclgdError(f"--out {out}: holds {len(present)} file(s) that no iclgd run recorded (e.g. "
                             f"{sorted(present)[0]}); use an empty or new --out, or --overwrite to write beside them")
        return "fresh", set(), present
    foreign = set(man.get("foreign", [])) & present
    owned = present - foreign
    what = f"a `{man['command']}` run"
    if man["command"] != command:
        if owned and not overwrite:
            raise IclgdError(f"--out {out}: holds {what} ({MANIFEST}), not a `{command}` run; use another --out, or "
                             "--overwrite to replace it")
        return "replace", owned, foreign
    differ = differing_keys(man["config"] if isinstance(man["config"], dict) else {}, config)
    if differ:
        if owned and not overwrite:
            raise IclgdError(f"--out {out}: holds {what} of another configuration (differs in {', '.join(differ)}); "
                             "use another --out, or --overwrite to replace it")
        return "replace", owned, foreign
    if resumable and not overwrite:
        return "resume", set(), foreign
    if owned and not overwrite:
        raise IclgdError(f"--out {out}: holds the results of an earlier `{command}` run of the same configuration "
                         f"(e.g. {sorted(owned)[0]}); pass --overwrite to replace them, or use another --out")
    return "replace", owned, foreign


@contextmanager
def run_folder(out, command: str, config, overwrite: bool = False, resumable: bool = False,
               exclusive: bool = True) -> Iterator[Path | None]:
    """The one guard every writer of a run folder goes through (every command and layout).

    It refuses a folder holding another command's or another configuration's files, or an earlier run's results
    (:func:`plan_folder`), unless ``overwrite``, which first removes what the earlier run wrote (never files it
    did not write); a ``resumable`` run of the same configuration continues. It records the command and its
    configuration in ``iclgd-run.json`` and holds the folder's lock for the block (``exclusive=False``: shards of
    one sweep share the folder; each takes its own lock). A run that fails before writing a file leaves nothing."""
    if out is None:
        yield None
        return
    from iclgd.core.errors import OUT_FOLDERS

    out = Path(out)
    OUT_FOLDERS.append(out)
    try:
        with _guarded(out, command, config, overwrite, resumable, exclusive):
            yield out
    finally:
        OUT_FOLDERS.remove(out)


@contextmanager
def _guarded(out: Path, command: str, config, overwrite: bool, resumable: bool, exclusive: bool) -> Iterator[None]:
    plan_folder(out, command, config, overwrite, resumable)  # refused before the folder is made
    created = not out.exists()
    from contextlib import ExitStack

    from iclgd.core.io import atomic_write_json

    with ExitStack() as stack:
        stack.enter_context(lock(out, "writer" if exclusive else "guard", wait=not exclusive))
        action, remove, foreign = plan_folder(out, command, config, overwrite, resumable)  # now under the lock
        _remove(out, remove)
        man = {"kind": "iclgd.run", "command": command, "config": json_config(config), "foreign": sorted(foreign),
               "status": "running"}
        atomic_write_json(out / MANIFEST, man)
        if not exclusive:
            stack.close()  # the shards of a sweep agreed on the folder; each holds its own lock from here
        ok = False
        try:
            yield
            ok = True
        finally:
            owned = _listing(out) - foreign if out.is_dir() else set()
            if ok and exclusive:
                atomic_write_json(out / MANIFEST, {**man, "status": "done", "files": sorted(owned)})
            elif not ok and not owned and action != "resume":  # nothing written: leave the folder as it was
                try:
                    (out / MANIFEST).unlink()
                    if created and not exclusive and not os.listdir(out):  # (else the lock removes it)
                        out.rmdir()
                except OSError:
                    pass
