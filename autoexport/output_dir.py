"""The output directory: written in a hidden staging directory, moved into place only when the export succeeded.

A run holds a lock file beside the output directory for its whole life, so two exports into the same directory
cannot interleave: the second is refused. A staging directory left by a run that was killed (SIGKILL, power loss)
is recognised by its owner's process id and removed by the next run; it never looks like a finished export (its
name starts with a dot and ends in `.partial-PID`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

from .errors import UserInputError


class OutputDirectory:
    """Claim (lock, staging), then commit (move into place) or abandon (remove the staging)."""

    def __init__(self, target: Path, overwrite: bool) -> None:
        self.target = target.resolve()
        self.overwrite = overwrite
        self.staging = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
        self._lock_path = self.target.parent / f".{self.target.name}.lock"
        self._lock_fd: int | None = None

    def claim(self) -> Path:
        """Check the target, take the lock, clear stale staging directories and create this run's."""
        target = self.target
        if target.exists() and not target.is_dir():
            raise UserInputError(f"output path {target} exists and is not a directory; choose another --output-dir")
        if target.exists() and any(target.iterdir()) and not self.overwrite:
            raise UserInputError(f"output directory {target} already exists; pass --overwrite to replace it")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
            self._remove_stale_staging()
            self.staging.mkdir()
        except OSError as err:
            self.release()
            raise UserInputError(f"cannot write the output directory {target}: {err.strerror or err} "
                                 f"({err.filename or target.parent}); choose a writable --output-dir") from None
        return self.staging

    def _lock(self) -> None:
        # flock on a lock file that is deleted on release: re-check after locking that the file is still the one at
        # the path (a releasing run may have unlinked it in between), as the standard lock-file protocol does.
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    raise UserInputError(f"another autoexport (pid {owner}) is writing {self.target}; wait for it "
                                         "to finish or choose another --output-dir") from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self._lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self._lock_fd = fd
                return
            os.close(fd)

    def _remove_stale_staging(self) -> None:
        """Staging directories of this target whose run is gone: with the lock held, no live run owns one."""
        for path in self.target.parent.glob(f".{self.target.name}.partial-*"):
            if path != self.staging:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.target.parent.glob(f".{self.target.name}.old-*"):
            shutil.rmtree(path, ignore_errors=True)

    def commit(self, destination: Path | None = None) -> Path:
        """Move the staging directory to the target (or `destination`, e.g. DIR.failed), replacing what is there."""
        destination = destination or self.target
        old = destination.parent / f".{self.target.name}.old-{os.getpid()}"
        if destination.exists():
            destination.rename(old)
        self.staging.rename(destination)
        if old.exists():
            shutil.rmtree(old)
        self.release()
        return destination

    def abandon(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self.release()

    def release(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.unlink(self._lock_path)
        except FileNotFoundError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None
