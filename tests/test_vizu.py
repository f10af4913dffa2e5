"""vizu_MNIST.py: every output file with the right number of rows and frames, the per-step metrics of the
closed-form optimal denoiser for Gaussian data, the t-sweep of a trained tiny model, and bad input.

All runs use the session's tiny checkpoint (T = 100, trained for a few seconds) and a handful of steps.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL_CONFIG, gif_frame_count, read_csv, run_vizu
from PIL import Image
from torch import nn

from ddpm.plumbing.checkpointing import CHECKPOINT_VERSION, build_model, save_checkpoint
from ddpm.plumbing.cli import run_cli
from ddpm.plumbing.messages import USER_ERROR_EXIT_CODE
from ddpm.plumbing.settings import SamplingSettings
from ddpm.visualisation.trajectories import Trajectory, decision_steps, reconstruction_trajectory
from diffusion import GaussianDiffusion

REPO = Path(__file__).resolve().parents[1]


def test_reconstruction_writes_every_file(tiny_checkpoint, tmp_path, mnist_5k_test):
    # ddim from t = 30 in 8 evaluations: 30, 26, 21, 17, 13, 9, 4, 0, then the finished image (t = -1)
    run_vizu(tiny_checkpoint, tmp_path, "--index 0,5,7 --t 30 --sampler ddim --steps 8")
    for name in ("original.png", "noised.png", "denoised.png", "strip.png", "curves.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.format == "PNG" and picture.width > 28
    rows = read_csv(tmp_path / "metrics.csv")
    assert len(rows) == 3 * (8 + 1)
    assert list(rows[0]) == [
        "step", "t", "image", "x0_change", "mse_xt", "ssim_xt", "mse_x0", "ssim_x0", "predicted_class",
        "p_final_class",
    ]  # fmt: skip
    decided = read_csv(tmp_path / "commitment.csv")
    assert [int(row["image"]) for row in decided] == [0, 5, 7]
    assert [int(row["label"]) for row in decided] == [int(label) for label in mnist_5k_test[1][[0, 5, 7]]]
    assert sorted({int(row["t"]) for row in rows}, reverse=True) == [30, 26, 21, 17, 13, 9, 4, 0, -1]
    assert {int(row["image"]) for row in rows} == {0, 5, 7}
    assert gif_frame_count(tmp_path / "reverse.gif") == 8 + 1


def test_ddpm_gif_keeps_at_most_gif_frames(tiny_checkpoint, tmp_path):
    run_vizu(tiny_checkpoint, tmp_path, "--num-images 2 --t 12 --gif-frames 5 --no-commitment")
    assert not (tmp_path / "commitment.csv").exists()
    assert len(read_csv(tmp_path / "metrics.csv")) == 2 * (12 + 1 + 1)  # DDPM: every step, then finished
    assert gif_frame_count(tmp_path / "reverse.gif") == 5


def test_dpm_solver_reconstruction_denoises(tiny_checkpoint, tmp_path):
    """DPM-Solver++(2M) from t = 20 in 5 evaluations: the finished images are closer to the originals
    than the noised ones were (SSIM of x_t at t = 20 against SSIM of the result)."""
    run_vizu(tiny_checkpoint, tmp_path, "--num-images 4 --t 20 --sampler dpm++2m --steps 5")
    rows = read_csv(tmp_path / "metrics.csv")
    assert len(rows) == 4 * (5 + 1)
    start = np.mean([float(row["ssim_xt"]) for row in rows if row["t"] == "20"])
    finished = np.mean([float(row["ssim_xt"]) for row in rows if row["t"] == "-1"])
    assert finished > start + 0.1


def test_t_sweep_table_csv_plot_and_small_t_beats_pure_noise(tiny_checkpoint, tmp_path, capsys):
    run_vizu(
        tiny_checkpoint, tmp_path, "--t-sweep --sweep-t 5,50,99 --num-images 8 --sampler ddim --steps 10"
    )
    rows = read_csv(tmp_path / "t_sweep.csv")
    assert [int(row["t"]) for row in rows] == [5, 50, 99]
    assert [int(row["evaluations"]) for row in rows] == [6, 10, 10]  # --steps is capped at t+1
    assert (tmp_path / "t_sweep.png").stat().st_size > 0
    assert "start t" in capsys.readouterr().out
    ssim_at = {int(row["t"]): float(row["ssim_mean"]) for row in rows}
    assert ssim_at[5] > ssim_at[99] + 0.3  # the trained tiny model: near-clean input keeps the digit


def test_generation_writes_every_file(tiny_checkpoint, tmp_path):
    run_vizu(tiny_checkpoint, tmp_path, "--generate --num-images 4 --sampler ddim --steps 6")
    for name in ("generated.png", "strip.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = read_csv(tmp_path / "metrics.csv")
    assert len(rows) == 4 * (6 + 1)
    assert list(rows[0]) == ["step", "t", "image", "x0_change", "predicted_class", "p_final_class"]
    assert int(rows[0]["t"]) == 99 and int(rows[-1]["t"]) == -1
    assert gif_frame_count(tmp_path / "reverse.gif") == 6 + 1
    assert (tmp_path / "commitment.png").stat().st_size > 0


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_torchrun_two_processes_generate_one_process_s_files(tiny_checkpoint, tmp_path, sampler):
    """torchrun, gloo, 2 CPU processes: each rank samples one of the two batches of 2 images (ddpm
    draws fresh noise at each of its 100 steps, each image from its own generator), rank 0 gathers them
    and writes the same files as one process with the same batches, bit for bit, and alone prints."""
    flags = f"--generate --num-images 4 --batch-size 2 --sampler {sampler}"
    flags += " --steps 2" if sampler == "ddim" else ""
    single, double = tmp_path / "single", tmp_path / "double"
    run_vizu(tiny_checkpoint, single, flags)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "vizu_MNIST.py"), "--checkpoint", str(tiny_checkpoint), "--out-dir", str(double),
               "--device", "cpu", *flags.split()]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1
    for name in ("metrics.csv", "commitment.csv", "generated.png", "strip.png"):
        assert (single / name).read_bytes() == (double / name).read_bytes(), name


def test_decided_step_is_where_the_predicted_class_stops_changing(tiny_checkpoint, tmp_path):
    """commitment.csv against metrics.csv: from decided_step on, x0-hat's class is the final one (with
    the probability of the finished image's top class at the end); one step earlier it is not."""
    run_vizu(tiny_checkpoint, tmp_path, "--generate --num-images 4 --sampler ddim --steps 6 --seed 3")
    per_step = read_csv(tmp_path / "metrics.csv")
    for row in read_csv(tmp_path / "commitment.csv"):
        image, final, step = int(row["image"]), int(row["final_class"]), int(row["decided_step"])
        classes = [int(r["predicted_class"]) for r in per_step if int(r["image"]) == image]
        assert classes[-1] == final and all(c == final for c in classes[step:])
        assert step == 0 or classes[step - 1] != final
        assert int(row["decided_t"]) == [int(r["t"]) for r in per_step if int(r["image"]) == image][step]
        assert row["label"] == ""  # unconditional: no label to compare with


def test_decision_steps_on_hand_made_classes():
    predicted = np.array([[1, 2, 3, 3], [1, 3, 3, 3], [2, 3, 3, 3], [2, 3, 4, 3]])  # [steps, images]
    trajectory = Trajectory([3, 2, 1, -1], None, None, {"predicted_class": predicted})
    assert decision_steps(trajectory).tolist() == [2, 1, 3, 0]


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory) -> Path:
    """An untrained class-conditional tiny U-Net: enough to run --label and --guidance.

    The U-Net zero-initialises its output layer; random weights there make the prediction move."""
    torch.manual_seed(0)
    config = {
        "model": dict(TINY_MODEL_CONFIG, num_classes=10),
        "diffusion": {"T": 100, "schedule": "cosine", "prediction": "eps"},
        "data": "mnist-5k",
    }
    model = build_model(config)
    for parameter in model.output.parameters():
        nn.init.normal_(parameter, std=0.1)
    path = tmp_path_factory.mktemp("conditional") / "conditional.pt"
    save_checkpoint({"version": CHECKPOINT_VERSION, "config": config, "model": model.state_dict()}, path)
    return path


def test_class_conditional_generation_with_guidance(conditional_checkpoint, tmp_path):
    run_vizu(
        conditional_checkpoint,
        tmp_path,
        "--generate --num-images 2 --label 3 --guidance 2.0 --sampler ddim --steps 4",
    )
    assert len(read_csv(tmp_path / "metrics.csv")) == 2 * (4 + 1)
    assert gif_frame_count(tmp_path / "reverse.gif") == 4 + 1


def test_guidance_list_generates_with_each_scale_and_scores_the_labels(
    conditional_checkpoint, tmp_path, capsys
):
    run_vizu(
        conditional_checkpoint, tmp_path, "--generate --num-images 4 --guidance 1,2 --sampler ddim --steps 3"
    )
    for guidance in ("1", "2"):
        for name in ("generated", "commitment", "strip"):
            assert (tmp_path / f"{name}_guidance{guidance}.png").stat().st_size > 0
        assert len(read_csv(tmp_path / f"metrics_guidance{guidance}.csv")) == 4 * (3 + 1)
    rows = read_csv(tmp_path / "commitment.csv")
    assert [(row["guidance"], row["label"]) for row in rows] == [
        (g, str(i)) for g in ("1.0", "2.0") for i in range(4)
    ]
    accuracies = [
        line for line in capsys.readouterr().out.splitlines() if "classified as their label" in line
    ]
    assert len(accuracies) == 2


class GaussianOptimalDenoiser(nn.Module):
    """The exact E[eps | x_t] when every pixel of x0 is independently N(mu, std^2).

    x_t = sqrt(ab) x0 + sqrt(1 - ab) eps is jointly Gaussian with eps: Cov(eps, x_t) = sqrt(1 - ab) and
    Var(x_t) = ab std^2 + 1 - ab, so E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab std^2 + 1 - ab).
    """

    def __init__(self, diffusion: GaussianDiffusion, mu: torch.Tensor, std: float):
        super().__init__()
        self.diffusion, self.mu, self.std = diffusion, mu, std

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        alpha_bar = self.diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (
            (1 - alpha_bar).sqrt()
            * (x - alpha_bar.sqrt() * self.mu)
            / (alpha_bar * self.std**2 + 1 - alpha_bar)
        )


def test_optimal_gaussian_denoiser_trajectory_follows_closed_form():
    """With the optimal denoiser the recorded curves follow closed forms.

    x_t approaches the data, so its MSE falls towards the end. The first x0-hat is the Bayes estimate
    E[x0 | x_start], whose per-pixel MSE is the posterior variance
    P(t) = std^2 (1 - ab) / (ab std^2 + 1 - ab).
    Later x0-hats estimate the sample the chain is heading to, an independent posterior draw, so their
    MSE against the original is 2 P(start) - P(t): it rises from P(start) to 2 P(start) and never falls
    below the Bayes bound. Values are on the [0, 1] scale (divide by 4). Tolerance: 10%, measured within
    2% before the last few steps and 7% at the finished image (DDPM's reverse variance is beta_tilde,
    smaller than the exact reverse of Gaussian data).
    """
    torch.manual_seed(0)
    diffusion, std, start = GaussianDiffusion(T=100), 0.2, 99
    mu = torch.linspace(-0.3, 0.3, 28).expand(1, 1, 28, 28)  # within [-1, 1] by 3.5 std: no clipping
    originals = mu + std * torch.randn(16, 1, 28, 28)
    model = GaussianOptimalDenoiser(diffusion, mu, std)
    generator = torch.Generator().manual_seed(0)
    trajectory = reconstruction_trajectory(
        model, diffusion, originals, start, SamplingSettings("ddpm"), generator
    )

    mse_xt = trajectory.metrics["mse_xt"].mean(1)
    assert mse_xt[-1] < 0.3 * mse_xt[0]
    assert mse_xt[-len(mse_xt) // 4 :].max() < mse_xt[: len(mse_xt) // 4].min()

    alpha_bar = diffusion.alphas_cumprod.double().numpy()
    posterior_variance = std**2 * (1 - alpha_bar) / (alpha_bar * std**2 + 1 - alpha_bar) / 4
    ts = np.array(trajectory.timesteps)
    expected = 2 * posterior_variance[start] - np.where(ts >= 0, posterior_variance[np.maximum(ts, 0)], 0.0)
    mse_x0 = trajectory.metrics["mse_x0"].mean(1)
    np.testing.assert_allclose(mse_x0[0], posterior_variance[start], rtol=0.05)
    np.testing.assert_allclose(mse_x0, expected, rtol=0.10)
    assert mse_x0.min() > 0.95 * posterior_variance[start]


@pytest.fixture(scope="module")
def corrupt_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corrupt") / "corrupt.pt"
    path.write_bytes(b"not a checkpoint")
    return path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--t 100", "--t must be in [0, 99]"),
        ("--t -1", "--t must be in [0, 99]"),
        ("--t 30 --sampler ddim --steps 32", "steps must be in [1, 31]"),
        ("--t 30 --steps 32", "steps must be in [1, 31]"),
        ("--t-sweep --sweep-t 5,50 --steps 10", "steps must be in [1, 6]"),
        ("--t-sweep --sweep-t 5,100", "--sweep-t must be in [0, 99]"),
        ("--t 10 --index 1,x", "--index"),
        ("--t 10 --index 1000", "outside the test split [0, 999]"),
        ("--t 10 --label 3", "need a class-conditional checkpoint"),
        ("--generate --t-sweep", "separate modes"),
        ("--t 10 --guidance 1,2", "several --guidance values are for --generate"),
        ("--generate --guidance=-1", "argument --guidance: expected comma-separated numbers >= 0"),
        ("--checkpoint {corrupt}", "not a readable checkpoint"),
        ("--checkpoint {missing}", "no checkpoint file"),
        ("--out-dir {blocked}", "cannot create output folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tiny_checkpoint, corrupt_checkpoint, tmp_path, capsys, flags, message
):
    (tmp_path / "a_file").write_text("")
    flags = flags.format(
        corrupt=corrupt_checkpoint, missing=tmp_path / "missing.pt", blocked=tmp_path / "a_file/out"
    )
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: run_vizu(tiny_checkpoint, tmp_path, flags))  # later flags override earlier ones
    assert exit_info.value.code == USER_ERROR_EXIT_CODE
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and len(error.strip().splitlines()) == 1


def test_command_line_reports_a_missing_checkpoint_without_traceback(tmp_path):
    missing = tmp_path / "missing.pt"
    command = [sys.executable, "vizu_MNIST.py", "--checkpoint", str(missing), "--out-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == USER_ERROR_EXIT_CODE
    assert result.stderr.strip() == f"error: no checkpoint file at {missing}"


def test_no_ema_draws_with_the_raw_weights(tiny_checkpoint, tmp_path):
    """The tiny checkpoint's raw weights are broken (conftest): the final SSIM from t = 5 falls."""
    final_ssim = {}
    for flag in ("--ema", "--no-ema"):
        run_vizu(tiny_checkpoint, tmp_path / flag, f"{flag} --t 5 --num-images 4")
        rows = read_csv(tmp_path / flag / "metrics.csv")
        final_ssim[flag] = np.mean([float(row["ssim_x0"]) for row in rows if row["t"] == "-1"])
    assert final_ssim["--ema"] > final_ssim["--no-ema"] + 0.2
