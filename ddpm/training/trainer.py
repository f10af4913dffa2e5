"""The entry of training, behind train_MNIST.py: prepare a run (data, model, resume), train it to its
first stop rule, report where it ended.

`train(job)` runs Algorithm 1 of Ho et al. 2020 (arXiv:2006.11239) as loop.py's `Run`: AdamW with a
warm-up and a cosine LR (SGDR, arXiv:1608.03983), an EMA of the weights, autocast, DDP under torchrun
(processes.py), and checkpoints that resume to the bit (resume.py, state.py). Rank 0 holds the output
folder's lock (folder_lock.py: one run per folder) from the first check to the last write. A disk that
fails while saving or logging stops the run with one line naming the file; the checkpoints saved
before stay intact.

Writes to the output folder: config.toml (the run's flags, for --config), last.pt, <data>_epoch_XX.pt
(mnist_epoch_XX.pt for MNIST and MNIST-5k, the folder's name for --data-dir), train_log.csv,
loss.png, samples_epoch_XX.png and samples_step_XXXXXX.png (loop.py says when), quality_log.csv and
best.pt (every --eval-every epochs: quality.py), TensorBoard's events.out.tfevents.*
(tensorboard_log.py; not with --no-tensorboard), and train.lock while it runs.

Example:
    result = train(TrainingJob(data=DataSettings("mnist-5k"), training=TrainingSettings(max_minutes=15)))
"""

from __future__ import annotations

import contextlib
import math
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ddpm.datasets.sources import load_pixels
from ddpm.plumbing.checkpointing import build_model
from ddpm.plumbing.output_files import writable_dir
from ddpm.plumbing.presets import TrainingJob, write_run_config
from ddpm.plumbing.processes import Processes, end_processes, replicas_agree, setup_processes
from ddpm.plumbing.runtime import (
    SpeedPlan,
    compile_or_eager,
    configure_fast_path,
    plan_speed,
    seed_everything,
)
from ddpm.training.clocks import BudgetClock, StopSignals
from ddpm.training.folder_lock import FolderLock
from ddpm.training.loop import STOPPED_BY_SIGNAL, Run, TrainingData
from ddpm.training.quality import prepare_quality
from ddpm.training.resume import Resumed, checkpoint_to_resume, start_random_streams
from ddpm.training.state import TrainingState
from ddpm.training.tensorboard_log import open_events
from ddpm.training.timestep_sampler import make_timestep_sampler
from ddpm.training.training_log import TrainingLog
from diffusion import GaussianDiffusion
from model import count_parameters


@dataclass(frozen=True, kw_only=True)
class TrainingResult:
    """Where a run ended: its folder, position, what stopped it ("epochs", "max_steps",
    "max_minutes", or a signal's name such as "SIGTERM"), and whether this process saved it."""

    out_dir: Path
    step: int
    epoch: int
    batch_in_epoch: int
    train_seconds: float  # by the run's budget clock, resumed runs' earlier seconds included
    stopped_by: str
    signal_number: int | None
    is_main: bool = True  # rank 0 (the one that saved), or the only process


def train(job: TrainingJob) -> TrainingResult:
    """Run (or resume) a training job to its first stop rule; a stop signal saves last.pt. Rank 0
    holds the output folder's lock (folder_lock.py) from the first check to the last write."""
    processes = setup_processes(job.runtime.device)
    try:
        out_dir = writable_dir(job.run.out_dir)
        with FolderLock(out_dir) if processes.is_main else contextlib.nullcontext():
            return train_on(job, processes, out_dir)
    finally:
        end_processes()


def train_on(job: TrainingJob, processes: Processes, out_dir: Path) -> TrainingResult:
    """Prepare the run, train it until a stop rule, save what the stop asks for, and report."""
    run = prepare_run(job, processes, out_dir)
    try:
        with StopSignals() as signals:
            stopped_by = run.run_epochs(signals)
            run.finish(stopped_by)
    finally:
        run.bar.close()
        run.log.close()
    if processes.world_size > 1:
        agree = replicas_agree(run.state.model, processes)
        processes.announce(
            f"the {processes.world_size} processes end with {'identical' if agree else 'DIFFERENT'} weights"
        )
    if run.signal_number is not None and stopped_by == STOPPED_BY_SIGNAL:
        stopped_by = signal.Signals(run.signal_number).name
    state = run.state
    return TrainingResult(
        out_dir=run.out_dir,
        step=state.step,
        epoch=state.epoch,
        batch_in_epoch=state.batch_in_epoch,
        train_seconds=state.train_seconds,
        stopped_by=stopped_by,
        signal_number=run.signal_number,
        is_main=processes.is_main,
    )


def prepare_run(job: TrainingJob, processes: Processes, out_dir: Path) -> Run:
    """Load the data, build or resume the state, write config.toml, open the log: a Run ready for
    run_epochs."""
    given, job = job, replace(job, data=job.data.with_defaults())
    runtime = job.runtime
    plan = plan_speed(
        runtime.amp, runtime.compile, runtime.compile_mode, runtime.channels_last, processes.device,
        processes.world_size,
    )  # fmt: skip
    configure_fast_path(processes.device)
    diffusion = GaussianDiffusion(**job.diffusion.config()).to(processes.device)
    data = load_training_data(job, processes)
    config = run_config(job, data.images.shape[1:], diffusion)
    resumed = checkpoint_to_resume(job, out_dir, config, processes)
    # before the seeding: reading the classifier draws its initial weights from the global RNG
    quality = prepare_quality(
        job, processes, out_dir, labels=data.labels, steps_per_epoch=data.steps_per_epoch,
        epochs_done=0 if resumed is None else resumed.checkpoint.get("epoch", 0),
        resume_step=None if resumed is None else resumed.checkpoint.get("step"),
        diffusion=diffusion, image_shape=tuple(config["image_shape"]), amp=plan.amp,
    )  # fmt: skip
    seed_everything(job.run.seed)  # the same initial weights on every rank
    state = build_training_state(config, job, plan, diffusion)
    start_random_streams(state, resumed, job.run.seed, processes)
    if processes.is_main:
        write_run_config(given, out_dir)  # the flags as given: --config reads back the same job
    training = job.training
    total_steps = min(training.epochs * data.steps_per_epoch, training.max_steps or math.inf)
    run = Run(
        job=job,
        processes=processes,
        config=config,
        out_dir=out_dir,
        diffusion=diffusion,
        data=data,
        state=state,
        network=network_for_training(state, plan, processes),
        plan=plan,
        log=training_log(
            job, processes, out_dir, config, resume_step=None if resumed is None else resumed.step
        ),
        bar=tqdm(total=total_steps, initial=state.step, unit="step", disable=not processes.is_main),
        clock=BudgetClock(training.clock, banked=state.train_seconds, max_minutes=training.max_minutes),
        quality=quality,
    )
    describe(run, resumed)
    return run


def training_log(
    job: TrainingJob, processes: Processes, out_dir: Path, config: dict[str, Any], resume_step: int | None
) -> TrainingLog:
    """train_log.csv and, unless --no-tensorboard, the TensorBoard events (rank 0 writes both), kept up
    to resume_step; the events' hparams are the resolved settings (config["train"])."""
    events = open_events(
        out_dir, enabled=job.run.tensorboard and processes.is_main, resume_step=resume_step,
        settings=config["train"],
    )  # fmt: skip
    images_per_step = job.training.batch_size * processes.world_size
    return TrainingLog(out_dir, processes, images_per_step, resume_step, events)


def run_config(job: TrainingJob, image_shape: torch.Size, diffusion: GaussianDiffusion) -> dict[str, Any]:
    """What rebuilds the model, its image shape [C, H, W] and the diffusion (for eval and vizu), the
    data it was trained on, and every resolved training setting."""
    channels, height, _ = image_shape
    return {
        "model": job.model.unet_config(channels, height),
        "image_shape": list(image_shape),
        "diffusion": diffusion.config(),
        "data": job.data.data,
        "data_dir": job.data.data_dir,
        "train": job.plain(),
    }


def load_training_data(job: TrainingJob, processes: Processes) -> TrainingData:
    """The whole training split on the device: uint8 pixels [N, C, H, W] (each batch is mapped to
    [-1, 1] as it is drawn) and labels [N], in steps of --batch-size per process."""
    data = job.data
    images, labels = load_pixels(
        data.data, "train", data.data_dir, image_size=data.image_size, channels=data.channels
    )
    return TrainingData.in_steps(
        images.to(processes.device), labels.to(processes.device), job.training.batch_size, processes
    )


def build_training_state(
    config: dict[str, Any], job: TrainingJob, plan: SpeedPlan, diffusion: GaussianDiffusion
) -> TrainingState:
    """U-Net, EMA, AdamW (fused on CUDA), grad scaler (fp16 only) and timestep sampler of a new run."""
    device = diffusion.alphas_cumprod.device
    memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format
    model = build_model(config).to(device).to(memory_format=memory_format)
    training = job.training
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=training.lr, weight_decay=training.weight_decay, fused=device.type == "cuda"
    )
    scaler = torch.amp.GradScaler(device.type, enabled=plan.amp == "fp16")
    sampler = make_timestep_sampler(training.timestep_sampler, diffusion.alphas_cumprod, device)
    return TrainingState.create(
        model, optimizer, scaler, training.ema_decay, job.run.seed, sampler, training.ema_sigma_rel
    )


def network_for_training(state: TrainingState, plan: SpeedPlan, processes: Processes) -> torch.nn.Module:
    """The module the forward pass runs: compiled (with an eager fallback) and/or DDP-wrapped around
    the same parameters. Checkpoints always save state.model, the plain U-Net (no `_orig_mod.` or
    `module.` prefixes)."""
    network: torch.nn.Module = state.model
    if plan.compile:
        network = compile_or_eager(network, plan.compile_mode, processes.announce)
    if processes.world_size > 1:
        device_ids = [processes.device.index] if processes.device.type == "cuda" else None
        network = DistributedDataParallel(network, device_ids=device_ids)
    return network


def describe(run: Run, resumed: Resumed | None) -> None:
    """One line on what is trained where; one on where it resumes."""
    job, state, processes = run.job, run.state, run.processes
    training = job.training
    budget = "" if training.max_minutes is None else f" or {training.max_minutes:g} {training.clock}-min"
    micro_batches = (
        f", {training.grad_accum} micro-batches of {training.micro_batch_size} per step"
        if training.grad_accum > 1
        else ""
    )
    processes.announce(
        f"U-Net {count_parameters(state.model):,} parameters | {job.data.data_dir or job.data.data}: "
        f"{len(run.data.images):,} images {'x'.join(map(str, run.config['image_shape']))}"
        f"{', flipped' if job.data.hflip else ''} | "
        f"{processes.world_size} x {processes.device}, {run.plan.describe()} | "
        f"{run.data.steps_per_epoch} steps/epoch x {training.epochs} epochs{budget}{micro_batches} | "
        f"to {run.out_dir}/"
    )
    if resumed is not None:
        processes.announce(
            f"resumed {resumed.path}: step {state.step}, epoch {state.epoch} + {state.batch_in_epoch} batches"
            + (f", {state.train_seconds:.0f} s trained" if training.max_minutes is not None else "")
        )
