"""Checkpoints: one dict of tensors and plain values, written atomically, read with weights_only.

A checkpoint holds (at least) `version`, `config` and the U-Net's weights under `model` and `ema`
(plain state dicts of the unwrapped network, same keys). `config["model"]` rebuilds the UNet and
`config["diffusion"]` the GaussianDiffusion, so eval and vizu never need the training flags.
The trainer adds optimizer, scaler, scheduler, step, epoch and RNG states for resuming.

Example:
    model, diffusion, checkpoint = load_for_inference("checkpoints/last.pt", device, use_ema=True)
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from cli import UserError
from diffusion import GaussianDiffusion
from model import UNet

CHECKPOINT_VERSION = 1
DEFAULT_CHECKPOINT_DIR = Path("checkpoints")
EPOCH_PATTERN = re.compile(r"mnist_epoch_(\d+)\.pt$")
REQUIRED_KEYS = ("version", "config", "model")


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write state to path atomically: a temp file in the same folder, fsync, then os.replace.

    An interruption at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temp_name, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual mode
        with os.fdopen(handle, "wb") as temp_file:
            torch.save(state, temp_file)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def read_torch_file(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    what: str = "checkpoint",
    error_class: type[UserError] | None = None,
) -> Any:
    """torch.load(path, weights_only=True); a missing or unreadable file is a one-line error_class."""
    error_class = error_class or CheckpointError
    path = Path(path)
    if not path.is_file():
        raise error_class(f"no {what} file at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        reason = type(error).__name__
        raise error_class(
            f"{path} is not a readable {what} (corrupt, truncated or foreign: {reason})"
        ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with torch.load(weights_only=True); a CheckpointError says what is wrong."""
    checkpoint = read_torch_file(path, map_location)
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in REQUIRED_KEYS):
        raise CheckpointError(
            f"{path} is not a checkpoint of this repo (needs keys {', '.join(REQUIRED_KEYS)})"
        )
    if checkpoint["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has format version {checkpoint['version']}; this code reads up to {CHECKPOINT_VERSION}"
        )
    return checkpoint


def epoch_checkpoint_name(epoch: int) -> str:
    return f"mnist_epoch_{epoch:02d}.pt"


def latest_checkpoint(directory: str | Path = DEFAULT_CHECKPOINT_DIR) -> Path:
    """last.pt in directory if present, else the mnist_epoch_XX.pt with the highest epoch."""
    directory = Path(directory)
    if (directory / "last.pt").is_file():
        return directory / "last.pt"
    epochs = [
        (int(m.group(1)), p)
        for p in directory.glob("mnist_epoch_*.pt")
        if (m := EPOCH_PATTERN.search(p.name))
    ]
    if not epochs:
        raise CheckpointError(
            f"no checkpoint in {directory}/: train one with `python train_MNIST.py` or pass --checkpoint PATH"
        )
    return max(epochs)[1]


def build_model(config: dict[str, Any]) -> UNet:
    """The UNet described by config["model"]."""
    model_config = dict(config["model"])
    for key in ("channel_mult", "attention_resolutions"):
        model_config[key] = tuple(model_config[key])
    return UNet(**model_config)


def load_for_inference(
    path: str | Path, device: torch.device, use_ema: bool = True
) -> tuple[UNet, GaussianDiffusion, dict[str, Any]]:
    """Rebuild the UNet (EMA weights by default) and the diffusion process from a checkpoint.

    Returns (model in eval mode on device, diffusion on device, the checkpoint dict).
    """
    checkpoint = load_checkpoint(path)
    config = checkpoint["config"]
    weights_key = "ema" if use_ema and "ema" in checkpoint else "model"
    try:
        model = build_model(config)
        model.load_state_dict(checkpoint[weights_key])
        diffusion = GaussianDiffusion(**config["diffusion"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} does not match this code's model: {first_line}") from None
    return model.to(device).eval(), diffusion.to(device), checkpoint
