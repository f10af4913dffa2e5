"""The training loop behind train_MNIST.py: Algorithm 1 with AdamW, LR warm-up and cosine decay, EMA,
autocast, DDP, stop rules, and checkpoints that resume to the bit.

Algorithm 1 of Ho et al. 2020 (arXiv:2006.11239) through `GaussianDiffusion.training_loss`, with
AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101), a linear LR warm-up then SGDR's cosine decay
without restarts (arXiv:1608.03983), gradient clipping, an EMA of the weights whose decay warms up
(training_state.WarmupEMA), label dropout for classifier-free guidance (Ho & Salimans 2022,
arXiv:2207.12598), and DistributedDataParallel under torchrun.

Stop rules, whichever comes first: --epochs, --max-steps, --max-minutes (time spent in training
steps, by the wall clock or this process's CPU clock; epoch-end checkpoints and sample grids are
not counted), SIGINT/SIGTERM. The cosine LR reaches 0 at the end of the epochs or of the time budget,
whichever is nearer. Every stop saves last.pt, which `--resume latest` continues (a time budget
counts on from the seconds already trained).

Writes to the output folder: last.pt (every epoch end and at a stop), mnist_epoch_XX.pt (every
--save-every epochs and after the last), train_log.csv, loss.png, samples_epoch_XX.png (every
--sample-every epochs and after the last) and samples_step_XXXXXX.png at a stop by --max-steps or
--max-minutes (EMA weights, fixed noise, DDIM 50 steps); train.lock while it runs (folder_lock.py:
one run per folder). A disk that fails while saving or logging stops the run with one line naming the
file; the checkpoints saved before stay intact.

Example:
    result = train(TrainingJob(data=DataSettings("mnist-5k"), training=TrainingSettings(max_minutes=15)))
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import math
import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ddpm.plumbing.checkpointing import (
    LAST_NAME,
    CheckpointError,
    build_model,
    epoch_checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from ddpm.datasets.sources import load_pixels, random_hflip, to_model_range
from diffusion import GaussianDiffusion
from ddpm.training.folder_lock import FolderLock
from ddpm.plumbing.messages import UserError
from model import count_parameters
from ddpm.plumbing.output_files import OutputError, writable_dir, write_csv
from ddpm.visualisation.pictures import plot_loss, save_image_grid
from ddpm.plumbing.runtime import (
    SpeedPlan,
    autocast_context,
    compile_or_eager,
    configure_fast_path,
    plan_speed,
    resolve_device,
    seed_everything,
)
from ddpm.sampling import balanced_labels
from ddpm.plumbing.settings import NUM_CLASSES, TrainingJob
from ddpm.training.state import TrainingState, capture_rng_states, restore_rng_states

CLOCK_READERS = {"wall": time.perf_counter, "cpu": time.process_time}
SECONDS_PER_MINUTE = 60
SAMPLE_COUNT, SAMPLE_COLUMNS, SAMPLE_STEPS = 64, 8, 50  # the grid: 8 x 8 images, DDIM 50 steps
LOG_NAME, PLOT_NAME = "train_log.csv", "loss.png"
LOG_FIELDS = ("step", "epoch", "loss", "lr", "grad_norm", "img_per_s")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingDiverged(UserError):
    """The loss, the gradient or the weights became NaN or infinite; nothing after the last checkpoint
    is saved."""


class TrainingResult(NamedTuple):
    """Where a run ended: its folder, position, what stopped it ("epochs", "max_steps",
    "max_minutes", or a signal's name such as "SIGTERM"), and whether this process saved it."""

    out_dir: Path
    step: int
    epoch: int
    batch_in_epoch: int
    stopped_by: str
    signal_number: int | None
    is_main: bool = True  # rank 0 (the one that saved), or the only process


# ----- processes ----------------------------------------------------------------------------------


class Processes(NamedTuple):
    """This process's place in a torchrun job (rank 0 of 1 without torchrun) and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def announce(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def maxima(self, values: list[float]) -> list[float]:
        """Each value's maximum over the ranks (the values themselves without DDP)."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def gather(self, value: Any) -> list[Any]:
        """value from every rank, in rank order."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered


def setup_processes(device_name: str) -> Processes:
    """Join the torchrun job when RANK is set (gloo on CPU, nccl on CUDA), else run alone."""
    device = resolve_device(device_name)
    if "RANK" not in os.environ:
        return Processes(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), device)


# ----- configuration and resuming -----------------------------------------------------------------


def run_config(job: TrainingJob, image_shape: tuple[int, int, int], diffusion: GaussianDiffusion) -> dict:
    """What rebuilds the model, its image shape and the diffusion (for eval and vizu), the data it was
    trained on, and every resolved training setting."""
    channels, height, _ = image_shape
    return {
        "model": job.model.unet_config(channels, height),
        "image_shape": list(image_shape),
        "diffusion": diffusion.config(),
        "data": job.data.data,
        "data_dir": job.data.data_dir,
        "train": job.plain(),
    }


def setup_differences(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """'key <checkpoint value> there, <flag value> here' for each model, diffusion or data difference."""
    differences = []
    for section in ("model", "diffusion"):
        saved_section, section_config = saved.get(section, {}), config[section]
        for key in sorted(set(saved_section) | set(section_config)):
            there, here = saved_section.get(key), section_config.get(key)
            if (list(there) if isinstance(there, tuple | list) else there) != here and not (
                key in ("in_channels", "image_size") and there is None
            ):
                differences.append(f"{key} {there} there, {here} here")
    for key in ("data", "data_dir"):
        if saved.get(key) != config[key]:
            differences.append(f"{key} {saved.get(key)} there, {config[key]} here")
    return differences


def checkpoint_to_resume(
    job: TrainingJob, out_dir: Path, config: dict[str, Any], processes: Processes
) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint --resume names (checked against the flags), or None for a new run."""
    resume = job.run.resume
    if resume is None:
        refuse_to_overwrite(out_dir)
        return None
    path = Path(resume)
    if resume == "latest":
        try:
            path = latest_checkpoint(out_dir)
        except CheckpointError:
            processes.announce(f"--resume latest: no checkpoint in {out_dir}/ yet, starting a new run")
            return None
    checkpoint = load_checkpoint(path)
    if path.resolve().parent != out_dir.resolve():
        refuse_to_overwrite(out_dir)
    differences = setup_differences(checkpoint["config"], config)
    if differences:
        raise CheckpointError(
            f"{path} is another setup ({'; '.join(differences[:3])}): resume it with its own flags"
        )
    return checkpoint, path


def refuse_to_overwrite(out_dir: Path) -> None:
    """A new run must not replace another run's checkpoints."""
    try:
        existing = latest_checkpoint(out_dir)
    except CheckpointError:
        return
    raise UserError(
        f"{existing} exists: continue that run with --resume latest, or give a new run another --out-dir"
    )


# ----- data, model and optimisation ---------------------------------------------------------------


def load_training_data(job: TrainingJob, processes: Processes) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole training split on the device: uint8 pixels [N, C, H, W] (each batch is mapped to
    [-1, 1] as it is drawn), labels [N]."""
    data = job.data
    images, labels = load_pixels(
        data.data, "train", data.data_dir, image_size=data.image_size, channels=data.channels
    )
    images_per_step = job.training.batch_size * processes.world_size
    if len(images) < images_per_step:
        raise UserError(
            f"--batch-size {job.training.batch_size} x {processes.world_size} process(es) needs at least "
            f"{images_per_step} images; the training set has {len(images)}"
        )
    return images.to(processes.device), labels.to(processes.device)


def epoch_batches(num_images: int, batch_size: int, seed: int, processes: Processes) -> torch.Tensor:
    """This rank's batches of one epoch as indices [steps, batch_size]; incomplete batches dropped.

    The order is a permutation drawn from a generator seeded with `seed` (data seed + epoch), the
    same on every rank; each step's batch_size * world_size indices are split between the ranks.
    """
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    steps = num_images // (batch_size * processes.world_size)
    batches = order[: steps * batch_size * processes.world_size].view(steps, processes.world_size, batch_size)
    return batches[:, processes.rank].to(processes.device)


def lr_factor(optimizer_steps: int, warmup_steps: int, progress: float, schedule: str) -> float:
    """LR multiplier: linear warm-up over the first steps, then 1 (constant) or a cosine decay
    0.5 (1 + cos(pi progress)) that reaches 0 when progress (the part of the run done) reaches 1."""
    if optimizer_steps < warmup_steps:
        return (optimizer_steps + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_training_state(
    config: dict[str, Any], job: TrainingJob, plan: SpeedPlan, device: torch.device
) -> TrainingState:
    """U-Net, EMA, AdamW (fused on CUDA) and grad scaler (fp16 only) of a new run."""
    memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format
    model = build_model(config).to(device, memory_format=memory_format)
    training = job.training
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=training.lr, weight_decay=training.weight_decay, fused=device.type == "cuda"
    )
    scaler = torch.amp.GradScaler(device.type, enabled=plan.amp == "fp16")
    return TrainingState.create(model, optimizer, scaler, training.ema_decay, data_seed=job.run.seed)


def start_random_streams(
    state: TrainingState, resumed: tuple[dict[str, Any], Path] | None, seed: int, processes: Processes
) -> None:
    """Resume: restore the checkpoint and each rank's RNG states. New run: one stream per rank for
    timesteps, noise, dropout and label dropout, apart from the one that initialised the weights.

    A checkpoint of another process count is refused: its steps, epoch position and LR schedule
    count batches of its own number of processes."""
    if resumed is None:
        seed_everything(seed + 1 + processes.rank)
        return
    checkpoint, path = resumed
    state.restore(checkpoint, path)
    written_by = len(checkpoint["rng"])
    if written_by != processes.world_size:
        raise CheckpointError(
            f"{path} was written by {written_by} process(es), this run has {processes.world_size}: "
            f"resume it with {written_by} (its batches and LR schedule count {written_by}), "
            "or start a new run in another --out-dir"
        )
    restore_rng_states(checkpoint["rng"][processes.rank], processes.device)


def network_for_training(state: TrainingState, plan: SpeedPlan, processes: Processes) -> torch.nn.Module:
    """The module the forward pass runs: compiled (with an eager fallback) and/or DDP-wrapped around
    the same parameters. Checkpoints always save state.model, the plain U-Net (no `_orig_mod.` or
    `module.` prefixes)."""
    network = state.model
    if plan.compile:
        network = compile_or_eager(network, plan.compile_mode, processes.announce)
    if processes.world_size > 1:
        device_ids = [processes.device.index] if processes.device.type == "cuda" else None
        network = DistributedDataParallel(network, device_ids=device_ids)
    return network


def drop_labels(labels: torch.Tensor, p_uncond: float) -> torch.Tensor:
    """Replace each label by the null label (NUM_CLASSES) with probability p_uncond."""
    dropped = torch.rand(labels.shape, device=labels.device) < p_uncond
    return torch.where(dropped, torch.full_like(labels, NUM_CLASSES), labels)


def non_finite_weights(state: TrainingState) -> bool:
    """Whether any weight of the model or its EMA is NaN or infinite (one sync)."""
    tensors = [*state.model.state_dict().values(), *state.ema.module.state_dict().values()]
    return not torch.stack([torch.isfinite(t).all() for t in tensors if t.is_floating_point()]).all().item()


# ----- logging, clocks and signals ----------------------------------------------------------------


class TrainingLog:
    """Losses stay on the device between rows; each row (every --log-every steps and at each epoch
    end) syncs once, averages over steps and ranks, stops on a non-finite loss (or, without a grad
    scaler, a non-finite gradient norm), and goes to train_log.csv and the progress bar (rank 0)."""

    def __init__(self, out_dir: Path, processes: Processes, images_per_step: int, resume_step: int | None):
        self.out_dir, self.processes, self.images_per_step = out_dir, processes, images_per_step
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.restart_clock()
        self.file = open_log(out_dir / LOG_NAME, resume_step) if processes.is_main else None

    def record(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.losses.append(loss.float())
        self.grad_norms.append(grad_norm.float())

    def flush(self, step: int, epoch: float, lr: float, bar: tqdm, check_gradients: bool) -> None:
        if not self.losses:
            return
        values = torch.stack([torch.stack(self.losses), torch.stack(self.grad_norms)])
        if self.processes.world_size > 1:
            dist.all_reduce(values)
            values /= self.processes.world_size
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
            self.write_row(row)
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_second:.0f}")
        self.losses, self.grad_norms = [], []
        self.restart_clock()

    def stop_if_diverged(self, values: torch.Tensor, step: int, check_gradients: bool) -> None:
        """TrainingDiverged at the first step whose loss (or gradient norm) is NaN or infinite."""
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

    def write_row(self, row: tuple) -> None:
        """Append a row to train_log.csv and flush it; a full disk is an OutputError naming the file."""
        try:
            csv.writer(self.file).writerow(row)
            self.file.flush()
        except OSError as error:
            raise OutputError(f"cannot write {self.file.name}: {error.strerror or error}") from None

    def restart_clock(self) -> None:
        self.window_start = time.perf_counter()

    def close(self) -> None:
        """Close train_log.csv (every row was flushed when written: nothing is lost if this fails)."""
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()


def open_log(path: Path, resume_step: int | None):
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


class BudgetClock:
    """Seconds spent in training steps by the wall or the process CPU clock, carried across resumes
    (`banked`: the seconds of the checkpoint)."""

    def __init__(self, clock: str, banked: float):
        self.read, self.banked, self.since = CLOCK_READERS[clock], banked, None

    def start(self) -> None:
        self.since = self.read()

    def pause(self) -> None:
        if self.since is not None:
            self.banked += self.read() - self.since
            self.since = None

    def seconds(self) -> float:
        return self.banked + (self.read() - self.since if self.since is not None else 0.0)


class StopSignals:
    """While active, SIGINT and SIGTERM only set `received`; the loop then saves and exits.

    A second signal gets the previous handler (Ctrl-C twice interrupts at once).
    """

    def __enter__(self) -> StopSignals:
        self.received: int | None = None
        self.previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        return self

    def _handle(self, number: int, frame) -> None:
        self.received = number
        signal.signal(number, self.previous[number])

    def __exit__(self, *exc_info) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


# ----- the training loop --------------------------------------------------------------------------


@dataclass
class Run:
    """What the loop needs: the job, processes, data, the diffusion, the state, and the outputs."""

    job: TrainingJob
    processes: Processes
    config: dict[str, Any]
    out_dir: Path
    diffusion: GaussianDiffusion
    images: torch.Tensor
    labels: torch.Tensor
    state: TrainingState
    network: torch.nn.Module
    plan: SpeedPlan
    log: TrainingLog
    bar: tqdm
    clock: BudgetClock
    signal_number: int | None = None  # the stop signal, as agreed by every rank

    @property
    def steps_per_epoch(self) -> int:
        return len(self.images) // (self.job.training.batch_size * self.processes.world_size)

    @property
    def budget_seconds(self) -> float:
        minutes = self.job.training.max_minutes
        return math.inf if minutes is None else minutes * SECONDS_PER_MINUTE

    def progress(self, seconds: float) -> float:
        """The part of the run done, for the cosine LR: the larger of the optimizer steps after the
        warm-up over those of all epochs, and the seconds trained over the time budget."""
        training = self.job.training
        total = training.epochs * self.steps_per_epoch
        by_steps = (self.state.optimizer_steps - training.warmup_steps) / max(
            1, total - training.warmup_steps
        )
        return max(by_steps, seconds / self.budget_seconds)

    def train_step(self, indices: torch.Tensor, seconds: float) -> None:
        """Algorithm 1 on one batch, then clip, AdamW at the scheduled LR, and the EMA."""
        state, training = self.state, self.job.training
        x0 = to_model_range(self.images[indices])
        if self.job.data.hflip:
            x0 = random_hflip(x0)
        labels = drop_labels(self.labels[indices], training.p_uncond) if self.job.model.class_cond else None
        with autocast_context(self.plan.amp, self.processes.device):
            loss = self.diffusion.training_loss(
                self.network, x0, labels, min_snr_gamma=training.min_snr_gamma
            )
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), training.grad_clip)
        factor = lr_factor(
            state.optimizer_steps, training.warmup_steps, self.progress(seconds), training.lr_schedule
        )
        for group in state.optimizer.param_groups:
            group["lr"] = training.lr * factor
        if self.optimizer_step():
            state.ema.update()
            state.optimizer_steps += 1
        state.step += 1
        state.batch_in_epoch += 1
        self.log.record(loss.detach(), grad_norm)
        self.bar.update()

    def optimizer_step(self) -> bool:
        """scaler.step + update; whether the update was applied (fp16: the scale did not back off)."""
        scaler = self.state.scaler
        if not scaler.is_enabled():
            self.state.optimizer.step()
            return True
        scale = scaler.get_scale()
        scaler.step(self.state.optimizer)
        scaler.update()
        return scaler.get_scale() >= scale

    def flush_log(self) -> None:
        epoch = self.state.step / self.steps_per_epoch
        lr = self.state.optimizer.param_groups[0]["lr"]
        self.log.flush(
            self.state.step, epoch, lr, self.bar, check_gradients=not self.state.scaler.is_enabled()
        )

    def stop_reason(self, signals: StopSignals) -> tuple[str | None, float]:
        """(what stops the run before the next step, or None; the seconds trained), agreed by all ranks:
        a signal to any rank stops them all."""
        signal_number, seconds = self.processes.maxima([float(signals.received or 0), self.clock.seconds()])
        max_steps = self.job.training.max_steps
        if signal_number:
            self.signal_number = int(signal_number)
            return "signal", seconds
        if max_steps is not None and self.state.step >= max_steps:
            return "max_steps", seconds
        if seconds >= self.budget_seconds:
            return "max_minutes", seconds
        return None, seconds

    def run_epochs(self, signals: StopSignals) -> str:
        """Train until the last epoch ends ("epochs") or another stop rule says so (its name)."""
        state, training = self.state, self.job.training
        while state.epoch < training.epochs:
            self.bar.set_description(f"epoch {state.epoch + 1}/{training.epochs}")
            batches = epoch_batches(
                len(self.images), training.batch_size, state.data_seed + state.epoch, self.processes
            )
            self.clock.start()
            for indices in batches[state.batch_in_epoch :]:
                reason, seconds = self.stop_reason(signals)
                if reason is not None:
                    self.clock.pause()
                    return reason
                self.train_step(indices, seconds)
                if state.step % self.job.run.log_every == 0:
                    self.flush_log()
            self.clock.pause()
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            self.end_epoch()
        return "epochs"

    def end_epoch(self) -> None:
        """Log, save last.pt (and mnist_epoch_XX.pt), sample a grid and redraw loss.png."""
        epoch, last_epoch, run = self.state.epoch, self.state.epoch == self.job.training.epochs, self.job.run
        self.flush_log()
        names = [LAST_NAME]
        if epoch % run.save_every == 0 or last_epoch:
            names.append(epoch_checkpoint_name(epoch))
        self.save(names)
        if epoch % run.sample_every == 0 or last_epoch:
            self.save_samples(f"samples_epoch_{epoch:02d}.png")
        self.plot_loss()
        self.log.restart_clock()  # img/s counts training time only

    def save(self, names: list[str]) -> None:
        """Every rank hands in its RNG states; rank 0 checks the weights are finite and writes the
        checkpoint under each name."""
        self.state.train_seconds = self.clock.seconds()
        rng_states = self.processes.gather(capture_rng_states(self.processes.device))
        if not self.processes.is_main:
            return
        if non_finite_weights(self.state):
            raise TrainingDiverged(
                f"weights became NaN or infinite by step {self.state.step}: training stopped, "
                f"nothing saved after the last checkpoint in {self.out_dir}/"
            )
        checkpoint = self.state.to_checkpoint(self.config, rng_states)
        for name in names:
            try:
                save_checkpoint(checkpoint, self.out_dir / name)
            except OutputError as error:
                raise OutputError(
                    f"{error}: training stopped at step {self.state.step}; the checkpoints saved before "
                    f"are intact in {self.out_dir}/"
                ) from None

    @torch.no_grad()
    def save_samples(self, name: str) -> None:
        """An 8 x 8 grid from the EMA weights: fixed noise (--seed), DDIM 50 steps (digits 0-9 in turn
        for a class-conditional model); rank 0 only."""
        if not self.processes.is_main:
            return
        device = self.processes.device
        generator = torch.Generator(device).manual_seed(self.job.run.seed)
        ema = self.state.ema.module.eval()
        with autocast_context(self.plan.amp, device):
            images = self.diffusion.sample(
                ema,
                SAMPLE_COUNT,
                sampler="ddim",
                steps=min(SAMPLE_STEPS, self.diffusion.T),
                generator=generator,
                labels=balanced_labels(SAMPLE_COUNT, ema.num_classes, device),
                image_shape=tuple(self.config["image_shape"]),
            )
        save_image_grid(images, self.out_dir / name, columns=SAMPLE_COLUMNS)

    def plot_loss(self) -> None:
        if self.processes.is_main:
            self.log.file.flush()
            plot_loss(self.out_dir / LOG_NAME, self.out_dir / PLOT_NAME)


def replicas_agree(model: torch.nn.Module, processes: Processes) -> bool:
    """Whether every rank holds bit-identical weights (one SHA-256 per rank)."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return len(set(processes.gather(digest.hexdigest()))) == 1


def prepare_run(job: TrainingJob, processes: Processes, out_dir: Path) -> Run:
    """Load the data, build or resume the state."""
    job = replace(job, data=job.data.with_defaults())
    runtime = job.runtime
    plan = plan_speed(
        runtime.amp, runtime.compile, runtime.compile_mode, runtime.channels_last, processes.device,
        processes.world_size,
    )  # fmt: skip
    configure_fast_path(processes.device)
    diffusion = GaussianDiffusion(**job.diffusion.config()).to(processes.device)
    images, labels = load_training_data(job, processes)
    config = run_config(job, tuple(images.shape[1:]), diffusion)
    resumed = checkpoint_to_resume(job, out_dir, config, processes)
    seed_everything(job.run.seed)  # the same initial weights on every rank
    state = build_training_state(config, job, plan, processes.device)
    start_random_streams(state, resumed, job.run.seed, processes)
    network = network_for_training(state, plan, processes)
    steps_per_epoch = len(images) // (job.training.batch_size * processes.world_size)
    total_steps = min(job.training.epochs * steps_per_epoch, job.training.max_steps or math.inf)
    bar = tqdm(total=total_steps, initial=state.step, unit="step", disable=not processes.is_main)
    resume_step = resumed[0]["step"] if resumed is not None else None
    log = TrainingLog(out_dir, processes, job.training.batch_size * processes.world_size, resume_step)
    clock = BudgetClock(job.training.clock, state.train_seconds)
    run = Run(
        job, processes, config, out_dir, diffusion, images, labels, state, network, plan, log, bar, clock
    )
    describe(run, resumed)
    return run


def describe(run: Run, resumed: tuple[dict[str, Any], Path] | None) -> None:
    """One line on what is trained where; one on where it resumes."""
    job, state, processes = run.job, run.state, run.processes
    budget = (
        ""
        if job.training.max_minutes is None
        else f" or {job.training.max_minutes:g} {job.training.clock}-min"
    )
    processes.announce(
        f"U-Net {count_parameters(state.model):,} parameters | {job.data.data_dir or job.data.data}: "
        f"{len(run.images):,} images {'x'.join(map(str, run.config['image_shape']))}"
        f"{', flipped' if job.data.hflip else ''} | "
        f"{processes.world_size} x {processes.device}, {run.plan.describe()} | "
        f"{run.steps_per_epoch} steps/epoch x {job.training.epochs} epochs{budget} | to {run.out_dir}/"
    )
    if resumed is not None:
        processes.announce(
            f"resumed {resumed[1]}: step {state.step}, epoch {state.epoch} + {state.batch_in_epoch} batches"
            + (f", {state.train_seconds:.0f} s trained" if job.training.max_minutes is not None else "")
        )


def train(job: TrainingJob) -> TrainingResult:
    """Run (or resume) a training job to its first stop rule; a stop signal saves last.pt. Rank 0
    holds the output folder's lock (folder_lock.py) from the first check to the last write."""
    processes = setup_processes(job.runtime.device)
    try:
        out_dir = writable_dir(job.run.out_dir)
        with FolderLock(out_dir) if processes.is_main else contextlib.nullcontext():
            return train_on(job, processes, out_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train_on(job: TrainingJob, processes: Processes, out_dir: Path) -> TrainingResult:
    run = prepare_run(job, processes, out_dir)
    try:
        with StopSignals() as signals:
            stopped_by = run.run_epochs(signals)
            if stopped_by != "epochs":
                run.flush_log()
                run.save([LAST_NAME])
                if stopped_by != "signal":
                    run.save_samples(f"samples_step_{run.state.step:06d}.png")
                run.plot_loss()
    finally:
        run.bar.close()
        run.log.close()
    if processes.world_size > 1:
        agree = replicas_agree(run.state.model, processes)
        processes.announce(
            f"the {processes.world_size} processes end with {'identical' if agree else 'DIFFERENT'} weights"
        )
    if stopped_by == "signal":
        stopped_by = signal.Signals(run.signal_number).name
    state = run.state
    return TrainingResult(
        run.out_dir,
        state.step,
        state.epoch,
        state.batch_in_epoch,
        stopped_by,
        run.signal_number,
        processes.is_main,
    )
