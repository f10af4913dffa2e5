"""Data sources: IDX round trip, the MNIST-5k split, and the one-line offline error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.datasets import sources as data_sources
from ddpm.plumbing.cli import run_cli
from ddpm.datasets.sources import DataUnavailableError, load_images, read_idx, write_idx

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip_through_a_data_dir(tmp_path, suffix):
    rng = np.random.default_rng(0)
    images = {
        split: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for split, n in (("train", 7), ("t10k", 3))
    }
    for prefix, array in images.items():
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", array)
        write_idx(
            tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(len(array), dtype=np.uint8) % 10
        )
    np.testing.assert_array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"), images["train"])
    test_images, test_labels = load_images(split="test", data_dir=tmp_path)
    assert test_images.shape == (3, 1, 28, 28) and test_labels.tolist() == [0, 1, 2]
    expected = torch.from_numpy(images["t10k"]).float().div(127.5).sub(1).unsqueeze(1)
    torch.testing.assert_close(test_images, expected)


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    write_idx(tmp_path / "x", np.zeros((4, 28, 28), np.uint8))
    (tmp_path / "y").write_bytes((tmp_path / "x").read_bytes()[:-10])
    with pytest.raises(DataUnavailableError, match="truncated"):
        read_idx(tmp_path / "y")


def test_missing_idx_files_name_what_is_missing(tmp_path):
    with pytest.raises(DataUnavailableError, match="train-images-idx3-ubyte"):
        load_images(data_dir=tmp_path)


def test_mnist_5k_split_is_stratified_disjoint_and_in_range():
    train_images, train_labels = load_images("mnist-5k", "train")
    test_images, test_labels = load_images("mnist-5k", "test")
    assert train_images.shape == (4000, 1, 28, 28) and test_images.shape == (1000, 1, 28, 28)
    assert train_images.dtype == torch.float32
    assert train_images.min().item() == -1.0 and train_images.max().item() == 1.0
    assert torch.bincount(train_labels).tolist() == [400] * 10
    assert torch.bincount(test_labels).tolist() == [100] * 10
    train_rows = {row.numpy().tobytes() for row in train_images.flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in test_images.flatten(1))
    # deterministic: a second load is identical
    torch.testing.assert_close(load_images("mnist-5k", "test")[0], test_images)


def test_offline_mnist_is_one_line_naming_the_ways_out(monkeypatch, tmp_path, capsys):
    class OfflineMNIST:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr("torchvision.datasets.MNIST", OfflineMNIST)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: load_images("mnist", "train", root=tmp_path))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    for way_out in ("--data mnist-5k", "--data-dir", "fashion-mnist"):
        assert way_out in message


def test_unknown_data_set_is_a_user_error():
    with pytest.raises(DataUnavailableError, match="unknown data set"):
        load_images("cifar")


def test_fashion_falls_back_to_debian_idx_files(monkeypatch, tmp_path):
    class OfflineFashion:
        def __init__(self, *args, **kwargs):
            raise OSError("no network")

    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.full((2, 28, 28), 255, np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.array([3, 4], np.uint8))
    monkeypatch.setattr("torchvision.datasets.FashionMNIST", OfflineFashion)
    monkeypatch.setattr(data_sources, "DEBIAN_FASHION_MNIST", tmp_path)
    images, labels = load_images("fashion-mnist", "test")
    assert labels.tolist() == [3, 4] and images.min().item() == 1.0


def test_import_needs_no_network_or_gpu():
    code = "import model, diffusion, ddpm.datasets.sources, ddpm.plumbing.checkpointing; print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "ok", result.stderr
