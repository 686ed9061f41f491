"""Machine-readable progress of one export: JSON lines in the file named by `--events` (stages started and done,
the export patches applied, the exit code and, on failure, the error). `autoexport zoo` reads these instead of the
log, so that the wording of log lines is free to change."""

from __future__ import annotations

import json
import time
from pathlib import Path

_sink: Path | None = None


def open_events(path: Path | None) -> None:
    """Start a fresh events file (or none: every emit is then a no-op)."""
    global _sink
    _sink = path
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")


def emit(event: str, **fields: object) -> None:
    if _sink is None:
        return
    with open(_sink, "a") as f:
        f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str) + "\n")


def read_events(path: Path) -> list[dict] | None:
    """The events of a file, skipping a line cut short by a killed process; None when there is no file."""
    if not path.is_file():
        return None
    found = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found
