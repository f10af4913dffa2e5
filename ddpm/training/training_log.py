"""train_log.csv and loss.png of a training run, and the check that stops a run whose loss diverges.

Each row (every --log-every steps and at each epoch end) holds step, epoch, loss, lr, grad_norm and
img_per_s: the loss and gradient norm averaged over the steps since the last row and over the ranks.
Losses stay on the device between rows, so a row costs one sync. A NaN or infinite loss (or, without a
grad scaler, gradient norm) stops the run with one line naming its step, before anything is saved
(the loss is Algorithm 1's of Ho et al. 2020, arXiv:2006.11239). A resumed run keeps the rows up to
its checkpoint's step; a disk that fails while logging is one line naming the file. Each row also goes
to the run's TensorBoard events (tensorboard_log.py) as the scalars train/<column>.

Example:
    log = TrainingLog(Path("checkpoints"), processes, images_per_step=128, resume_step=None,
                      events=TensorBoardLog())  # tensorboard_log.open_events: the run's event file
    log.record(loss.detach(), grad_norm)
    log.flush(step=1, epoch=0.002, lr=2e-4, bar=bar, check_gradients=True)
"""

from __future__ import annotations

import contextlib
import csv
import time
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm

from ddpm.plumbing.messages import UserError
from ddpm.plumbing.output_files import OutputError, write_csv
from ddpm.plumbing.processes import Processes
from ddpm.training.tensorboard_log import TensorBoardLog
from ddpm.visualisation.pictures import plot_loss

LOG_NAME, PLOT_NAME = "train_log.csv", "loss.png"
LOG_FIELDS = ("step", "epoch", "loss", "lr", "grad_norm", "img_per_s")


class TrainingDiverged(UserError):
    """The loss, the gradient or the weights became NaN or infinite; nothing after the last checkpoint
    is saved."""


class TrainingLog:
    """Losses stay on the device between rows; each row syncs once, averages over steps and ranks,
    stops on a non-finite loss (or, without a grad scaler, a non-finite gradient norm), and goes to
    train_log.csv, the TensorBoard events and the progress bar (rank 0)."""

    def __init__(
        self,
        out_dir: Path,
        processes: Processes,
        images_per_step: int,
        resume_step: int | None,
        events: TensorBoardLog,
    ):
        self.out_dir, self.processes, self.images_per_step = out_dir, processes, images_per_step
        self.events = events  # the run's TensorBoard log (also for the sample grids: loop.py)
        self.path = out_dir / LOG_NAME
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.restart_clock()
        self.file = open_log(self.path, resume_step) if processes.is_main else None

    def record(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.losses.append(loss.float())
        self.grad_norms.append(grad_norm.float())

    def flush(self, step: int, epoch: float, lr: float, bar: tqdm, check_gradients: bool) -> None:
        """One row for the steps recorded since the last one (none: nothing)."""
        if not self.losses:
            return
        values = self.processes.mean(torch.stack([torch.stack(self.losses), torch.stack(self.grad_norms)]))
        values = values.cpu()
        self.stop_if_diverged(values, step, check_gradients)
        images_per_second = (
            len(self.losses) * self.images_per_step / (time.perf_counter() - self.window_start)
        )
        loss, grad_norm = values.mean(dim=1).tolist()
        if self.file is not None:
            row = (
                step,
                f"{epoch:.3f}",
                f"{loss:.6f}",
                f"{lr:.4e}",
                f"{grad_norm:.4f}",
                f"{images_per_second:.1f}",
            )
            self.write_row(self.file, row)
            self.events.add_scalars(
                "train",
                step,
                {"loss": loss, "lr": lr, "grad_norm": grad_norm, "img_per_s": images_per_second},
            )
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_second:.0f}")
        self.losses, self.grad_norms = [], []
        self.restart_clock()

    def stop_if_diverged(self, values: torch.Tensor, step: int, check_gradients: bool) -> None:
        """TrainingDiverged at the first step whose loss (or gradient norm) is NaN or infinite.
        values: [2, steps since the last row], the losses then the gradient norms."""
        for row, name in ((0, "loss"), (1, "gradient norm")):
            if row == 1 and not check_gradients:
                break  # with fp16 an infinite norm is the grad scaler's skipped step, not a divergence
            non_finite = torch.nonzero(~torch.isfinite(values[row])).flatten()
            if len(non_finite):
                first = int(non_finite[0])
                at_step = step - len(self.losses) + first + 1
                raise TrainingDiverged(
                    f"{name} became {values[row, first].item()} at step {at_step}: "
                    f"training stopped, nothing saved after the last checkpoint in {self.out_dir}/"
                )

    def write_row(self, file: TextIO, row: tuple) -> None:
        """Append a row to train_log.csv and flush it; a full disk is an OutputError naming the file."""
        try:
            csv.writer(file).writerow(row)
            file.flush()
        except OSError as error:
            raise OutputError(f"cannot write {self.path}: {error.strerror or error}") from None

    def restart_clock(self) -> None:
        """Start the window that img_per_s counts (training time only: epoch ends restart it)."""
        self.window_start = time.perf_counter()

    def plot(self) -> None:
        """Redraw loss.png from train_log.csv (rank 0)."""
        if self.file is not None:
            self.file.flush()
            plot_loss(self.path, self.out_dir / PLOT_NAME)

    def close(self) -> None:
        """Close train_log.csv and the TensorBoard events (every row was flushed when written: nothing is
        lost if this fails)."""
        self.events.close()
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()


def open_log(path: Path, resume_step: int | None) -> TextIO:
    """train_log.csv for appending: a new run's header, or a resumed run's rows up to its checkpoint's
    step, first written whole (output_files.write_csv)."""
    kept = []
    if resume_step is not None and path.is_file():
        with path.open(newline="") as old:
            kept = [
                [row[key] for key in LOG_FIELDS]
                for row in csv.DictReader(old)
                if int(row["step"]) <= resume_step
            ]
    write_csv([LOG_FIELDS, *kept], path)
    try:
        return path.open("a", newline="")
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
