"""The data sets on the real loading code: IDX files (round trip, the byte layout, broken files), the
MNIST-5k split, the one-line offline errors, a tiny CIFAR-10 archive in torchvision's pickle layout, a
folder of PNGs with two class sub-folders, IDX files of 20x20 images and a tiny CelebA folder, all
made here. Each trains a few steps, resumes, evaluates and draws at its own shape; broken data files
are one line naming the file before any training starts; the U-Net keeps any size.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_UNET_FLAGS
from PIL import Image

import eval_MNIST
import vizu_MNIST
from ddpm.datasets import sources
from ddpm.datasets.checks import DataUnavailableError
from ddpm.datasets.cifar import CIFAR_DIR
from ddpm.datasets.idx import read_idx, write_idx
from ddpm.datasets.sources import flips_by_default, load_images, load_pixels, random_hflip
from ddpm.evaluation import classifier
from ddpm.plumbing.checkpointing import build_model, image_shape, load_checkpoint
from ddpm.plumbing.cli import run_cli
from ddpm.plumbing.presets import training_job_from_flags
from model import UNet, count_parameters
from train_MNIST import main as train_main

REPO = Path(__file__).resolve().parents[1]


# ----- IDX files, MNIST-5k and the offline errors --------------------------------------------------


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


def test_idx_files_follow_the_published_byte_layout(tmp_path):
    """Files written by hand from the format's description (00 00, a type byte, the number of
    dimensions, each dimension as a big-endian uint32, then the values, big-endian) read back, and
    write_idx writes the same bytes for uint8."""
    dimensions = b"".join(size.to_bytes(4, "big") for size in (2, 3, 4))
    raw = bytes([0, 0, 0x08, 3]) + dimensions + bytes(range(24))  # 0x08: unsigned byte
    (tmp_path / "bytes").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "bytes"), np.arange(24).reshape(2, 3, 4))
    write_idx(tmp_path / "written", np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    assert (tmp_path / "written").read_bytes() == raw
    shorts = bytes([0, 0, 0x0B, 1, 0, 0, 0, 2]) + bytes([0xFF, 0xFE, 0x01, 0x2C])  # 0x0B: int16
    (tmp_path / "shorts").write_bytes(shorts)
    assert read_idx(tmp_path / "shorts").tolist() == [-2, 300]


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
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path)
    images, labels = load_images("fashion-mnist", "test")
    assert labels.tolist() == [3, 4] and images.min().item() == 1.0


def test_import_needs_no_network_or_gpu():
    code = "import model, diffusion, ddpm.datasets.sources, ddpm.plumbing.checkpointing; print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "ok", result.stderr


TINY_TRAINING = [*TINY_UNET_FLAGS, "--T", "10", "--batch-size", "4", "--log-every", "1", "--device", "cpu"]
CIFAR_PER_BATCH, CIFAR_TEST = 2, 4


def cifar_archive(root: Path) -> Path:
    """root/cifar-10-batches-py as torchvision extracts it: data_batch_1..5 (2 images each), test_batch
    (4) and batches.meta; image k of a batch is red k, green 100 + k, blue 200 + k everywhere."""
    folder = root / CIFAR_DIR
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for index, name in enumerate(names):
        count = CIFAR_TEST if name == "test_batch" else CIFAR_PER_BATCH
        planes = np.array([[k, 100 + k, 200 + k] for k in range(count)], np.uint8)  # [N, 3]
        data = np.repeat(planes, 1024, axis=1)  # each row: 1,024 red, then green, then blue values
        labels = [(index + k) % 10 for k in range(count)]
        batch = {
            "batch_label": name,
            "labels": labels,
            "data": data,
            "filenames": [f"{k}.png" for k in range(count)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    return folder


def png_folder(root: Path, per_class: int = 6, size: tuple[int, int] = (36, 40)) -> Path:
    """Two class sub-folders of colour PNGs (width x height = size): red discs and blue squares."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("discs", "squares")):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 40, (size[1], size[0], 3), dtype=np.uint8)
            pixels[10:26, 12:28, 2 - 2 * label] = 230
            Image.fromarray(pixels).save(root / name / f"{index:02d}.png")
    return root


def idx_folder(root: Path, side: int = 20, train: int = 8, test: int = 4) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        write_idx(
            root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, side, side), np.uint8)
        )
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count, dtype=np.uint8) % 10)
    return root


def celeba_folder(root: Path) -> Path:
    """celeba/img_align_celeba/*.jpg (178 wide, 218 tall, as CelebA's) and list_eval_partition.txt."""
    images = root / "celeba" / "img_align_celeba"
    images.mkdir(parents=True)
    lines = []
    for index, partition in enumerate([0, 0, 0, 0, 1, 2, 2]):
        name = f"{index + 1:06d}.jpg"
        Image.new("RGB", (178, 218), (10 * index, 120, 200)).save(images / name)
        lines.append(f"{name} {partition}")
    (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root / "celeba"


# ----- loaders ------------------------------------------------------------------------------------


def test_cifar_archive_loads_in_channel_order_through_data_dir_and_data_cifar10(tmp_path):
    cifar_archive(tmp_path)
    for options in ({"data_dir": tmp_path / CIFAR_DIR}, {"name": "cifar10", "root": tmp_path}):
        pixels, labels = load_pixels(split="train", **options)
        assert pixels.shape == (10, 3, 32, 32) and pixels.dtype == torch.uint8
        assert pixels[1, :, 5, 7].tolist() == [1, 101, 201]  # CHW from the R, G, B planes of each row
        assert labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    test_pixels, _ = load_pixels(split="test", data_dir=tmp_path)  # the torchvision root works too
    assert test_pixels.shape == (CIFAR_TEST, 3, 32, 32)
    grey, _ = load_pixels(split="test", data_dir=tmp_path, image_size=16, channels=1)
    # ITU-R 601-2 luma of (3, 103, 203): 0.299 * 3 + 0.587 * 103 + 0.114 * 203 = 84.5, rounded half up
    assert grey.shape == (CIFAR_TEST, 1, 16, 16) and grey[3].unique().tolist() == [85]


def test_offline_cifar10_and_celeba_say_in_one_line_how_to_get_them(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)
    monkeypatch.setattr("torchvision.datasets.CelebA", offline)
    with pytest.raises(
        DataUnavailableError, match="cifar-10-python.tar.gz.*--data-dir PATH/cifar-10-batches-py"
    ):
        load_pixels("cifar10", root=tmp_path)
    with pytest.raises(DataUnavailableError, match="img_align_celeba.zip.*--data-dir DIR"):
        load_pixels("celeba", root=tmp_path)


def test_celeba_folder_is_split_centre_cropped_to_64_and_flipped_by_default(tmp_path):
    folder = celeba_folder(tmp_path)
    train, labels = load_pixels(data_dir=folder, split="train")
    assert train.shape == (4, 3, 64, 64) and labels.tolist() == [0, 0, 0, 0]
    centre = train[2, :, 32, 32].int() - torch.tensor([20, 120, 200])
    assert centre.abs().max() <= 2  # a flat colour survives JPEG and the resize
    assert load_pixels("celeba", "test", root=tmp_path, image_size=16)[0].shape == (2, 3, 16, 16)
    assert flips_by_default("mnist", folder) and not flips_by_default("mnist", None)


def test_image_folder_classes_sizes_and_channels(tmp_path):
    folder = png_folder(tmp_path / "pngs", per_class=3)
    pixels, labels = load_pixels(data_dir=folder)
    assert pixels.shape == (6, 3, 40, 36) and labels.tolist() == [0, 0, 0, 1, 1, 1]  # first image's size
    square, _ = load_pixels(data_dir=folder, image_size=20, channels=1)
    assert square.shape == (6, 1, 20, 20)
    with pytest.raises(
        DataUnavailableError, match="--image-size: images of 5000x5000 pixels; this code takes"
    ):
        load_pixels(data_dir=folder, image_size=5000)
    grey = tmp_path / "grey"
    grey.mkdir()
    for index in range(2):
        Image.new("L", (12, 12), 50 + index).save(grey / f"{index}.png")
    assert load_pixels(data_dir=grey)[0].shape == (2, 1, 12, 12)  # grey files stay one channel


def test_random_hflip_mirrors_about_half_of_the_images():
    torch.manual_seed(0)
    images = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4).expand(1000, -1, -1, -1)
    flipped = random_hflip(images)
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    assert ((flipped == images).flatten(1).all(1) | mirrored).all()
    assert 430 < int(mirrored.sum()) < 570  # binomial(1000, 1/2): mean 500, std 15.8


@pytest.mark.parametrize("shape", [(1, 20, 20), (1, 28, 28), (3, 32, 32), (3, 21, 21), (1, 20, 24)])
def test_unet_keeps_any_image_size(shape):
    model = UNet(shape[0], 8, (1, 2, 2, 2), 1, (shape[1] // 2,), 0.0, None, shape[1])
    assert model(torch.randn(2, *shape), torch.tensor([0, 5])).shape == (2, *shape)


def test_cifar10_preset_is_ho_et_al_model():
    job = training_job_from_flags(["--preset", "cifar10"])
    assert job.data.data == "cifar10" and job.data.hflip and job.diffusion.schedule == "linear"
    assert job.model.channel_mult == (1, 2, 2, 2) and job.model.attn_resolutions == (16,)
    model = build_model({"model": job.model.unet_config(3, 32), "image_shape": [3, 32, 32]})
    assert count_parameters(model) == 35_746_307  # Ho et al.: 35.7M; diffusers' ddpm-cifar10-32 too


# ----- through the three scripts ------------------------------------------------------------------


def made_data(kind: str, root: Path) -> tuple[list[str], tuple[int, int, int]]:
    """The data flags of each kind and the image shape its checkpoint must record."""
    if kind == "cifar":
        return ["--data-dir", str(cifar_archive(root))], (3, 32, 32)
    if kind == "pngs":
        return ["--data-dir", str(png_folder(root / "pngs")), "--channels", "3", "--image-size", "16"], (
            3,
            16,
            16,
        )
    return ["--data-dir", str(idx_folder(root / "idx"))], (1, 20, 20)


@pytest.mark.parametrize("kind", ["cifar", "pngs", "idx"])
def test_train_resume_evaluate_and_draw_at_the_data_shape(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the classifier eval trains once goes to ./checkpoints
    monkeypatch.setattr(classifier, "MIN_STEPS", 10)  # its plumbing, not its accuracy, is tested here
    data_flags, shape = made_data(kind, tmp_path)
    run = ["--out-dir", str(tmp_path / "run"), *TINY_TRAINING, *data_flags]
    train_main([*run, "--max-steps", "2"])
    train_main([*run, "--max-steps", "3", "--resume", "latest"])
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["step"] == 3 and image_shape(checkpoint["config"]) == shape
    assert checkpoint["config"]["train"]["data"]["hflip"] == (kind == "cifar")

    metrics = "classifier,recon" if kind == "pngs" else "recon"
    report_path = tmp_path / "eval.json"
    eval_MNIST.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--num-samples", "4",
                     "--sampler", "ddim", "--steps", "2", "--metrics", metrics, "--num-recon", "2",
                     "--recon-t", "3,9", "--device", "cpu", "--json", str(report_path)])  # fmt: skip
    report = json.loads(report_path.read_text())
    assert set(report["metrics"]["reconstruction"]["per_t"]) == {"3", "9"}
    if kind == "pngs":  # two classes: a 3 x 16 x 16 classifier was trained for them
        assert report["provenance"]["feature_extractors"]["classifier"]["used"]
        assert (tmp_path / "checkpoints" / "classifier_idx-pngs_3x16x16.pt").is_file()

    vizu_MNIST.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--t", "5", "--num-images", "2",
                     "--gif-frames", "3", "--out-dir", str(tmp_path / "vizu")])  # fmt: skip
    with Image.open(tmp_path / "vizu" / "original.png") as original:
        assert original.mode == ("RGB" if shape[0] == 3 else "L")
        # two images side by side, 2 px padding, upscaled 2x
        assert original.size == (2 * (2 * (shape[2] + 2) + 2), 2 * (shape[1] + 2 + 2))


# ----- broken data files: one line naming the file, before any training ---------------------------


def broken_idx(root: Path, case: str) -> str:
    """Write an IDX folder broken in one way; return the file name the error must name."""
    idx_folder(root)
    images = root / "train-images-idx3-ubyte.gz"
    if case == "truncated":
        raw = gzip.decompress(images.read_bytes())
        images.write_bytes(gzip.compress(raw[:-7]))
    elif case == "wrong magic":
        images.write_bytes(gzip.compress(b"\x00\x01\x08\x03" + bytes(12)))
    elif case == "count mismatch":
        write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
        return "train-labels-idx1-ubyte.gz"
    elif case == "split sizes":
        write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((4, 24, 24), np.uint8))
        return "t10k-images-idx3-ubyte.gz"
    elif case == "not gzip":
        images.write_bytes(gzip.decompress(images.read_bytes()))
    elif case == "damaged gzip":
        images.write_bytes(images.read_bytes()[:40])
    elif case == "images too small":
        idx_folder(root, side=5)
        return str(root)
    elif case == "only test split":
        for path in root.glob("train-*"):
            path.unlink()
        return str(root)
    return images.name


BROKEN = {
    "truncated": "is truncated",
    "wrong magic": "wrong magic number",
    "count mismatch": "has 8 images but train-labels-idx1-ubyte.gz has 7 labels",
    "split sizes": "both splits must have one size",
    "not gzip": "is not a gzip file",
    "damaged gzip": "is a damaged gzip file",
    "only test split": "holds only the test split",
    "images too small": "images of 5x5 pixels; this code takes sides from 8",
}


def broken_other(root: Path, case: str) -> str:
    root.mkdir()
    if case == "images only test":
        png_folder(root / "test", per_class=1)
        return str(root)
    if case == "corrupt png":
        png_folder(root, per_class=2)
        (root / "discs" / "00.png").write_bytes(b"\x89PNG not really")  # the first file
        return "00.png"
    folder = cifar_archive(root)  # a batch whose pickle asks to run a program
    (folder / "data_batch_3").write_bytes(pickle.dumps(os.system))
    return "data_batch_3"


BROKEN_OTHER = {
    "images only test": "holds only the test split",
    "corrupt png": "is not a readable image",
    "cifar pickle asks for code": "is not a readable CIFAR-10 batch",
}


@pytest.mark.parametrize("case", [*BROKEN, *BROKEN_OTHER])
def test_broken_data_files_are_one_line_naming_the_file(case, tmp_path, capsys):
    data = tmp_path / "data"
    named = broken_idx(data, case) if case in BROKEN else broken_other(data, case)
    out_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train_main(["--data-dir", str(data), "--out-dir", str(out_dir), *TINY_TRAINING]))
    message = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(message) == 1 and message[0].startswith("error: ")
    assert (BROKEN | BROKEN_OTHER)[case] in message[0] and named in message[0]
    assert not list(out_dir.glob("*.pt"))  # nothing trained
