"""One training run per output folder: a lock file that names its holder, released even by kill -9.

`FolderLock(out_dir)` creates `out_dir/train.lock`, holds an exclusive `fcntl.flock` on it for as long
as the run lasts and writes the holder's pid, host and start time into it. The kernel drops the flock
when the holder exits in any way (SIGKILL, a crash, a lost power supply's reboot), so a second run
that finds the file locked knows a live process holds it and refuses in one line naming that
process, while one that finds the file unlocked takes it over, saying whose lock it was. Taking the
lock also removes the temp files that `output_files.atomic_write` leaves when a writer is killed
mid-write (no other writer can be at work in the folder then). On a clean exit the file is removed.
With torchrun only rank 0 takes the lock. On a file system without flock (some network mounts) one
line says that the folder goes unchecked.

Example:
    with FolderLock("checkpoints"):
        ...  # train, writing checkpoints/last.pt
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ddpm.plumbing.messages import UserError, note
from ddpm.plumbing.output_files import TEMP_SUFFIX, OutputError

LOCK_NAME = "train.lock"


class FolderLocked(UserError):
    """Another live process is training into the same output folder."""


class FolderLock:
    """An exclusive lock on a run's output folder, as a context manager (see the module docstring)."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.descriptor: int | None = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        """Lock the file (FolderLocked if a live process holds it), then write this process into it."""
        while True:
            descriptor = self._open()
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(descriptor)
                if error.errno in (errno.EAGAIN, errno.EACCES):
                    raise FolderLocked(
                        f"{self.path.parent}/ is in use by {describe_holder(read_holder(self.path))}: "
                        "wait for it to finish, stop it, or give this run another --out-dir"
                    ) from None
                note(f"cannot lock {self.path} ({error.strerror}): no check for a second run in this folder")
                return
            if self._still_the_file(descriptor):
                break
            os.close(descriptor)  # the holder removed the file between our open and flock: retry
        previous = read_holder(self.path)
        if previous:
            note(f"took over {self.path} from {describe_holder(previous)}, which no longer runs")
        self.descriptor = descriptor
        self._write_holder(descriptor)
        remove_stale_temp_files(self.path.parent)

    def release(self) -> None:
        """Remove the file and drop the lock (the file first, so no one locks a removed file)."""
        if self.descriptor is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.descriptor)
        self.descriptor = None

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputError(f"cannot write {self.path}: {error.strerror}") from None

    def _still_the_file(self, descriptor: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            return False

    def _write_holder(self, descriptor: int) -> None:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)


def read_holder(path: Path) -> dict:
    """The pid, host and start time written in a lock file ({} if empty or unreadable)."""
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"train_MNIST.py pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files of writes killed midway (`.NAME.XXXX.tmp`), with one line if any."""
    stale = list(folder.glob(f".*{TEMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        note(f"removed {len(stale)} temp file(s) of an interrupted write in {folder}/")
