"""Everything a training run needs to resume bit-exactly: weights, EMA, optimizer, RNG, data position.

`TrainingState` holds the U-Net, its EMA (`WarmupEMA`), the AdamW optimizer, the grad scaler, the
timestep sampler's loss history (timestep_sampler.py) and the position in the run (step, epoch,
batch, optimizer steps, seconds of training), and turns them into the checkpoint dict of
`checkpointing.py` and back. The learning rate needs no state of its
own: the trainer derives it from the optimizer steps and the seconds trained. RNG states (torch CPU/CUDA/MPS,
NumPy, Python) are stored as tensors and plain values so the checkpoint loads with
`torch.load(weights_only=True)`. The data order needs no state of its own: epoch e is shuffled by a
generator seeded with data_seed + e, as DistributedSampler does.

The EMA decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (the schedule of
TensorFlow's ExponentialMovingAverage with num_updates), so early weights do not dominate. With
--ema-sigma-rel it is EDM2's power function instead (Karras et al. 2024, arXiv:2312.02696, eq. 2 and
section 3.1): update k = n + 1 uses decay (1 - 1/k)^(gamma + 1), which averages the weights of steps
tau <= k with weights close to tau^gamma, a window that grows with the run; gamma is the root of
sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), the width of that profile relative to k. The count
n lives on the host: an update is one fused lerp over all weights and never waits for the GPU
(`torch.optim.swa_utils.AveragedModel` keeps it in a device tensor, and reading it back each step
stalled the CUDA queue).

Example:
    sampler = make_timestep_sampler("uniform", diffusion.alphas_cumprod, device)
    state = TrainingState.create(model, optimizer, scaler, 0.9999, data_seed=0, timestep_sampler=sampler)
    checkpoint = state.to_checkpoint(config, [capture_rng_states(device)])
    state.restore(load_checkpoint("checkpoints/last.pt"), "checkpoints/last.pt")
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ddpm.plumbing.checkpointing import CHECKPOINT_VERSION, CheckpointError
from ddpm.training.timestep_sampler import UniformSampler
from model import UNet

EMA_WARMUP_OFFSET = 10  # decay = min(decay, (1 + n) / (EMA_WARMUP_OFFSET + n))
RESUME_KEYS = (
    "ema",
    "ema_n_averaged",
    "optimizer",
    "scaler",
    "step",
    "epoch",
    "batch_in_epoch",
    "data_seed",
    "rng",
)


def ema_decay_after(n_averaged: int, max_decay: float) -> float:
    """The decay of the EMA update that follows n_averaged earlier updates (n >= 1)."""
    return min(max_decay, (1 + n_averaged) / (EMA_WARMUP_OFFSET + n_averaged))


def power_ema_exponent(sigma_rel: float) -> float:
    """EDM2's gamma for a relative width sigma_rel in (0, sqrt(1/12)): the largest real root of
    (gamma + 2)^2 (gamma + 3) - (gamma + 1) / sigma_rel^2 = 0 (their sigma_rel_to_gamma)."""
    inverse_square = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inverse_square, 12.0 - inverse_square])
    return float(roots.real.max())


def power_ema_decay_after(n_averaged: int, gamma: float) -> float:
    """The power-function EMA's decay (1 - 1/k)^(gamma + 1) at update k = n_averaged + 1 (0 at k = 1)."""
    return (1 - 1 / (n_averaged + 1)) ** (gamma + 1)


class WarmupEMA:
    """An exponential moving average of a model's floating-point weights with the warm-up decay above,
    or with sigma_rel EDM2's power-function decay.

    `module` is a frozen copy of the model. The first update copies the model's weights; update
    k + 1 blends them in with weight 1 - decay(k): ema <- ema + (1 - decay) (model - ema). The
    model's tensors are looked up once: training changes them in place (the optimizer step, a
    resume's load_state_dict), never replaces them.
    """

    def __init__(self, model: nn.Module, max_decay: float, sigma_rel: float | None = None):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.max_decay = max_decay
        self.power = None if sigma_rel is None else power_ema_exponent(sigma_rel)
        self.n_averaged = 0
        self.averaged, self.source = floating_tensors(self.module), floating_tensors(model)

    def decay(self) -> float:
        """The decay of the next update (n_averaged >= 1)."""
        if self.power is None:
            return ema_decay_after(self.n_averaged, self.max_decay)
        return power_ema_decay_after(self.n_averaged, self.power)

    @torch.no_grad()
    def update(self) -> None:
        if self.n_averaged == 0:
            torch._foreach_copy_(self.averaged, self.source)
        else:
            torch._foreach_lerp_(self.averaged, self.source, 1 - self.decay())
        self.n_averaged += 1


def floating_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's floating-point parameters and buffers, detached, in state_dict order."""
    return [tensor for tensor in module.state_dict().values() if tensor.is_floating_point()]


def capture_rng_states(device: torch.device) -> dict[str, Any]:
    """The torch (CPU and CUDA or MPS), NumPy and Python RNG states, as tensors and plain values."""
    numpy_state: tuple[str, np.ndarray, int, int, float] = np.random.get_state()  # type: ignore[assignment]
    _, numpy_keys, numpy_position, has_gauss, cached_gaussian = numpy_state
    python_version, python_internal, python_gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "mps": torch.mps.get_rng_state() if device.type == "mps" else None,
        "numpy": {
            "keys": torch.from_numpy(numpy_keys.astype(np.int64)),
            "position": int(numpy_position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": python_version,
            "internal": torch.tensor(python_internal, dtype=torch.int64),
            "gauss_next": python_gauss_next,
        },
    }


def restore_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Inverse of capture_rng_states."""
    torch.set_rng_state(states["torch"].cpu())
    if device.type == "cuda" and states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)
    if device.type == "mps" and states.get("mps") is not None:
        torch.mps.set_rng_state(states["mps"].cpu())
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = states["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["internal"].tolist()), python_state["gauss_next"])
    )


@dataclass
class TrainingState:
    """The mutable state of a run. `step` counts the batches trained on, `optimizer_steps` those whose
    update was applied (an fp16 step skipped by the grad scaler is not), `epoch` the finished epochs,
    `batch_in_epoch` the batches of the current one already trained on, and `train_seconds` the time
    spent in training steps by the run's budget clock."""

    model: UNet
    ema: WarmupEMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    data_seed: int
    timestep_sampler: UniformSampler
    step: int = 0
    optimizer_steps: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    train_seconds: float = 0.0

    @classmethod
    def create(
        cls,
        model,
        optimizer,
        scaler,
        ema_decay: float,
        data_seed: int,
        timestep_sampler: UniformSampler,
        ema_sigma_rel: float | None = None,
    ) -> TrainingState:
        ema = WarmupEMA(model, ema_decay, ema_sigma_rel)
        return cls(model, ema, optimizer, scaler, data_seed, timestep_sampler)

    def to_checkpoint(self, config: dict[str, Any], rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint dict; rng_states holds one entry per DDP rank (one without DDP)."""
        return {
            "version": CHECKPOINT_VERSION,
            "config": config,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict(),
            "ema_n_averaged": self.ema.n_averaged,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "optimizer_steps": self.optimizer_steps,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "train_seconds": self.train_seconds,
            "data_seed": self.data_seed,
            "timestep_sampler": self.timestep_sampler.state_dict(),
            "rng": rng_states,
        }

    def restore(self, checkpoint: dict[str, Any], path: str | Path) -> None:
        """Load everything but the RNG states; a CheckpointError if it does not fit. Version-1
        checkpoints (no optimizer_steps, train_seconds) resume with optimizer_steps = step and 0 s;
        checkpoints without a timestep sampler's history start it afresh."""
        missing = [key for key in RESUME_KEYS if key not in checkpoint]
        if missing:
            raise CheckpointError(
                f"{path} has no training state ({', '.join(missing)}): it can be evaluated but not resumed"
            )
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.ema.module.load_state_dict(checkpoint["ema"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise CheckpointError(f"{path} does not fit this model: {first_line}") from None
        self.ema.n_averaged = checkpoint["ema_n_averaged"]
        if checkpoint["scaler"]:  # empty when saved without fp16
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.step, self.epoch, self.batch_in_epoch = (
            checkpoint["step"],
            checkpoint["epoch"],
            checkpoint["batch_in_epoch"],
        )
        self.optimizer_steps = checkpoint.get("optimizer_steps", self.step)
        self.train_seconds = checkpoint.get("train_seconds", 0.0)
        self.data_seed = checkpoint["data_seed"]
        self.timestep_sampler.load_state_dict(checkpoint.get("timestep_sampler", {}))
