"""One writer per checkpoint directory: an exclusive ``flock`` on ``<root>/.lock``.

The kernel drops the lock when its process ends, however it ends (SIGKILL included), so a crashed run never
blocks the next one; a second live writer fails at once with the first one's pid and host.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

__all__ = ["WriterLock", "WriterLockError"]

LOCK_FILE = ".lock"


class WriterLockError(ValueError):
    """Another live process is writing to the same checkpoint directory."""


class WriterLock:
    """``acquire()`` takes ``root/.lock`` without waiting or raises `WriterLockError`; ``release()`` drops it."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.path = Path(root) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        if self._fd is not None:
            return self
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WriterLockError(f"{self.path.parent} is being written by another run ({holder}); wait for it, "
                                  "stop it, or use another checkpoint.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None
