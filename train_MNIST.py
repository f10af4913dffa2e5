"""Train the DDPM U-Net on MNIST: AdamW, warm-up + cosine LR, EMA, bf16, DDP, resumable to the bit.

Algorithm 1 of Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239), with
the cosine schedule of Nichol & Dhariwal 2021 (arXiv:2102.09672), optional v-prediction (Salimans &
Ho 2022, arXiv:2202.00512), min-SNR weighting (Hang et al. 2023, arXiv:2303.09556) and label
dropout for classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598). AdamW is Loshchilov &
Hutter 2019 (arXiv:1711.05101); the cosine LR decay is SGDR's (arXiv:1608.03983) without restarts.

Writes to --out-dir: last.pt (every epoch and when stopped), mnist_epoch_XX.pt (every --save-every
epochs), train_log.csv, loss.png and samples_epoch_XX.png (EMA weights, fixed noise, DDIM 50 steps).
Ctrl-C or SIGTERM saves last.pt and exits; `--resume latest` continues where the run stopped.

Examples:
    python train_MNIST.py                                     # 100 epochs, bf16 on a GPU
    python train_MNIST.py --data mnist-5k --model-channels 32 --epochs 5 --device cpu
    python train_MNIST.py --resume latest                     # continue checkpoints/last.pt
    torchrun --standalone --nproc_per_node=4 train_MNIST.py   # DistributedDataParallel
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import math
import os
import signal
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpointing import (
    CheckpointError,
    build_model,
    epoch_checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cli import (
    OneLineErrorParser,
    UserError,
    add_unet_speed_flags,
    autocast_context,
    compile_unet,
    configure_fast_path,
    int_tuple,
    non_negative_int,
    parse_with_unet_speed_flags,
    positive_float,
    positive_int,
    resolve_amp,
    resolve_device,
    run_cli,
    seed_everything,
    writable_dir,
)
from data_sources import DATA_SETS, load_images
from diffusion import PREDICTIONS, SCHEDULES, GaussianDiffusion
from image_metrics import save_image_grid
from model import count_parameters
from training_state import TrainingState, capture_rng_states, restore_rng_states

NUM_CLASSES = 10
LR_SCHEDULES = ("cosine", "constant")
SAMPLE_COUNT, SAMPLE_COLUMNS, SAMPLE_STEPS = 64, 8, 50  # the grid: 8 x 8 images, DDIM 50 steps
LAST_NAME, LOG_NAME, PLOT_NAME = "last.pt", "train_log.csv", "loss.png"
LOG_FIELDS = ("step", "epoch", "loss", "lr", "grad_norm", "img_per_s")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; nothing after the last checkpoint is saved."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data", choices=DATA_SETS, default="mnist", help="training set (mnist needs internet once)")
    add("--data-dir", default=None, help="folder of MNIST-format IDX files (overrides --data)")
    add("--model-channels", type=positive_int, default=64, help="width of the first U-Net level")
    add("--channel-mult", type=int_tuple, default="1,2,2", help="width of each level / model-channels")
    add("--num-res-blocks", type=positive_int, default=2, help="residual blocks per level")
    add("--attn-resolutions", type=int_tuple, default="14", help="feature-map sizes with self-attention")
    add("--dropout", type=float, default=0.1, help="dropout in the residual blocks")
    add("--class-cond", action=argparse.BooleanOptionalAction, default=False, help="condition on labels")
    add("--p-uncond", type=float, default=0.1, help="label dropout for classifier-free guidance")
    add("--T", type=int, default=1000, help="diffusion steps")
    add("--schedule", choices=SCHEDULES, default="cosine", help="noise schedule")
    add("--prediction", choices=PREDICTIONS, default="eps", help="what the network predicts")
    add(
        "--min-snr-gamma",
        type=positive_float,
        default=None,
        help="min-SNR loss weight gamma, e.g. 5 (None: plain MSE)",
    )
    add("--epochs", type=positive_int, default=100, help="passes over the training set")
    add("--batch-size", type=positive_int, default=128, help="images per step on each process")
    add("--lr", type=positive_float, default=2e-4, help="peak AdamW learning rate")
    add("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    add("--warmup-steps", type=non_negative_int, default=1000, help="linear LR warm-up steps")
    add("--lr-schedule", choices=LR_SCHEDULES, default="cosine", help="LR after the warm-up")
    add("--grad-clip", type=positive_float, default=1.0, help="clip the gradient norm to this")
    add("--ema-decay", type=float, default=0.9999, help="EMA decay, reached after a warm-up")
    add("--max-steps", type=positive_int, default=None, help="stop after this many steps (smoke runs)")
    add_unet_speed_flags(parser)
    add("--seed", type=int, default=0, help="seed for weights, data order, noise and sample grids")
    add("--device", default="auto", help="auto | cpu | cuda")
    add("--out-dir", default="checkpoints", help="checkpoints, log, loss plot and sample grids")
    add("--save-every", type=positive_int, default=10, help="epochs between mnist_epoch_XX.pt files")
    add("--sample-every", type=positive_int, default=5, help="epochs between sample grids")
    add("--log-every", type=positive_int, default=50, help="steps between rows of train_log.csv")
    add("--resume", default=None, help="latest (newest checkpoint in --out-dir) or a checkpoint path")
    return parse_with_unet_speed_flags(parser, argv)


def validate_args(args: argparse.Namespace) -> None:
    """The checks argparse types cannot express, each a one-line UserError."""
    checks = (
        (args.T >= 2, f"--T must be at least 2, got {args.T}"),
        (0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}"),
        (0 <= args.p_uncond < 1, f"--p-uncond must be in [0, 1), got {args.p_uncond}"),
        (0 <= args.ema_decay < 1, f"--ema-decay must be in [0, 1), got {args.ema_decay}"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (len(args.channel_mult) > 0 and min(args.channel_mult) > 0, "--channel-mult needs e.g. 1,2,2"),
    )
    for ok, message in checks:
        if not ok:
            raise UserError(message)


# ----- processes, devices and precision -----------------------------------------------------------


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

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when flag is true on any rank."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

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


def plain(value: Any) -> Any:
    """Tuples as lists, so configs compare equal however they were written."""
    return list(value) if isinstance(value, tuple | list) else value


def run_config(args: argparse.Namespace, diffusion: GaussianDiffusion) -> dict[str, Any]:
    """What rebuilds the model and the diffusion (for eval and vizu), plus every training flag."""
    model = {
        "in_channels": 1,
        "model_channels": args.model_channels,
        "channel_mult": plain(args.channel_mult),
        "num_res_blocks": args.num_res_blocks,
        "attention_resolutions": plain(args.attn_resolutions),
        "dropout": args.dropout,
        "num_classes": NUM_CLASSES if args.class_cond else None,
    }
    train = {key: plain(value) for key, value in vars(args).items()}
    return {"model": model, "diffusion": diffusion.config(), "data": args.data, "train": train}


def setup_differences(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """'key <checkpoint value> there, <flag value> here' for each model, diffusion or data difference."""
    differences = []
    for section in ("model", "diffusion"):
        saved_section, section_config = saved.get(section, {}), config[section]
        for key in sorted(set(saved_section) | set(section_config)):
            if plain(saved_section.get(key)) != section_config.get(key):
                differences.append(f"{key} {saved_section.get(key)} there, {section_config.get(key)} here")
    if saved.get("data") != config["data"]:
        differences.append(f"data {saved.get('data')} there, {config['data']} here")
    return differences


def checkpoint_to_resume(
    args: argparse.Namespace, out_dir: Path, config: dict[str, Any], processes: Processes
) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint --resume names (checked against the flags), or None for a new run."""
    if args.resume is None:
        refuse_to_overwrite(out_dir)
        return None
    path = Path(args.resume)
    if args.resume == "latest":
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


def load_training_data(args: argparse.Namespace, processes: Processes) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole training split on the device: images [N, 1, 28, 28] in [-1, 1], labels [N]."""
    images, labels = load_images(args.data, "train", args.data_dir)
    images_per_step = args.batch_size * processes.world_size
    if len(images) < images_per_step:
        raise UserError(
            f"--batch-size {args.batch_size} x {processes.world_size} process(es) needs at least "
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


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """LR multiplier: linear warm-up, then 1 (constant) or cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_training_state(
    config: dict[str, Any], args: argparse.Namespace, amp: str, total_steps: int, device: torch.device
) -> TrainingState:
    """U-Net, EMA, AdamW (fused on CUDA), LR schedule and grad scaler (fp16 only) of a new run."""
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_model(config).to(device, memory_format=memory_format)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda"
    )
    schedule = functools.partial(
        lr_factor, warmup_steps=args.warmup_steps, total_steps=total_steps, schedule=args.lr_schedule
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    return TrainingState.create(model, optimizer, scheduler, scaler, args.ema_decay, data_seed=args.seed)


def start_random_streams(
    state: TrainingState, resumed: tuple[dict[str, Any], Path] | None, seed: int, processes: Processes
) -> None:
    """Resume: restore the checkpoint and each rank's RNG states. New run: one stream per rank for
    timesteps, noise, dropout and label dropout, apart from the one that initialised the weights."""
    if resumed is not None:
        checkpoint, path = resumed
        state.restore(checkpoint, path)
        rng_states = checkpoint["rng"]
        if len(rng_states) == processes.world_size:
            restore_rng_states(rng_states[processes.rank], processes.device)
            return
        processes.announce(
            f"{path} was written by {len(rng_states)} process(es), this run has {processes.world_size}: "
            "random streams reseeded, so this resume is not bit-exact"
        )
    seed_everything(seed + 1 + processes.rank + state.step)  # + step: a reseeded resume draws anew


def network_for_training(
    state: TrainingState, args: argparse.Namespace, processes: Processes
) -> torch.nn.Module:
    """The module the forward pass runs: compiled and/or DDP-wrapped around the same parameters.

    Checkpoints always save state.model, the plain U-Net (no `_orig_mod.` or `module.` prefixes).
    """
    network = compile_unet(state.model, args.compile_mode) if args.compile else state.model
    if processes.world_size > 1:
        device_ids = [processes.device.index] if processes.device.type == "cuda" else None
        network = DistributedDataParallel(network, device_ids=device_ids)
    return network


def drop_labels(labels: torch.Tensor, p_uncond: float) -> torch.Tensor:
    """Replace each label by the null label (NUM_CLASSES) with probability p_uncond."""
    dropped = torch.rand(labels.shape, device=labels.device) < p_uncond
    return torch.where(dropped, torch.full_like(labels, NUM_CLASSES), labels)


# ----- logging and pictures -----------------------------------------------------------------------


class TrainingLog:
    """Losses stay on the device between rows; each row (every --log-every steps and at each epoch
    end) syncs once, averages over steps and ranks, stops on a non-finite loss, and goes to
    train_log.csv and the progress bar (rank 0)."""

    def __init__(self, out_dir: Path, processes: Processes, images_per_step: int, resume_step: int | None):
        self.out_dir, self.processes, self.images_per_step = out_dir, processes, images_per_step
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.restart_clock()
        self.file = open_log(out_dir / LOG_NAME, resume_step) if processes.is_main else None

    def record(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.losses.append(loss.float())
        self.grad_norms.append(grad_norm.float())

    def flush(self, step: int, epoch: float, lr: float, bar: tqdm) -> None:
        if not self.losses:
            return
        values = torch.stack([torch.stack(self.losses), torch.stack(self.grad_norms)])
        if self.processes.world_size > 1:
            dist.all_reduce(values)
            values /= self.processes.world_size
        values = values.cpu()
        non_finite = torch.nonzero(~torch.isfinite(values[0])).flatten()
        if len(non_finite):
            first = int(non_finite[0])
            raise TrainingDiverged(
                f"loss became {values[0, first].item()} at step {step - len(self.losses) + first + 1}: "
                f"training stopped, nothing saved after the last checkpoint in {self.out_dir}/"
            )
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
            csv.writer(self.file).writerow(row)
            self.file.flush()
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_second:.0f}")
        self.losses, self.grad_norms = [], []
        self.restart_clock()

    def restart_clock(self) -> None:
        self.window_start = time.perf_counter()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def open_log(path: Path, resume_step: int | None):
    """train_log.csv for writing; a resumed run keeps the rows up to its checkpoint's step."""
    kept = []
    if resume_step is not None and path.is_file():
        with path.open(newline="") as old:
            kept = [row for row in csv.DictReader(old) if int(row["step"]) <= resume_step]
    log_file = path.open("w", newline="")
    writer = csv.DictWriter(log_file, LOG_FIELDS)
    writer.writeheader()
    writer.writerows(kept)
    return log_file


def plot_loss(log_path: Path, plot_path: Path) -> None:
    """loss.png: the logged training loss against the step, on a log scale."""
    with log_path.open(newline="") as log_file:
        rows = list(csv.DictReader(log_file))
    if not rows:
        return
    figure = Figure(figsize=(7, 4), tight_layout=True)
    axis = figure.subplots()
    axis.plot([int(row["step"]) for row in rows], [float(row["loss"]) for row in rows])
    axis.set(xlabel="step", ylabel="training loss", yscale="log", title="DDPM training loss")
    axis.grid(alpha=0.3)
    figure.savefig(plot_path, dpi=120)


@torch.no_grad()
def save_samples(run: Run, path: Path) -> None:
    """An 8 x 8 grid from the EMA weights: fixed noise (--seed), DDIM 50 steps (digits 0-9 in turn
    for a class-conditional model)."""
    device = run.processes.device
    generator = torch.Generator(device).manual_seed(run.args.seed)
    labels = torch.arange(SAMPLE_COUNT, device=device) % NUM_CLASSES if run.args.class_cond else None
    with run.autocast:
        images = run.diffusion.sample(
            run.state.ema.module.eval(),
            SAMPLE_COUNT,
            sampler="ddim",
            steps=min(SAMPLE_STEPS, run.diffusion.T),
            generator=generator,
            labels=labels,
        )
    save_image_grid(images, path, columns=SAMPLE_COLUMNS)


# ----- the training loop --------------------------------------------------------------------------


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


@dataclass
class Run:
    """What the loop needs: flags, processes, data, the diffusion, the state, and the outputs."""

    args: argparse.Namespace
    processes: Processes
    config: dict[str, Any]
    out_dir: Path
    diffusion: GaussianDiffusion
    images: torch.Tensor
    labels: torch.Tensor
    state: TrainingState
    network: torch.nn.Module
    autocast: AbstractContextManager
    log: TrainingLog
    bar: tqdm

    @property
    def steps_per_epoch(self) -> int:
        return len(self.images) // (self.args.batch_size * self.processes.world_size)

    def train_step(self, indices: torch.Tensor) -> None:
        """Algorithm 1 on one batch, then clip, AdamW, LR schedule and EMA."""
        state, args = self.state, self.args
        x0 = self.images[indices]
        labels = drop_labels(self.labels[indices], args.p_uncond) if args.class_cond else None
        with self.autocast:
            loss = self.diffusion.training_loss(self.network, x0, labels, min_snr_gamma=args.min_snr_gamma)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), args.grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
        state.ema.update()
        state.step += 1
        state.batch_in_epoch += 1
        self.log.record(loss.detach(), grad_norm)
        self.bar.update()

    def flush_log(self) -> None:
        epoch = self.state.step / self.steps_per_epoch
        self.log.flush(self.state.step, epoch, self.state.scheduler.get_last_lr()[0], self.bar)

    def should_stop(self, signals: StopSignals) -> bool:
        at_cap = self.args.max_steps is not None and self.state.step >= self.args.max_steps
        return self.processes.any_rank(signals.received is not None) or at_cap

    def run_epochs(self, signals: StopSignals) -> bool:
        """Train until the last epoch ends (False) or a stop is due (True), resuming mid-epoch."""
        state, args = self.state, self.args
        while state.epoch < args.epochs:
            self.bar.set_description(f"epoch {state.epoch + 1}/{args.epochs}")
            batches = epoch_batches(
                len(self.images), args.batch_size, state.data_seed + state.epoch, self.processes
            )
            for indices in batches[state.batch_in_epoch :]:
                if self.should_stop(signals):
                    return True
                self.train_step(indices)
                if state.step % args.log_every == 0:
                    self.flush_log()
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            self.end_epoch()
        return False

    def end_epoch(self) -> None:
        """Log, save last.pt (and mnist_epoch_XX.pt), sample a grid and redraw loss.png."""
        epoch, last_epoch = self.state.epoch, self.state.epoch == self.args.epochs
        self.flush_log()
        names = [LAST_NAME]
        if epoch % self.args.save_every == 0 or last_epoch:
            names.append(epoch_checkpoint_name(epoch))
        self.save(names)
        if self.processes.is_main:
            if epoch % self.args.sample_every == 0 or last_epoch:
                save_samples(self, self.out_dir / f"samples_epoch_{epoch:02d}.png")
            plot_loss(self.out_dir / LOG_NAME, self.out_dir / PLOT_NAME)
        self.log.restart_clock()  # img/s counts training time only

    def save(self, names: list[str]) -> None:
        """Every rank hands in its RNG states; rank 0 writes the checkpoint under each name."""
        rng_states = self.processes.gather(capture_rng_states(self.processes.device))
        if self.processes.is_main:
            checkpoint = self.state.to_checkpoint(self.config, rng_states)
            for name in names:
                save_checkpoint(checkpoint, self.out_dir / name)


def replicas_agree(model: torch.nn.Module, processes: Processes) -> bool:
    """Whether every rank holds bit-identical weights (one SHA-256 per rank)."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return len(set(processes.gather(digest.hexdigest()))) == 1


def prepare_run(args: argparse.Namespace, processes: Processes) -> Run:
    """Check the flags and the output folder, load the data, build or resume the state."""
    out_dir = writable_dir(args.out_dir)
    amp = resolve_amp(args.amp, processes.device)
    configure_fast_path(processes.device)
    diffusion = GaussianDiffusion(args.T, args.schedule, args.prediction).to(processes.device)
    config = run_config(args, diffusion)
    resumed = checkpoint_to_resume(args, out_dir, config, processes)
    images, labels = load_training_data(args, processes)
    steps_per_epoch = len(images) // (args.batch_size * processes.world_size)
    seed_everything(args.seed)  # the same initial weights on every rank
    state = build_training_state(config, args, amp, args.epochs * steps_per_epoch, processes.device)
    start_random_streams(state, resumed, args.seed, processes)
    network = network_for_training(state, args, processes)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    bar = tqdm(total=total_steps, initial=state.step, unit="step", disable=not processes.is_main)
    resume_step = resumed[0]["step"] if resumed is not None else None
    log = TrainingLog(out_dir, processes, args.batch_size * processes.world_size, resume_step)
    autocast = autocast_context(amp, processes.device)
    run = Run(args, processes, config, out_dir, diffusion, images, labels, state, network, autocast, log, bar)
    describe(run, amp, resumed)
    return run


def describe(run: Run, amp: str, resumed: tuple[dict[str, Any], Path] | None) -> None:
    """One line on what is trained where; one on where it resumes."""
    args, state = run.args, run.state
    data = args.data_dir or args.data
    compiled = f", compiled ({args.compile_mode})" if args.compile else ""
    run.processes.announce(
        f"U-Net {count_parameters(state.model):,} parameters | {data}: {len(run.images):,} images | "
        f"{run.processes.world_size} x {run.processes.device}, amp {amp}"
        f"{compiled} | {run.steps_per_epoch} steps/epoch x {args.epochs} "
        f"epochs | writing to {run.out_dir}/"
    )
    if resumed is not None:
        run.processes.announce(
            f"resumed {resumed[1]}: step {state.step}, epoch {state.epoch} + {state.batch_in_epoch} batches"
        )


def train(args: argparse.Namespace, processes: Processes) -> None:
    """Run (or resume) the training; on a stop signal save last.pt and exit with 128 + signal."""
    run = prepare_run(args, processes)
    try:
        with StopSignals() as signals:
            stopped_early = run.run_epochs(signals)
            if stopped_early:
                run.flush_log()
                run.save([LAST_NAME])
    finally:
        run.bar.close()
        run.log.close()
    if processes.is_main:
        plot_loss(run.out_dir / LOG_NAME, run.out_dir / PLOT_NAME)
    if processes.world_size > 1:
        agree = replicas_agree(run.state.model, processes)
        processes.announce(
            f"the {processes.world_size} processes end with {'identical' if agree else 'DIFFERENT'} weights"
        )
    state = run.state
    position = f"step {state.step} ({state.epoch} epochs + {state.batch_in_epoch} batches)"
    if signals.received is None:
        processes.announce(f"{position}: {run.out_dir / LAST_NAME}")
        return
    processes.announce(
        f"stopped by {signal.Signals(signals.received).name} at {position}: saved {run.out_dir / LAST_NAME}, "
        "continue with --resume latest"
    )
    raise SystemExit(128 + signals.received)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    validate_args(args)
    processes = setup_processes(args.device)
    try:
        train(args, processes)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
