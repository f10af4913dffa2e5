"""Helpers shared by the tests: tiny U-Net configs and flags, and tiny models trained for seconds."""

from __future__ import annotations

import contextlib
import csv
import io
import math
from pathlib import Path

import torch
from PIL import Image
from torch import nn

import vizu_MNIST
from ddpm.datasets.sources import load_images
from ddpm.plumbing.checkpointing import build_model, load_checkpoint
from diffusion import EDM_SIGMA_DATA, GaussianDiffusion

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
    "--eval-every",  # no quality measures (the tiny data has no test split): test_quality.py has them
    "0",
    "--device",
    "cpu",
]


def tiny_train_argv(data: Path, out_dir: Path, *extra: str) -> list[str]:
    """train_MNIST.py flags of a tiny run (8-channel U-Net, T = 20, 3 steps per epoch of data)."""
    return [*TINY_TRAIN_FLAGS, "--data-dir", str(data), "--out-dir", str(out_dir), *extra]


def straight_and_resumed(
    data: Path, tmp_path: Path, flags: list[str], stop_at: int
) -> tuple[dict, dict, dict]:
    """last.pt of a tiny run trained straight (tmp_path/straight), of the same run stopped after stop_at
    steps (tmp_path/split, read before it goes on), and of that run resumed to its end."""
    import train_MNIST

    train_MNIST.main(tiny_train_argv(data, tmp_path / "straight", *flags))
    train_MNIST.main(tiny_train_argv(data, tmp_path / "split", *flags, "--max-steps", str(stop_at)))
    halfway = load_checkpoint(tmp_path / "split" / "last.pt")
    train_MNIST.main(tiny_train_argv(data, tmp_path / "split", *flags, "--resume", "latest"))
    straight, resumed = (load_checkpoint(tmp_path / name / "last.pt") for name in ("straight", "split"))
    return straight, halfway, resumed


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


def run_eval(argv: list[str]) -> tuple[str, str]:
    """eval_MNIST.main(argv) in this process; returns its stdout and stderr."""
    import eval_MNIST

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        eval_MNIST.main(argv)
    return out.getvalue(), err.getvalue()


def run_vizu(checkpoint: Path, out_dir: Path, flags: str) -> None:
    """vizu_MNIST.main in-process on the CPU, with space-separated extra flags."""
    vizu_MNIST.main(
        ["--checkpoint", str(checkpoint), "--out-dir", str(out_dir), "--device", "cpu", *flags.split()]
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def gif_frame_count(path: Path) -> int:
    with Image.open(path) as gif:
        return gif.n_frames


# ----- the closed-form denoiser of Gaussian data (tests/test_diffusion.py, tests/test_editing.py) -------

MU, SIGMA = 0.1, 0.2  # every pixel of the Gaussian test data is N(MU, SIGMA^2)


class GaussianOracle(nn.Module):
    """The exact E[eps | x_t] (or E[v | x_t], or the F of Karras et al.'s preconditioning) when every
    pixel of x0 is N(mu, s^2) independently.

    edm, in the paper's own terms (Table 1), not diffusion.py's: the network sees c_in y with
    y = x_t / sqrt(alpha_bar), sigma^2 = (1 - alpha_bar) / alpha_bar, and answers
    F = (E[x0 | y] - c_skip y) / c_out."""

    def __init__(self, diffusion: GaussianDiffusion, mu: float, s: float):
        super().__init__()
        self.diffusion, self.mu, self.s = diffusion, mu, s

    def forward(self, x_t, t, labels=None):
        alpha_bar = self.diffusion.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
        x_t = x_t.double()
        if self.diffusion.prediction == "edm":
            sigma_squared, data_squared = (1 - alpha_bar) / alpha_bar, EDM_SIGMA_DATA**2
            x_t = x_t * (sigma_squared + data_squared).sqrt() * alpha_bar.sqrt()  # input / c_in = y
        eps = (
            (1 - alpha_bar).sqrt()
            * (x_t - alpha_bar.sqrt() * self.mu)
            / (alpha_bar * self.s**2 + 1 - alpha_bar)
        )
        if self.diffusion.prediction == "eps":
            return eps.float()
        x0 = (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        if self.diffusion.prediction == "v":
            return (alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0).float()
        c_skip = data_squared / (sigma_squared + data_squared)
        c_out = sigma_squared.sqrt() * EDM_SIGMA_DATA / (sigma_squared + data_squared).sqrt()
        return ((x0 - c_skip * x_t / alpha_bar.sqrt()) / c_out).float()


def oracle_affine(alpha_bar: float, mu: float, s: float) -> tuple[float, float, float, float]:
    """x0_hat = a0 x_t + b0 and eps_hat = ae x_t + be for the Gaussian oracle at alpha_bar."""
    ae = math.sqrt(1 - alpha_bar) / (alpha_bar * s**2 + 1 - alpha_bar)
    be = -ae * math.sqrt(alpha_bar) * mu
    a0 = (1 - math.sqrt(1 - alpha_bar) * ae) / math.sqrt(alpha_bar)
    b0 = -math.sqrt(1 - alpha_bar) * be / math.sqrt(alpha_bar)
    return a0, b0, ae, be


class CountingOracle(GaussianOracle):
    """The Gaussian oracle that records the timestep of each call."""

    def __init__(self, diffusion: GaussianDiffusion, mu: float, s: float):
        super().__init__(diffusion, mu, s)
        self.calls: list[int] = []

    def forward(self, x_t, t, labels=None):
        self.calls.append(int(t[0]))
        return super().forward(x_t, t, labels)


class LabelSpy(GaussianOracle):
    """The Gaussian oracle that records the labels of each call (null label 10)."""

    num_classes = 10

    def __init__(self, diffusion: GaussianDiffusion):
        super().__init__(diffusion, MU, SIGMA)
        self.seen: list[list[int]] = []

    def forward(self, x_t, t, labels=None):
        self.seen.append(labels.tolist())
        return super().forward(x_t, t)
