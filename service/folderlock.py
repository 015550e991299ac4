"""One owner per data folder: an exclusive lock held while a service runs on it.

Two services on one data folder would both resume the same stored jobs and generate them
twice. The first service to open the folder takes an exclusive ``flock`` on
``<data_dir>/multigen.lock`` and writes its pid and host name into it; a second one (another
process, or another ServiceThread in the same process) is refused with a message naming the
folder and the holder. The operating system drops the lock when the holder exits, however it
exits (kill -9 included), so a crashed server never blocks the next start.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from .errors import MultigenError

LOCK_FILE = "multigen.lock"


class FolderInUse(MultigenError):
    """Another service holds the data folder."""

    code = "data_folder_in_use"
    http_status = 503


class DataFolderLock:
    """The exclusive lock of one data folder (see the module docstring).

    Args:
        folder: the data folder (created if missing).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DataFolderLock:
        """Take the lock.

        Raises:
            FolderInUse: another service holds it (the message names the folder and the holder).
        """
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderInUse(
                f"data folder {self.folder} is in use by another multigen service ({holder}): "
                "stop that one first, or give this one its own data_dir in config.yaml", field="data_dir") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (the file stays; its content is only read when the lock is taken)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
    except (OSError, ValueError):
        return "holder unknown"
