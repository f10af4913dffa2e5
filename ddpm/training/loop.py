"""The training loop: Algorithm 1 step after step, epoch after epoch, until a stop rule; epoch ends save.

Each step is Algorithm 1 of Ho et al. 2020 (arXiv:2006.11239) through
`GaussianDiffusion.training_losses` (L_hybrid of Nichol & Dhariwal 2021 with --learn-sigma) at the
timesteps of --timestep-sampler (timestep_sampler.py), then gradient clipping, AdamW (Loshchilov &
Hutter 2019, arXiv:1711.05101) at an LR with a linear warm-up then SGDR's cosine decay without restarts
(arXiv:1608.03983), and the EMA of the weights (state.WarmupEMA); class-conditional models drop labels
for classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598). The cosine reaches 0 at the end
of the epochs or of the time budget, whichever is nearer. Epoch e's batches are a permutation seeded
with data seed + e, split between the ranks. A batch (--batch-size images per process) goes through the
U-Net in --grad-accum micro-batches whose gradients add up (all-reduced once under DDP) before the one
grad-scaler unscale, clipping, AdamW step and EMA update; a step counts optimizer steps, so stops and
checkpoints fall between them and a resume is bit-exact whatever --grad-accum.

Stop rules, checked before each step and agreed by all ranks: --epochs, --max-steps, --max-minutes
(clocks.BudgetClock), SIGINT/SIGTERM. Each epoch end logs, saves last.pt (and <data>_epoch_XX.pt every
--save-every epochs and after the last), draws samples_epoch_XX.png every --sample-every epochs and
after the last, measures the quality every --eval-every epochs and after the last (quality.py:
quality_log.csv, best.pt; the budget clock is paused), and redraws loss.png; any other stop saves
last.pt, and a stop by --max-steps or --max-minutes draws samples_step_XXXXXX.png. Sample grids: 64
images from the EMA weights, fixed noise, DDIM 50 steps; each also goes to the TensorBoard events as
the image `samples` at its step, and each measure as the scalars `quality/*`.

Example:
    run = prepare_run(job, processes, out_dir)  # trainer.py
    with StopSignals() as signals:
        run.finish(run.run_epochs(signals))
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ddpm.datasets.checks import NUM_CLASSES
from ddpm.datasets.sources import random_hflip, to_model_range
from ddpm.plumbing.checkpointing import LAST_NAME, data_name, epoch_checkpoint_name, save_checkpoint
from ddpm.plumbing.messages import UserError
from ddpm.plumbing.output_files import OutputError
from ddpm.plumbing.presets import TrainingJob
from ddpm.plumbing.processes import Processes
from ddpm.plumbing.runtime import SpeedPlan, autocast_context
from ddpm.sampling import balanced_labels
from ddpm.training.clocks import BudgetClock, StopSignals
from ddpm.training.quality import TrainingQuality
from ddpm.training.state import TrainingState, capture_rng_states
from ddpm.training.training_log import TrainingDiverged, TrainingLog
from ddpm.visualisation.pictures import save_image_grid
from diffusion import GaussianDiffusion

SAMPLE_COUNT, SAMPLE_COLUMNS, SAMPLE_STEPS = 64, 8, 50  # the grid: 8 x 8 images, DDIM 50 steps
STOPPED_BY_EPOCHS, STOPPED_BY_SIGNAL = "epochs", "signal"


@dataclass(frozen=True, kw_only=True)
class TrainingData:
    """The training split on the device, cut into steps of batch_size images per process."""

    images: torch.Tensor  # uint8 pixels [N, C, H, W], mapped to [-1, 1] batch by batch
    labels: torch.Tensor  # [N]
    batch_size: int  # per process
    steps_per_epoch: int  # N // (batch_size x processes): an incomplete last batch is dropped

    @classmethod
    def in_steps(
        cls, images: torch.Tensor, labels: torch.Tensor, batch_size: int, processes: Processes
    ) -> TrainingData:
        """The data with its steps per epoch; a UserError if it is too small for one step."""
        images_per_step = batch_size * processes.world_size
        if len(images) < images_per_step:
            raise UserError(
                f"--batch-size {batch_size} x {processes.world_size} process(es) needs at least "
                f"{images_per_step} images; the training set has {len(images)}"
            )
        steps = len(images) // images_per_step
        return cls(images=images, labels=labels, batch_size=batch_size, steps_per_epoch=steps)

    def epoch_batches(self, seed: int, processes: Processes) -> torch.Tensor:
        """This rank's batches of one epoch as indices [steps_per_epoch, batch_size].

        The order is a permutation drawn from a generator seeded with `seed` (data seed + epoch), the
        same on every rank; each step's batch_size * world_size indices are split between the ranks.
        """
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(seed))
        shape = (self.steps_per_epoch, processes.world_size, self.batch_size)
        batches = order[: math.prod(shape)].view(shape)
        return batches[:, processes.rank].to(processes.device)


def lr_factor(optimizer_steps: int, warmup_steps: int, progress: float, schedule: str) -> float:
    """LR multiplier: linear warm-up over the first steps, then 1 (constant) or a cosine decay
    0.5 (1 + cos(pi progress)) that reaches 0 when progress (the part of the run done) reaches 1."""
    if optimizer_steps < warmup_steps:
        return (optimizer_steps + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def drop_labels(labels: torch.Tensor, p_uncond: float) -> torch.Tensor:
    """Replace each label by the null label (NUM_CLASSES) with probability p_uncond."""
    dropped = torch.rand(labels.shape, device=labels.device) < p_uncond
    return torch.where(dropped, torch.full_like(labels, NUM_CLASSES), labels)


def no_gradient_sync(network: torch.nn.Module) -> contextlib.AbstractContextManager:
    """DDP's no_sync (the backward keeps its gradients local, to be all-reduced with a later one);
    a no-op for a network that is not DDP-wrapped."""
    if isinstance(network, DistributedDataParallel):
        return network.no_sync()
    return contextlib.nullcontext()


def non_finite_weights(state: TrainingState) -> bool:
    """Whether any weight of the model or its EMA is NaN or infinite (one sync)."""
    tensors = [*state.model.state_dict().values(), *state.ema.module.state_dict().values()]
    return not torch.stack([torch.isfinite(t).all() for t in tensors if t.is_floating_point()]).all().item()


@dataclass(kw_only=True)
class Run:
    """A prepared run (trainer.prepare_run): the job, the processes, the data, the diffusion, the
    state and the network that trains it, and the outputs (log, progress bar, budget clock)."""

    job: TrainingJob
    processes: Processes
    config: dict[str, Any]  # what the checkpoints record (trainer.run_config)
    out_dir: Path
    diffusion: GaussianDiffusion
    data: TrainingData
    state: TrainingState
    network: torch.nn.Module  # state.model, compiled and/or DDP-wrapped
    plan: SpeedPlan
    log: TrainingLog
    bar: tqdm
    clock: BudgetClock
    signal_number: int | None = None  # the stop signal, as agreed by every rank
    quality: TrainingQuality | None = None  # the measures of --eval-every (None: none)

    def progress(self, seconds: float) -> float:
        """The part of the run done, for the cosine LR: the larger of the optimizer steps after the
        warm-up over those of all epochs, and the seconds trained over the time budget."""
        training = self.job.training
        total = training.epochs * self.data.steps_per_epoch
        by_steps = (self.state.optimizer_steps - training.warmup_steps) / max(
            1, total - training.warmup_steps
        )
        return max(by_steps, seconds / self.clock.budget)

    def train_step(self, indices: torch.Tensor, seconds: float) -> None:
        """Algorithm 1 on one batch (indices [batch_size]) in --grad-accum micro-batches, then, once per
        optimizer step, unscale, clip, AdamW at the scheduled LR (for `seconds` trained), and the EMA."""
        state, training = self.state, self.job.training
        x0 = to_model_range(self.data.images[indices])
        if self.job.data.hflip:
            x0 = random_hflip(x0)
        class_cond = self.job.model.class_cond
        labels = drop_labels(self.data.labels[indices], training.p_uncond) if class_cond else None
        state.optimizer.zero_grad(set_to_none=True)
        loss = self.accumulate_gradients(x0, labels)
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
        self.log.record(loss, grad_norm)
        self.bar.update()

    def accumulate_gradients(self, x0: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Backpropagate Algorithm 1's loss on the batch x0 [B, C, H, W] in K = --grad-accum micro-batches
        of B / K images, each loss divided by K so that the gradients add up to the batch's mean loss;
        under DDP the gradients are all-reduced once, in the last micro-batch's backward (no_sync for
        the others). t (with its weight 1 / (T p_t): timestep_sampler.py) and eps are drawn for the whole
        batch first, in GaussianDiffusion.training_loss's order, so K changes the memory, not the step
        (dropout masks aside); the timestep sampler then learns the batch's losses. Returns the batch's
        loss, detached."""
        parts, sampler = self.job.training.grad_accum, self.state.timestep_sampler
        t, weights = sampler.sample(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        micro_batches = zip(
            x0.chunk(parts),
            labels.chunk(parts) if labels is not None else [None] * parts,
            t.chunk(parts),
            noise.chunk(parts),
            weights.chunk(parts),
            strict=True,
        )
        total, losses = torch.zeros((), device=x0.device), []
        for index, (x0_part, labels_part, t_part, noise_part, weights_part) in enumerate(micro_batches):
            last = index == parts - 1
            with contextlib.nullcontext() if last else no_gradient_sync(self.network):
                with autocast_context(self.plan.amp, self.processes.device):
                    part_losses = self.diffusion.training_losses(
                        self.network, x0_part, t_part, labels_part, self.job.training.min_snr_gamma,
                        noise=noise_part,
                    )  # fmt: skip
                    loss = (weights_part * part_losses).mean() / parts
                self.state.scaler.scale(loss).backward()
            total += loss.detach()
            losses.append(part_losses.detach())
        sampler.update(t, torch.cat(losses), self.processes)
        return total

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
        epoch = self.state.step / self.data.steps_per_epoch
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
            return STOPPED_BY_SIGNAL, seconds
        if max_steps is not None and self.state.step >= max_steps:
            return "max_steps", seconds
        if seconds >= self.clock.budget:
            return "max_minutes", seconds
        return None, seconds

    def run_epochs(self, signals: StopSignals) -> str:
        """Train until the last epoch ends ("epochs") or another stop rule says so (its name)."""
        state, training = self.state, self.job.training
        while state.epoch < training.epochs:
            self.bar.set_description(f"epoch {state.epoch + 1}/{training.epochs}")
            batches = self.data.epoch_batches(state.data_seed + state.epoch, self.processes)
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
        return STOPPED_BY_EPOCHS

    def end_epoch(self) -> None:
        """Log, save last.pt (and <data>_epoch_XX.pt), sample a grid, measure the quality (best.pt) and
        redraw loss.png."""
        epoch, last_epoch, run = self.state.epoch, self.state.epoch == self.job.training.epochs, self.job.run
        self.flush_log()
        names = [LAST_NAME]
        if epoch % run.save_every == 0 or last_epoch:
            names.append(epoch_checkpoint_name(epoch, data_name(self.job.data.data, self.job.data.data_dir)))
        checkpoint = self.save(names)
        if epoch % run.sample_every == 0 or last_epoch:
            self.save_samples(f"samples_epoch_{epoch:02d}.png")
        if self.quality is not None and self.quality.due(epoch):
            record = self.quality.measure(self.state)  # rank 0 measures, the other ranks wait
            if record is not None:
                self.quality.keep_best(record, checkpoint)  # best.pt when its FID is the lowest yet
                self.quality.log(record)  # quality_log.csv and a line on the terminal
                self.log.events.add_scalars("quality", record.step, record.scalars())
        self.log.plot()
        self.log.restart_clock()  # img/s counts training time only

    def finish(self, stopped_by: str) -> None:
        """After a stop other than the last epoch's end: log, save last.pt, and (unless a signal
        stopped the run) draw samples_step_XXXXXX.png; then redraw loss.png."""
        if stopped_by == STOPPED_BY_EPOCHS:
            return
        self.flush_log()
        self.save([LAST_NAME])
        if stopped_by != STOPPED_BY_SIGNAL:
            self.save_samples(f"samples_step_{self.state.step:06d}.png")
        self.log.plot()

    def save(self, names: list[str]) -> dict[str, Any] | None:
        """Every rank hands in its RNG states; rank 0 checks the weights are finite, writes the
        checkpoint under each name and returns it (the other ranks: None)."""
        self.state.train_seconds = self.clock.seconds()
        rng_states = self.processes.gather(capture_rng_states(self.processes.device))
        if not self.processes.is_main:
            return None
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
        return checkpoint

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
                labels=balanced_labels(SAMPLE_COUNT, self.state.model.num_classes, device),
                image_shape=tuple(self.config["image_shape"]),
            )
        save_image_grid(images, self.out_dir / name, columns=SAMPLE_COLUMNS)
        self.log.events.add_grid("samples", images, self.state.step, columns=SAMPLE_COLUMNS)
