"""Progress of long work: a bar on a terminal (a widget in a notebook), a plain line per minute in a log file
(Slurm, nohup, CI).

``ICLGD_PROGRESS`` chooses: ``auto`` (the default: a bar on a terminal, lines elsewhere), ``tty`` (a bar on a
terminal, nothing elsewhere: the behaviour before 0.3, and the test suite's), ``lines`` (lines everywhere) or
``off``. ``--quiet`` turns every kind off.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time

MODES = ("auto", "tty", "lines", "off")
LINE_INTERVAL_S = 60.0  # a log file gets one line per bar and minute, and the bar's first and last state


def mode() -> str:
    m = os.environ.get("ICLGD_PROGRESS", "auto").strip().lower() or "auto"
    return m if m in MODES else "auto"


def shown() -> bool:
    """Whether this process reports progress at all (before ``--quiet``)."""
    m = mode()
    return m != "off" and (m != "tty" or sys.stderr.isatty())


_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # the cursor moves of nested bars


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines (a log holds one per update)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = _ESCAPES.sub("", s).replace("\r", "").rstrip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


@functools.cache  # one class, made on first use (tqdm is imported only then)
def _line_bar():
    from tqdm import tqdm

    class LineBar(tqdm):
        """At most one line a minute, whatever asks for a redraw (``set_postfix`` does at every call); the first
        state and the last (written by ``close``) always."""

        _last_line = float("-inf")

        def refresh(self, *args, **kw):
            now = time.monotonic()
            if now - self._last_line < LINE_INTERVAL_S:
                return False
            self._last_line = now
            return super().refresh(*args, **kw)

    return LineBar


def bar(iterable=None, *, enabled: bool = True, **kw):
    """A tqdm bar, drawn on a terminal and written as a line per minute elsewhere; ``enabled=False``: none."""
    from tqdm.auto import tqdm

    notebook = "ipykernel" in sys.modules  # tqdm.auto draws a widget there
    if enabled and (mode() == "lines" or not (sys.stderr.isatty() or notebook)):
        kw.update(file=_Lines(sys.stderr), mininterval=LINE_INTERVAL_S, ascii=True, ncols=100, leave=True)
        return _line_bar()(iterable, **kw)
    return tqdm(iterable, disable=not enabled, **kw)
