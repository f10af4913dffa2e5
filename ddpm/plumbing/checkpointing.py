"""Checkpoints: one dict of tensors and plain values, written atomically, read with weights_only.

A checkpoint holds (at least) `version`, `config` and the U-Net's weights under `model` and `ema`
(plain state dicts of the unwrapped network, same keys). `config["model"]` rebuilds the UNet,
`config["diffusion"]` the GaussianDiffusion and `config["image_shape"]` ([C, H, W]) is the shape the
samplers draw, so eval and vizu never need the training flags. The trainer adds the optimizer, the
grad scaler, the position in the run and the RNG states for resuming (training_state.py).

Format versions: 1 (no image shape: read as 1 x 28 x 28, the LR scheduler's state saved) and 2 (this
code). A checkpoint without a version is read as version 1; a newer one is refused in one line.

A training run writes last.pt and <data>_epoch_XX.pt (`data_name`: mnist for MNIST and MNIST-5k, the
data set's name, or the --data-dir folder's); `latest_checkpoint` takes last.pt, else the highest
epoch whatever the name, so older runs' mnist_epoch_XX.pt still resume and evaluate.

Example:
    model, diffusion, checkpoint = load_for_inference("checkpoints/last.pt", device, use_ema=True)
"""

from __future__ import annotations

import glob
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ddpm.plumbing.messages import UserError, note
from ddpm.plumbing.output_files import atomic_write
from diffusion import GaussianDiffusion
from model import UNet

CHECKPOINT_VERSION = 2
LEGACY_VERSION = 1  # what a checkpoint without a "version" key is read as
LEGACY_IMAGE_SHAPE = (1, 28, 28)  # version-1 checkpoints recorded no shape: they are all MNIST
DEFAULT_CHECKPOINT_DIR = Path("checkpoints")
DEMO_CHECKPOINT = Path(__file__).resolve().parents[2] / "weights" / "demo_mnist5k.pt"  # shipped with the repo
DEMO_CHECKPOINT_SHA256 = "a6c6f6fc33cb9916c1e54da3fe8cf6b135c4db9dc401eb1645571de7bd07665b"
DEMO_NAME = "demo"
LAST_NAME = "last.pt"
GLOB_CHARACTERS = "*?["
# <data>_epoch_XX.pt: mnist_epoch_05.pt, cifar10_epoch_12.pt, my-pngs_epoch_100.pt
EPOCH_PATTERN = re.compile(r"^(?P<data>.+)_epoch_(?P<epoch>\d+)\.pt$")
MNIST_NAMES = ("mnist", "mnist-5k")  # both MNIST digits: their epoch checkpoints are mnist_epoch_XX.pt
UNSAFE_NAME_CHARACTERS = re.compile(r"[^\w.-]+")  # in a --data-dir folder's name: become "-"
REQUIRED_KEYS = ("config",)  # dicts; and weights: "model", "ema" or both
CONFIG_KEYS = ("model", "diffusion")  # what rebuilds the U-Net and the diffusion
INFERENCE_KEYS = ("version", "config", "ema", "step", "epoch")  # what export_for_inference keeps
READ_ERRORS = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError)


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write state to path atomically (output_files.atomic_write: temp file, fsync, os.replace).

    An interruption or a failing disk at any point leaves the old file or the new one, never half of
    one; the failure is an OutputError naming the file and the error.
    """
    with atomic_write(path) as temp:
        torch.save(state, temp)


def read_torch_file(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    what: str = "checkpoint",
    error_class: type[UserError] = CheckpointError,
) -> Any:
    """torch.load(path, weights_only=True); a missing or unreadable file is a one-line error_class."""
    path = Path(path)
    if not path.is_file():
        raise error_class(f"no {what} file at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except READ_ERRORS as error:
        raise error_class(
            f"{path} is not a readable {what} (corrupt, truncated or foreign: {type(error).__name__})"
        ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with torch.load(weights_only=True); a CheckpointError says what is wrong:
    not a dict, a newer format version, or which key this code needs is missing."""
    checkpoint = read_torch_file(path, map_location)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a checkpoint of this repo (not a dict)")
    version = checkpoint.setdefault("version", LEGACY_VERSION)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version}; this code reads versions up to {CHECKPOINT_VERSION} "
            "(update the repo)"
        )
    missing = [key for key in REQUIRED_KEYS if not isinstance(checkpoint.get(key), dict)]
    if "model" not in checkpoint and "ema" not in checkpoint:
        missing.append("model or ema weights")
    config = checkpoint.get("config")
    missing += [f"config[{key!r}]" for key in CONFIG_KEYS if isinstance(config, dict) and key not in config]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this repo (no {', '.join(missing)})")
    return checkpoint


def image_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) of the images a checkpoint's model draws; 1 x 28 x 28 if unrecorded."""
    return tuple(config.get("image_shape", LEGACY_IMAGE_SHAPE))


def data_source(config: dict[str, Any]) -> tuple[str, str | None]:
    """(data set name, IDX folder or None) that a checkpoint was trained on."""
    return config.get("data") or "mnist", config.get("data_dir")


def data_name(data: str, data_dir: str | None) -> str:
    """What epoch checkpoints are named after: the --data-dir folder's name (characters other than
    letters, digits, '.', '_' and '-' replaced by '-'), else the data set's; mnist-5k is MNIST: mnist."""
    if data_dir is not None:
        folder = UNSAFE_NAME_CHARACTERS.sub("-", Path(os.path.abspath(data_dir)).name)
        if folder:
            return folder
    return "mnist" if data in MNIST_NAMES else data


def epoch_checkpoint_name(epoch: int, data: str) -> str:
    """<data>_epoch_XX.pt, e.g. mnist_epoch_05.pt, cifar10_epoch_12.pt (data: what data_name gives)."""
    return f"{data}_epoch_{epoch:02d}.pt"


def latest_checkpoint(directory: str | Path = DEFAULT_CHECKPOINT_DIR) -> Path:
    """last.pt in directory if present, else the <data>_epoch_XX.pt with the highest epoch, whatever
    data it names (mnist_epoch_XX.pt of older runs too)."""
    directory = Path(directory)
    if (directory / LAST_NAME).is_file():
        return directory / LAST_NAME
    epochs = [
        (int(match["epoch"]), path)
        for path in directory.glob("*_epoch_*.pt")
        if (match := EPOCH_PATTERN.match(path.name))
    ]
    if not epochs:
        raise CheckpointError(
            f"no checkpoint in {directory}/: train one with `python train_MNIST.py` or pass --checkpoint PATH"
        )
    return max(epochs)[1]


def resolve_checkpoint(name: str | None, directory: str | Path = DEFAULT_CHECKPOINT_DIR) -> Path:
    """What --checkpoint names: "demo" is the shipped demo model; None is the newest checkpoint in
    directory, else (with one line saying so) the demo model; anything else a path."""
    demo = Path(os.path.relpath(DEMO_CHECKPOINT))  # as the user would write it, in reports and notes
    if name == DEMO_NAME:
        return demo
    if name is not None:
        return Path(name)
    try:
        return latest_checkpoint(directory)
    except CheckpointError:
        if not DEMO_CHECKPOINT.is_file():
            raise
    note(f"no checkpoint in {directory}/: using the demo model {demo}")
    return demo


def resolve_checkpoints(names: str | None, directory: str | Path = DEFAULT_CHECKPOINT_DIR) -> list[Path]:
    """What a --checkpoint that may name several means: comma-separated entries, each resolved by
    resolve_checkpoint ("demo", a path) or, when it holds * ? or [, a glob pattern (its matches in
    name order; none is an error). None: the one checkpoint resolve_checkpoint picks."""
    if names is None:
        return [resolve_checkpoint(None, directory)]
    paths = []
    for entry in (part.strip() for part in names.split(",") if part.strip()):
        if not any(character in entry for character in GLOB_CHARACTERS):
            paths.append(resolve_checkpoint(entry, directory))
            continue
        matches = sorted(Path(match) for match in glob.glob(entry))
        if not matches:
            raise CheckpointError(f"no checkpoint file matches {entry}")
        paths += matches
    if not paths:
        raise CheckpointError("--checkpoint names no checkpoint")
    return list(dict.fromkeys(paths))


def build_model(config: dict[str, Any]) -> UNet:
    """The UNet described by config["model"], for images of config's image_shape, with the output
    channels of config["diffusion"] (2C with learn_sigma). A config without scale_shift_norm was written
    before it existed: its U-Net adds the embedding before the norm; one without learn_sigma, before
    that: its U-Net outputs C channels (a fixed variance)."""
    channels, height, _ = image_shape(config)
    learn_sigma = config.get("diffusion", {}).get("learn_sigma", False)
    model_config = {
        "in_channels": channels,
        "image_size": height,
        "scale_shift_norm": False,
        "out_channels": 2 * channels if learn_sigma else channels,
        **config["model"],
    }
    for key in ("channel_mult", "attention_resolutions"):
        model_config[key] = tuple(model_config[key])
    return UNet(**model_config)


def weights_used(checkpoint: dict[str, Any], use_ema: bool) -> str:
    """ "ema" or "model": the weights load_for_inference takes (the other ones when only they exist)."""
    return "ema" if (use_ema or "model" not in checkpoint) and "ema" in checkpoint else "model"


def load_for_inference(
    path: str | Path, device: torch.device, use_ema: bool = True
) -> tuple[UNet, GaussianDiffusion, dict[str, Any]]:
    """Rebuild the UNet (EMA weights by default) and the diffusion process from a checkpoint.

    Returns (model in eval mode on device, diffusion on device, the checkpoint dict).
    """
    checkpoint = load_checkpoint(path)
    config = checkpoint["config"]
    weights_key = weights_used(checkpoint, use_ema)
    try:
        model = build_model(config)
        model.load_state_dict(checkpoint[weights_key])
        diffusion = GaussianDiffusion(**config["diffusion"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} does not match this code's model: {first_line}") from None
    return model.to(device).eval(), diffusion.to(device), checkpoint


def export_for_inference(source: str | Path, target: str | Path) -> None:
    """Write the EMA weights, config and position of a training checkpoint to `target`: a file for
    eval and vizu only (no optimizer, no raw weights), as the shipped demo model is."""
    checkpoint = load_checkpoint(source)
    if "ema" not in checkpoint:
        raise CheckpointError(f"{source} has no EMA weights to export")
    save_checkpoint({key: checkpoint[key] for key in INFERENCE_KEYS if key in checkpoint}, target)
