"""Each training flag changes what it should, a short run's loss falls, the ranks of a step get
disjoint images, the readers and metrics agree with hand-computed values, and checkpoint errors are
one line. Tiny U-Net, T = 20, the first 48 MNIST-5k digits (3 batches of 16 per epoch)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_UNET_FLAGS

from ddpm.evaluation import image_metrics
from ddpm.plumbing.checkpointing import CheckpointError, build_model, latest_checkpoint, load_checkpoint, load_for_inference
from ddpm.plumbing.checkpointing import save_checkpoint as write_checkpoint
from ddpm.datasets.sources import load_images, write_idx
from diffusion import GaussianDiffusion
from ddpm.plumbing.runtime import seed_everything
from train_MNIST import main
from ddpm.training.trainer import Processes, drop_labels, epoch_batches, lr_factor

TINY_IMAGES, BATCH, STEPS_PER_EPOCH = 48, 16, 3
TINY_RUN = [*TINY_UNET_FLAGS, "--T", "20", "--batch-size", str(BATCH), "--log-every", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    images, labels = load_images("mnist-5k", "train")
    folder = tmp_path_factory.mktemp("flags_idx")
    write_idx(folder / "train-images-idx3-ubyte", image_metrics.to_uint8(images[:TINY_IMAGES])[:, 0].numpy())
    write_idx(folder / "train-labels-idx1-ubyte", labels[:TINY_IMAGES].numpy().astype(np.uint8))
    return folder


def run(tiny_data: Path, out_dir: Path, *flags: str) -> dict:
    main([*TINY_RUN, "--data-dir", str(tiny_data), "--out-dir", str(out_dir), *flags])
    return load_checkpoint(out_dir / "last.pt")


def logged(out_dir: Path, column: str) -> list[float]:
    with (out_dir / "train_log.csv").open(newline="") as log_file:
        return [float(row[column]) for row in csv.DictReader(log_file)]


def test_a_short_run_lowers_the_loss(tiny_data, tmp_path):
    run(tiny_data, tmp_path, "--epochs", "8", "--lr", "3e-3", "--warmup-steps", "0", "--prediction", "v")
    losses = logged(tmp_path, "loss")
    assert len(losses) == 24 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_logged_learning_rate_follows_the_schedule(tiny_data, tmp_path, schedule):
    """Step k (1-based) trains at lr x lr_factor(k - 1): a linear warm-up over 2 steps, then 1 or a
    cosine that reaches 0 after --epochs x 3 steps; the log keeps 4 significant digits."""
    run(
        tiny_data, tmp_path, "--epochs", "3", "--warmup-steps", "2", "--lr", "1e-3", "--lr-schedule", schedule
    )
    expected = [1e-3 * lr_factor(k, 2, (k - 2) / (9 - 2), schedule) for k in range(9)]
    assert expected[:2] == [5e-4, 1e-3] and (schedule == "constant" or expected[-1] < 1e-4)
    np.testing.assert_allclose(logged(tmp_path, "lr"), expected, rtol=1e-3)


def test_linear_schedule_reaches_the_checkpoint(tiny_data, tmp_path):
    checkpoint = run(tiny_data, tmp_path, "--max-steps", "1", "--schedule", "linear")
    diffusion = GaussianDiffusion(**checkpoint["config"]["diffusion"])
    scale = 1000 / 20  # make_betas keeps alpha_bar_T of T = 1000 for other T
    torch.testing.assert_close(
        diffusion.betas, torch.linspace(scale * 1e-4, scale * 0.02, 20), rtol=1e-5, atol=0
    )


def test_weight_decay_is_decoupled(tiny_data, tmp_path):
    """AdamW's first step: p1 = p0 (1 - lr wd) - lr u with u the same Adam update in both runs (same
    weights, data and noise), so the two runs' weights differ by exactly -lr wd p0."""
    flags = ["--max-steps", "1", "--warmup-steps", "0", "--lr", "1e-2"]
    plain = run(tiny_data, tmp_path / "plain", *flags)["model"]
    decayed = run(tiny_data, tmp_path / "decayed", *flags, "--weight-decay", "0.5")["model"]
    seed_everything(0)
    initial = build_model(load_checkpoint(tmp_path / "plain" / "last.pt")["config"]).state_dict()
    for key, value in initial.items():
        torch.testing.assert_close(decayed[key] - plain[key], -1e-2 * 0.5 * value, rtol=0, atol=2e-7)


def test_min_snr_weights_lower_the_first_loss(tiny_data, tmp_path):
    """With the same draws, min(SNR, gamma) / SNR <= 1 weighs every example down (eps-prediction)."""
    run(tiny_data, tmp_path / "plain", "--max-steps", "1")
    run(tiny_data, tmp_path / "weighted", "--max-steps", "1", "--min-snr-gamma", "0.05")
    assert logged(tmp_path / "weighted", "loss")[0] < 0.9 * logged(tmp_path / "plain", "loss")[0]


def test_label_dropout_replaces_labels_with_the_null_label_at_its_rate():
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (200_000,))
    dropped = drop_labels(labels, 0.3)
    null = dropped == 10
    assert torch.equal(dropped[~null], labels[~null])
    assert null.float().mean().item() == pytest.approx(0.3, abs=5 * math.sqrt(0.3 * 0.7 / len(labels)))


def test_channels_last_trains_nhwc_weights(tiny_data, tmp_path):
    nhwc = run(tiny_data, tmp_path / "nhwc", "--max-steps", "1", "--channels-last", "on")
    plain = run(tiny_data, tmp_path / "plain", "--max-steps", "1", "--channels-last", "off")
    key = "down_levels.0.blocks.0.in_layers.2.weight"  # 8 input channels: the two layouts differ
    assert nhwc["model"][key].is_contiguous(memory_format=torch.channels_last)
    assert not plain["model"][key].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc["model"][key], plain["model"][key], rtol=1e-4, atol=1e-6)


def test_fp16_autocast_keeps_the_grad_scaler_state(tiny_data, tmp_path):
    checkpoint = run(tiny_data, tmp_path, "--max-steps", "2", "--amp", "fp16")
    assert checkpoint["scaler"]["scale"] > 0 and checkpoint["config"]["train"]["runtime"]["amp"] == "fp16"
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())


def test_ranks_get_disjoint_shares_of_each_step():
    shares = [
        epoch_batches(100, 8, seed=3, processes=Processes(rank, 3, torch.device("cpu"))) for rank in range(3)
    ]
    assert all(share.shape == (4, 8) for share in shares)  # 100 // (8 x 3) steps, the rest dropped
    for step in range(4):
        images = torch.cat([share[step] for share in shares])
        assert len(set(images.tolist())) == 24
    assert len(set(torch.cat(shares).flatten().tolist())) == 96


# ----- readers, metrics and checkpoint errors ------------------------------------------------------


def test_mnist_reader_reads_torchvision_raw_files(tmp_path):
    """torchvision's MNIST reads data/MNIST/raw/*-ubyte and downloads nothing when they are there."""
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    pixels = {
        "train": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
    }
    for prefix, array in pixels.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", array)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(len(array), dtype=np.uint8))
    images, labels = load_images("mnist", "test", root=tmp_path)
    assert labels.tolist() == [0, 1, 2]
    assert torch.equal(image_metrics.to_uint8(images)[:, 0], torch.from_numpy(pixels["t10k"]))


def test_reconstruction_metrics_equal_hand_computed_values():
    """Black (-1) against mid-grey (0): MSE (0.5)^2 = 0.25 on [0, 1]; PSNR 10 log10(4) = 6.0206 dB;
    SSIM of two constant images is the luminance term alone, (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    with C1 = (0.01 x data_range)^2 = 1e-4: 1e-4 / 0.2501. Identical images: 0, 120 dB (the cap), 1."""
    black, grey = torch.full((2, 1, 8, 8), -1.0), torch.zeros(2, 1, 8, 8)
    scores = image_metrics.reconstruction_metrics(black, grey)
    np.testing.assert_allclose(scores["mse"], 0.25)
    np.testing.assert_allclose(scores["psnr"], 10 * math.log10(4))
    np.testing.assert_allclose(scores["ssim"], 1e-4 / 0.2501, rtol=1e-6)
    same = image_metrics.reconstruction_metrics(grey, grey)
    assert (
        same["mse"].tolist() == [0, 0]
        and same["psnr"].tolist() == [120, 120]
        and same["ssim"].tolist() == [1, 1]
    )


def test_checkpoint_error_paths_are_one_line(tmp_path, tiny_checkpoint):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this repo"):
        load_checkpoint(tmp_path / "list.pt")
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["config"]["model"]["model_channels"] = 24
    write_checkpoint(checkpoint, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not match this code's model: Error") as error:
        load_for_inference(tmp_path / "other.pt", torch.device("cpu"))
    assert len(str(error.value).splitlines()) == 1


def test_latest_checkpoint_falls_back_to_the_highest_epoch(tmp_path):
    for name in ("mnist_epoch_05.pt", "mnist_epoch_20.pt", "mnist_epoch_100.pt", "notes.pt"):
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "mnist_epoch_100.pt"
    (tmp_path / "last.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "last.pt"
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        latest_checkpoint(tmp_path / "empty")
