"""Named crash points: the moments between file-system writes of a run at which a kill is survivable by design
(docs/crash_consistency.md). In normal runs `crashpoint()` costs one dictionary lookup and does nothing.

Fault injection for the kill-anywhere test (`tests/test_kill_anywhere.py`):

    LOLCATS_CRASH_LOG=FILE    append each crash point's name to FILE (one line per point, flushed and fsynced)
    LOLCATS_CRASH_SKIP=FILE   names of points already killed at (one per line); the process SIGKILLs itself at
                              the first point whose name is not in FILE, after appending that name to FILE

so a driver that re-runs a command with the same skip file kills it once at every distinct point it reaches, each
run getting one point further, until a run finishes.
"""

from __future__ import annotations

import os
import signal

_LOG = "LOLCATS_CRASH_LOG"
_SKIP = "LOLCATS_CRASH_SKIP"


def crashpoint(name: str) -> None:
    """Marks a moment at which the run directory is in a state a re-run must complete from."""
    log, skip = os.environ.get(_LOG), os.environ.get(_SKIP)
    if log:
        _append(log, name)
    if skip:
        try:
            with open(skip) as f:
                seen = {line.rstrip("\n") for line in f}
        except FileNotFoundError:
            seen = set()
        if name not in seen:
            _append(skip, name)
            os.kill(os.getpid(), signal.SIGKILL)


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
