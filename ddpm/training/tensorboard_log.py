"""TensorBoard event files of a training run, beside train_log.csv in --out-dir (rank 0 only).

`tensorboard --logdir checkpoints` shows the run in its own folder: each row of train_log.csv as the
scalars train/loss, train/lr, train/grad_norm and train/img_per_s at the row's step (the values
training_log.py computes for the row, unrounded), each sample grid the trainer draws
(samples_epoch_XX.png, samples_step_XXXXXX.png) as the image `samples` at its step, and the run's
resolved settings (config["train"], flattened to `training.lr`, `model.channel_mult`, ...) in the
HPARAMS tab, written in the run's own event file so that no sub-run appears. A run starts its writer
with a purge step (torch's SummaryWriter(purge_step=...)): a resume from step s hides every event of
a step after s that an interrupted run wrote after its checkpoint, so each step appears once; a new
run (step 0) hides those of a run that never saved a checkpoint in the folder. A writer that fails
(tensorboard not installed, a full or read-only disk) is one note, and the run goes on without
events: train_log.csv still has every row.

Example:
    events = open_events(Path("checkpoints"), enabled=True, resume_step=None, settings=job.plain())
    events.add_scalars("train", step=50, values={"loss": 0.031, "lr": 2e-4})
    events.add_grid("samples", images, step=150, columns=8)  # images: [N, C, H, W] in [-1, 1]
    events.close()
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from ddpm.plumbing.messages import note
from ddpm.visualisation.pictures import image_grid

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

HPARAMS_METRICS = ("train/loss",)  # the scalar tags the HPARAMS tab shows beside each run's settings
WRITER_THREAD_MODULE = "tensorboard.summary.writer.event_file_writer"  # home of the writer's worker thread

HParam = int | float | str


def flat_settings(settings: dict[str, Any], prefix: str = "") -> dict[str, HParam]:
    """Nested plain settings as one level of hparams: {"training": {"lr": 2e-4}} -> {"training.lr": 2e-4};
    lists become "1,2,2", booleans "True"/"False", and unset (None) settings are left out."""
    flat: dict[str, HParam] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flat_settings(value, f"{name}.")
        elif isinstance(value, list):
            flat[name] = ",".join(map(str, value))
        elif isinstance(value, bool):
            flat[name] = str(value)
        elif value is not None:
            flat[name] = value
    return flat


class TensorBoardLog:
    """One SummaryWriter in the run's folder, or none (--no-tensorboard, ranks other than 0, or after
    a failure): then every call does nothing. The first failure closes the writer with one note."""

    def __init__(self, writer: SummaryWriter | None = None, out_dir: Path | None = None):
        self.writer, self.out_dir = writer, out_dir

    def add_scalars(self, section: str, step: int, values: dict[str, float]) -> None:
        """Each value as the scalar `section/name` at `step`, flushed to disk (one row of the log)."""

        def write(writer: SummaryWriter) -> None:
            for name, value in values.items():
                writer.add_scalar(f"{section}/{name}", value, step)
            writer.flush()

        self.attempt(write)

    def add_grid(self, tag: str, images: torch.Tensor, step: int, columns: int) -> None:
        """[N, C, H, W] images in [-1, 1] as one grid image (pictures.image_grid, unscaled) at `step`."""
        grid = image_grid(images, columns)  # [H', W'] grey or [H', W', 3] colour, uint8
        dataformats = "HW" if grid.ndim == 2 else "HWC"

        def write(writer: SummaryWriter) -> None:
            writer.add_image(tag, grid, step, dataformats=dataformats)
            writer.flush()

        self.attempt(write)

    def attempt(self, write: Callable[[SummaryWriter], None]) -> None:
        """Run `write` on the writer. Whatever it raises (a full disk, a file made unwritable, an error
        of the writer's own) drops the writer with one note: the event file is never worth the run."""
        if self.writer is None:
            return
        writer = self.writer
        try:
            write(writer)
        except Exception as error:
            self.writer = None
            close_quietly(writer)
            warn(f"TensorBoard events in {self.out_dir}/ stopped: {describe(error)}; {GOES_ON}")

    def close(self) -> None:
        """Flush and close the event file (a failure here is one note too)."""
        self.attempt(lambda writer: writer.close())
        self.writer = None


GOES_ON = "training goes on, train_log.csv has every row"


def close_quietly(writer: SummaryWriter) -> None:
    """Close a writer that already failed: its close may raise the same error again."""
    with contextlib.suppress(Exception):
        writer.close()


def warn(message: str) -> None:
    """One note, on a line of its own while the progress bar runs (the bar is cleared, then redrawn)."""
    with tqdm.external_write_mode(file=sys.stderr):
        note(message)


def describe(error: Exception) -> str:
    """An error in a few words: an OSError's strerror and file, else its text."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}{f' ({error.filename})' if error.filename else ''}"
    return str(error) or type(error).__name__


def open_events(
    out_dir: Path, *, enabled: bool, resume_step: int | None, settings: dict[str, Any]
) -> TensorBoardLog:
    """The run's TensorBoard log in out_dir, purging events after resume_step (a new run: all of them),
    with the settings as hparams; a TensorBoardLog that writes nothing when not enabled or when the
    writer cannot start (one note)."""
    if not enabled:
        return TensorBoardLog()
    purge_step = 0 if resume_step is None else resume_step + 1
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        warn(f"no TensorBoard events in {out_dir}/ ({error}): pip install tensorboard; {GOES_ON}")
        return TensorBoardLog()
    quiet_writer_threads()
    try:
        writer = SummaryWriter(log_dir=str(out_dir), purge_step=purge_step)
    except Exception as error:  # as in TensorBoardLog.attempt: the event file is never worth the run
        warn(f"no TensorBoard events in {out_dir}/: {describe(error)}; {GOES_ON}")
        return TensorBoardLog()
    events = TensorBoardLog(writer, out_dir)
    events.attempt(lambda writer: add_hparams(writer, flat_settings(settings), purge_step))
    return events


def add_hparams(writer: SummaryWriter, hparams: dict[str, HParam], step: int) -> None:
    """The settings as the HPARAMS tab's session of this run: the hparams plugin's experiment and
    session-start summaries in the run's own event file (SummaryWriter.add_hparams would open a
    sub-run folder), with HPARAMS_METRICS as its metric columns."""
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    experiment, session_start, _ = hparams_summaries(hparams, dict.fromkeys(HPARAMS_METRICS, 0.0))
    for summary in (experiment, session_start):
        writer.file_writer.add_summary(summary, step)  # type: ignore[attr-defined]  # typed None by torch
    writer.flush()


def quiet_writer_threads() -> None:
    """Keep the event writer's worker thread from printing a traceback when a write fails: the writer
    raises the same error again at the next call, where TensorBoardLog turns it into one note. Other
    threads' errors still go to the previous hook."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__module__ != WRITER_THREAD_MODULE:
            previous(args)

    hook.quiets_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook
