"""One exception type for every error a user can cause.

The CLI turns an :class:`IclgdError` into a one-line message and exit status 2; any other
exception is a bug in iclgd and keeps its traceback.
"""


class IclgdError(Exception):
    """A user-caused error (bad option, missing or malformed data, unsupported model).

    The message must be a single line that names the file, line or option and says what was
    expected.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))


# ----------------------------------------------------------------------------- disks: full, read-only, not ours

import errno as _errno

DISK_ERRNOS = {_errno.ENOSPC: "no space left on the device", _errno.EDQUOT: "disk quota exceeded",
               _errno.EROFS: "read-only file system", _errno.EACCES: "permission denied",
               _errno.EPERM: "operation not permitted"}
_FULL = (_errno.ENOSPC, _errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


OUT_FOLDERS: list = []  # the run folders being written (the run-folder guard pushes --out here)


def setting_for(path, out=None) -> str:
    """What decides where ``path`` is: ``--out``, ``TMPDIR``, ``ICLGD_CACHE`` or ``HF_HOME`` (else "its folder")."""
    import os
    import tempfile
    from pathlib import Path

    from iclgd.core.io import cache_root

    p = Path(os.path.abspath(path))
    roots = [("--out", out), *[("--out", o) for o in reversed(OUT_FOLDERS)], ("TMPDIR", tempfile.gettempdir()),
             ("ICLGD_CACHE", cache_root()),
             ("HF_HOME", os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")]
    for name, root in roots:
        if root is not None and (p == Path(os.path.abspath(root)) or Path(os.path.abspath(root)) in p.parents):
            return name
    return "its folder"


def disk_error(e: BaseException, path=None, out=None, setting: str | None = None) -> "IclgdError | None":
    """A write that failed for the disk's sake (full, read-only, not writable) as one line naming the path and the
    setting that chose it; None for any other error. Also for libraries that wrap the OS error in their own
    (torch's "file write failed", safetensors' "os error 28")."""
    import os

    code = getattr(e, "errno", None) if isinstance(e, OSError) else None
    if code not in DISK_ERRNOS:
        if not any(t in str(e) for t in _FULL_TEXT):
            return None
        code = _errno.ENOSPC
    path = path or (getattr(e, "filename", None) if isinstance(e, OSError) else None)
    if path is None:
        import tempfile

        where = f"under --out {out}" if out is not None else "a file"
        return IclgdError(f"writing {where}: {DISK_ERRNOS[code]}; free space under --out, TMPDIR "
                          f"({tempfile.gettempdir()}) or ICLGD_CACHE, or point them to a disk with room")
    setting = setting or setting_for(path, out)
    fix = (f"free space there, or point {setting} to a disk with room" if code in _FULL
           else f"point {setting} to a writable folder")
    return IclgdError(f"{os.fspath(path)}: cannot write ({DISK_ERRNOS[code]}; set by {setting}); {fix}")
