"""Where outputs go and how they are written: whole or not at all.

Every file the scripts write (checkpoints, JSON, CSV, PNG, GIF) goes through `atomic_write`: it is
written to a temp file in the same folder, flushed to disk, then moved into place with os.replace,
so a kill or a full disk leaves the old file or none, never half of one, and no temp file behind.

Example:
    with atomic_write("eval_outputs/report.json") as temp:
        temp.write_text(json.dumps(report))
    save_figure(figure, "runs/loss.png")
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ddpm.plumbing.messages import UserError

TEMP_SUFFIX = ".tmp"  # atomic_write's temp files are .NAME.XXXXXXXX.tmp beside NAME


class OutputError(UserError):
    """An output file or folder that cannot be written (no space, read-only, not a folder)."""


def writable_dir(path: str | Path) -> Path:
    """Create the folder if needed and check that files can be written in it, else a UserError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create output folder {path}: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {path} is not writable")
    try:  # the permission bits can say yes where no file can be made (/proc, some mounts, as root)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise OutputError(f"output folder {path} is not writable: {error.strerror or error}") from None
    return path


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` (its folder made if needed); on success fsync it and os.replace
    it onto `path`.

    Any failure (an exception in the block, ENOSPC, EIO, a folder turned read-only) removes the temp
    file and raises; an OSError becomes an OutputError naming the file and the error.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
    os.close(handle)
    temp = Path(temp_name)
    try:
        os.chmod(temp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual mode
        yield temp
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
        sync_directory(path.parent)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def sync_directory(folder: Path) -> None:
    """fsync a folder, so that a rename into it survives a power cut."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_json(data: Any, path: str | Path) -> None:
    with atomic_write(path) as temp:
        temp.write_text(json.dumps(data, indent=2) + "\n")


def write_csv(rows: Iterable[Iterable[Any]], path: str | Path) -> None:
    """Rows (the first one the header) as a CSV file."""
    with atomic_write(path) as temp, open(temp, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def save_figure(figure, path: str | Path, dpi: int = 100) -> None:
    """A matplotlib Figure as a PNG."""
    with atomic_write(path) as temp:
        figure.savefig(temp, format="png", dpi=dpi)


def save_picture(picture, path: str | Path, **options) -> None:
    """A PIL Image as a PNG or GIF (by the suffix of path); options go to Image.save."""
    image_format = "GIF" if Path(path).suffix.lower() == ".gif" else "PNG"
    with atomic_write(path) as temp:
        picture.save(temp, format=image_format, **options)
