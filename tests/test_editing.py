"""Closed-form checks of diffusion.py's edits of real images: DDIM inversion (Song et al. 2021,
arXiv:2010.02502, section 4.3), RePaint inpainting (Lugmayr et al. 2022, arXiv:2201.09865) and the
spherical interpolation of latents, with the exact denoiser of Gaussian data; then vizu_MNIST.py's
--interpolate and --inpaint on the tiny checkpoints (files, round trips, the exact known region, bad
input), and --sampler heun's flags (--s-churn, start steps too small for it)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    MU,
    SIGMA,
    CountingOracle,
    GaussianOracle,
    LabelSpy,
    gif_frame_count,
    oracle_affine,
    read_csv,
    run_vizu,
)
from PIL import Image

from ddpm.datasets.sources import load_images
from ddpm.evaluation.image_metrics import mse
from ddpm.plumbing.checkpointing import load_for_inference
from ddpm.plumbing.cli import run_cli
from ddpm.plumbing.messages import USER_ERROR_EXIT_CODE, UserError
from ddpm.plumbing.settings import SamplingSettings
from ddpm.sampling import reconstruction_sweep
from ddpm.visualisation.inpainting import RepaintPlan
from ddpm.visualisation.interpolation import ddim_decode, interpolate, noise_latents
from ddpm.visualisation.masks import make_mask, region_mse
from ddpm.visualisation.pictures import GRID_SCALE
from ddpm.visualisation.trajectories import reconstruction_trajectory
from diffusion import GaussianDiffusion, repaint_schedule, slerp

# ----- DDIM inversion ------------------------------------------------------------------------------


def round_trip_error(diffusion: GaussianDiffusion, x0: torch.Tensor, steps: int) -> float:
    """Largest |x0 - decode(encode(x0))| with the same DDIM timesteps, nothing clipped."""
    oracle = GaussianOracle(diffusion, MU, SIGMA)
    x_T = diffusion.ddim_invert(oracle, x0, steps)
    back = diffusion.sample(oracle, x_start=x_T, sampler="ddim", steps=steps, eta=0.0, clip_x0=False)
    return (back - x0).abs().max().item()


def test_ddim_inversion_retraces_the_decoding_timesteps():
    """Encoding visits -1 (x_0), then DDIM's timesteps backwards; its yields are the decoding's,
    reversed, and both make `steps` model evaluations."""
    diffusion = GaussianDiffusion(T=100)
    oracle = CountingOracle(diffusion, MU, SIGMA)
    x0 = torch.full((2, 1, 4, 4), 0.3)
    encoding = list(diffusion.ddim_invert_progressive(oracle, x0, steps=5))
    encoder_calls, oracle.calls = oracle.calls, []
    decoding = list(diffusion.sample_progressive(oracle, x_start=encoding[-1].x_t, sampler="ddim", steps=5))
    assert [step.t for step in encoding] == [-1, 0, 25, 50, 74, 99] == [step.t for step in decoding][::-1]
    assert encoder_calls == [0, 0, 25, 50, 74] and oracle.calls == [99, 74, 50, 25, 0]
    assert torch.equal(encoding[0].x_t, x0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_inversion_round_trip_error_falls_as_one_over_steps(prediction):
    """x0 ~ N(MU, SIGMA^2) encoded to t = 999 and decoded with the same timesteps. Encoding (Euler up)
    and decoding (Euler down) are both first order, so the round trip's error falls as 1 / steps:
    steps x error stays within 20% of its value at 100 steps from 20 steps to 1000 (about 5.2 on
    this data: 0.24 at 20 steps, 0.052 at 100, 0.0053 at 1000); bounds tested: error(100) <
    error(10) / 6 and error(1000) < 0.006 (3% of the data's std)."""
    diffusion = GaussianDiffusion(T=1000, prediction=prediction)
    x0 = MU + SIGMA * torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    errors = {steps: round_trip_error(diffusion, x0, steps) for steps in (10, 20, 50, 100, 1000)}
    assert list(errors.values()) == sorted(errors.values(), reverse=True)
    assert errors[100] < errors[10] / 6 and errors[1000] < 0.006
    for steps in (20, 50, 1000):
        assert steps * errors[steps] == pytest.approx(100 * errors[100], rel=0.2)


def test_ddim_inversion_of_gaussian_data_is_the_ode_flow():
    """For Gaussian data the probability-flow ODE maps x_0 to x_T = sqrt(ab_T) (mu + (x_0 - mu)
    sqrt(s^2 + sigma_T^2) / s), sigma_T^2 = (1 - ab_T) / ab_T, a standard normal (DDIM section 4.3);
    with 1000 steps the encoding lands within 1% of it, and its std is 1 within 2%."""
    diffusion = GaussianDiffusion(T=1000)
    x0 = MU + SIGMA * torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x_T = diffusion.ddim_invert(GaussianOracle(diffusion, MU, SIGMA), x0, 1000)
    alpha_bar = diffusion.alphas_cumprod_float64[-1]
    sigma_T = math.sqrt((1 - alpha_bar) / alpha_bar)
    flow = math.sqrt(alpha_bar) * (MU + (x0.double() - MU) * math.sqrt(SIGMA**2 + sigma_T**2) / SIGMA)
    torch.testing.assert_close(x_T.double(), flow, rtol=0, atol=0.01 * flow.abs().max().item())
    assert x_T.double().std().item() == pytest.approx(1.0, rel=0.02)


# ----- RePaint ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("levels", "jump", "resamples"), [(250, 10, 10), (50, 10, 10), (47, 10, 3), (9, 10, 10)]
)
def test_repaint_schedule_closed_form(levels, jump, resamples):
    """From levels - 1 to -1 by moves of one level. With k = ceil(levels / jump) - 1 jump points
    (0, jump, ..., below levels - jump), each left resamples - 1 times by jump moves up: k jump
    (resamples - 1) moves up and levels + k jump (resamples - 1) moves down (model evaluations).
    The paper's T = 250, j = r = 10: 250 + 24 x 10 x 9 = 2410 evaluations."""
    schedule = repaint_schedule(levels, jump, resamples)
    moves = np.diff(schedule)
    k = math.ceil(levels / jump) - 1
    assert schedule[0] == levels - 1 and schedule[-1] == -1 and set(moves.tolist()) <= {-1, 1}
    assert (moves == 1).sum() == k * jump * (resamples - 1)
    assert (moves == -1).sum() == levels + k * jump * (resamples - 1)
    assert len(schedule) == 1 + levels + 2 * k * jump * (resamples - 1)
    if (levels, jump, resamples) == (250, 10, 10):
        assert (moves == -1).sum() == 2410
    rises = [i for i in range(1, len(moves)) if moves[i] == 1 and moves[i - 1] == -1]
    for i in rises:  # each jump starts at a jump point and climbs exactly `jump` levels
        assert schedule[i] % jump == 0 and schedule[i] < levels - jump
        assert (moves[i : i + jump] == 1).all() and (i + jump == len(moves) or moves[i + jump] == -1)
    assert sorted(schedule[i] for i in rises) == sorted(
        j for j in range(0, levels - jump, jump) for _ in range(resamples - 1)
    )


def test_repaint_schedule_without_resampling_is_the_plain_descent():
    assert repaint_schedule(20, 10, 1) == list(range(19, -2, -1))
    with pytest.raises(ValueError):
        repaint_schedule(20, 0, 10)


def propagate_repaint_unknown(alpha_bar: np.ndarray, schedule: list[int], mu: float, s: float):
    """Exact mean and std of a pixel RePaint generates when the denoiser is the per-pixel Gaussian
    oracle (the known pixels never reach it): from x ~ N(0, 1), each move down is DDPM's ancestral
    step with the posterior of eq. 7, each move up q(x_t | x_{t-1}) of eq. 2."""
    mean, var = 0.0, 1.0
    for t, t_next in zip(schedule[:-1], schedule[1:], strict=True):
        if t_next > t:  # eq. 2: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z
            beta = 1 - alpha_bar[t_next] / alpha_bar[t]
            mean, var = math.sqrt(1 - beta) * mean, (1 - beta) * var + beta
            continue
        a0, b0, _, _ = oracle_affine(alpha_bar[t], mu, s)
        if t == 0:
            mean, var = a0 * mean + b0, a0**2 * var
            continue
        prev, beta = alpha_bar[t - 1], 1 - alpha_bar[t] / alpha_bar[t - 1]
        coef1 = beta * math.sqrt(prev) / (1 - alpha_bar[t])  # eq. 7
        coef2 = (1 - prev) * math.sqrt(1 - beta) / (1 - alpha_bar[t])
        a, b = coef1 * a0 + coef2, coef1 * b0
        mean, var = a * mean + b, a**2 * var + beta * (1 - prev) / (1 - alpha_bar[t])
    return mean, math.sqrt(var)


def test_repaint_keeps_the_known_region_and_resamples_the_rest_exactly():
    """T = 50, j = r = 10 (410 evaluations): the result equals the input bit for bit where the mask
    is 1; elsewhere, pixel by pixel independent under the oracle, the samples' mean and std are the
    closed form's (5 standard errors over 64 x 392 pixels)."""
    diffusion = GaussianDiffusion(T=50)
    oracle = CountingOracle(diffusion, MU, SIGMA)
    x0 = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., :14] = 1
    run = list(
        diffusion.repaint_progressive(
            oracle, x0, mask, generator=torch.Generator().manual_seed(0), clip_x0=False
        )
    )
    result = run[-1].x_t
    assert run[-1].t == -1 and torch.equal(result[..., :14], x0[..., :14])
    schedule = repaint_schedule(50)
    assert len(oracle.calls) == len(run) - 1 == int((np.diff(schedule) == -1).sum()) == 50 + 4 * 10 * 9
    assert oracle.calls == [t for t, t_next in zip(schedule[:-1], schedule[1:], strict=True) if t_next < t]
    exact_mean, exact_std = propagate_repaint_unknown(
        diffusion.alphas_cumprod.double().numpy(), schedule, MU, SIGMA
    )
    unknown = result[..., 14:].double()
    n = unknown.numel()
    assert unknown.mean().item() == pytest.approx(exact_mean, abs=5 * exact_std / math.sqrt(n))
    assert unknown.std().item() == pytest.approx(exact_std, abs=5 * exact_std / math.sqrt(2 * n))


def test_repaint_on_fewer_levels_uses_ddim_spacing_and_keeps_the_known_region():
    """levels = 20 of T = 100: the chain moves between DDIM's 20 timesteps (99, 94, ..., 0); with the
    default clipping and a boolean mask the known region is still the input exactly."""
    diffusion = GaussianDiffusion(T=100)
    oracle = CountingOracle(diffusion, MU, SIGMA)
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.5
    result = diffusion.repaint(
        oracle, x0, mask, levels=20, jump_length=5, resamples=3, generator=torch.Generator()
    )
    assert torch.equal(result[mask], x0[mask])
    assert set(oracle.calls) == set(diffusion.timesteps("ddim", 20, 99))
    assert len(oracle.calls) == 20 + 3 * 5 * 2


# ----- labels and guidance -------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_inversion_and_repaint_pass_labels_and_guidance_to_every_evaluation(guidance):
    diffusion = GaussianDiffusion(T=30)
    labels, x0 = torch.tensor([2, 7]), torch.zeros(2, 1, 4, 4)
    expected = [2, 7] if guidance == 1.0 else [2, 7, 10, 10]
    spy = LabelSpy(diffusion)
    diffusion.ddim_invert(spy, x0, 6, labels=labels, guidance=guidance)
    assert spy.seen == [expected] * 6
    spy = LabelSpy(diffusion)
    diffusion.repaint(
        spy, x0, torch.ones(1, 1, 4, 4), jump_length=10, resamples=2, labels=labels, guidance=guidance
    )
    assert spy.seen == [expected] * (30 + 2 * 10 * 1)


# ----- spherical interpolation --------------------------------------------------------------------


def test_slerp_end_frames_are_the_inputs_exactly():
    generator = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(3, 1, 28, 28, generator=generator), torch.randn(3, 1, 28, 28, generator=generator)
    assert torch.equal(slerp(z0, z1, 0.0), z0) and torch.equal(slerp(z0, z1, 1.0), z1)
    frames = slerp(z0[:1], z1[:1], torch.linspace(0, 1, 5))  # one pair, five frames
    assert frames.shape == (5, 1, 28, 28) and torch.equal(frames[0], z0[0]) and torch.equal(frames[-1], z1[0])


def test_slerp_follows_the_great_circle_per_sample():
    """Orthogonal unit vectors: slerp(alpha) = cos(alpha pi/2) e0 + sin(alpha pi/2) e1, unit norm; each
    sample has its own angle, and a parallel pair (sin theta = 0) falls back to linear interpolation."""
    e0, e1 = torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    e0[:, 0, 0, 0] = 1
    e1[0, 0, 0, 1] = 1  # sample 0: orthogonal
    e1[1, 0, 0, 0] = 2  # sample 1: parallel, twice as long
    alpha = torch.tensor([0.3, 0.3], dtype=torch.float64)
    mid = slerp(e0, e1, alpha)
    expected = torch.zeros_like(mid)
    expected[0, 0, 0, :2] = torch.tensor([math.cos(0.3 * math.pi / 2), math.sin(0.3 * math.pi / 2)])
    expected[1, 0, 0, 0] = 0.7 + 0.3 * 2
    torch.testing.assert_close(mid, expected)


# ----- vizu_MNIST.py --interpolate and --inpaint, and --sampler heun, on the tiny checkpoint -------


def test_interpolate_writes_strip_gif_csv_and_its_end_frames_are_round_trips(tiny_checkpoint, tmp_path):
    """Test digits 0 and 5 (T = 100, 4 DDIM steps, 5 frames): the CSV's round-trip MSE of the end frames
    is that of decode(invert(x)) computed here on its own (up to the U-Net's float rounding, which
    depends on the batch: 5e-3 per pixel after 4 steps of the tiny model)."""
    run_vizu(tiny_checkpoint, tmp_path, "--interpolate --index 0,5 --steps 4 --frames 5")
    rows = read_csv(tmp_path / "interpolation.csv")
    assert [float(row["alpha"]) for row in rows] == [0, 0.25, 0.5, 0.75, 1]
    assert [row["roundtrip_mse"] != "" for row in rows] == [True, False, False, False, True]
    assert {(row["from"], row["to"]) for row in rows} == {("0", "5")}
    assert gif_frame_count(tmp_path / "interpolation.gif") == 5
    with Image.open(tmp_path / "interpolation.png") as strip:  # 1 row: digit, 5 frames, digit
        assert strip.size == (GRID_SCALE * (7 * 30 + 2), GRID_SCALE * 32)
    model, diffusion, _ = load_for_inference(tiny_checkpoint, torch.device("cpu"))
    images = load_images("mnist-5k", "test")[0][[0, 5]]
    alone = ddim_decode(model, diffusion, diffusion.ddim_invert(model, images, 4), 4, None, 1.0)
    written = [float(rows[frame]["roundtrip_mse"]) for frame in (0, -1)]
    np.testing.assert_allclose(written, mse(alone, images), rtol=0.02)


def test_interpolation_end_frames_equal_decode_of_the_inversion_exactly():
    """With the per-pixel Gaussian oracle (no float rounding that depends on the batch) frame 0 of each
    pair is decode(invert(x_a)) and the last frame decode(invert(x_b)), bit for bit; the label of a
    conditional model switches from the first digit's to the second's at alpha = 1/2."""
    diffusion = GaussianDiffusion(T=100)
    oracle = GaussianOracle(diffusion, MU, SIGMA)
    images = MU + SIGMA * torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    result = interpolate(
        oracle, diffusion, frames=4, steps=10, originals=images, labels=torch.tensor([3, 5, 8])
    )
    round_trips = ddim_decode(oracle, diffusion, diffusion.ddim_invert(oracle, images, 10), 10, None, 1.0)
    assert result.frames.shape == (2, 4, 1, 4, 4)
    assert torch.equal(result.frames[:, 0], round_trips[:2]) and torch.equal(
        result.frames[:, -1], round_trips[1:]
    )
    assert result.labels is not None and result.labels.tolist() == [[3, 3, 5, 5], [5, 5, 8, 8]]


def test_interpolate_from_noise_starts_at_each_seeds_noise(tiny_checkpoint, tmp_path):
    run_vizu(
        tiny_checkpoint, tmp_path, "--interpolate --from-noise --num-images 3 --steps 3 --frames 4 --seed 7"
    )
    rows = read_csv(tmp_path / "interpolation.csv")
    assert [(row["pair"], row["from"], row["to"]) for row in rows] == [("0", "7", "8")] * 4 + [
        ("1", "8", "9")
    ] * 4
    assert all(row["roundtrip_mse"] == "" for row in rows)
    latents = noise_latents(3, (1, 28, 28), 7, torch.device("cpu"))
    assert torch.equal(latents[1], torch.randn((1, 1, 28, 28), generator=torch.Generator().manual_seed(8))[0])


def test_interpolation_of_a_conditional_model_switches_the_label_halfway(
    trained_conditional_checkpoint, tmp_path
):
    run_vizu(trained_conditional_checkpoint, tmp_path, "--interpolate --index 0,1 --steps 3 --frames 4")
    labels = load_images("mnist-5k", "test")[1][[0, 1]].tolist()
    assert [int(row["label"]) for row in read_csv(tmp_path / "interpolation.csv")] == [labels[0]] * 2 + [
        labels[1]
    ] * 2


def test_inpaint_keeps_the_known_region_exactly_and_writes_every_file(tiny_checkpoint, tmp_path):
    """RePaint with 6 levels, j = 2, r = 2 (6 + 2 x 2 x 1 = 10 evaluations) on 3 test digits."""
    run_vizu(
        tiny_checkpoint, tmp_path, "--inpaint right --index 0,5,7 --steps 6 --jump-length 2 --resamples 2"
    )
    rows = read_csv(tmp_path / "inpainting.csv")
    assert [int(row["image"]) for row in rows] == [0, 5, 7]
    assert all(float(row["mse_known"]) == 0.0 for row in rows)
    assert all(float(row["mse_hole"]) > 0 and row["classified"] != "" for row in rows)
    assert gif_frame_count(tmp_path / "reverse.gif") == 10 + 1
    for name in ("inpainting.png", "strip.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.format == "PNG"
    assert RepaintPlan(6, 2, 2).evaluations == 10 and RepaintPlan(250, 10, 10).evaluations == 2410


def test_inpaint_conditional_model_with_guidance(trained_conditional_checkpoint, tmp_path):
    run_vizu(
        trained_conditional_checkpoint,
        tmp_path,
        "--inpaint centre --num-images 2 --steps 4 --resamples 1 --guidance 2",
    )
    assert all(float(row["mse_known"]) == 0.0 for row in read_csv(tmp_path / "inpainting.csv"))


def test_masks_name_the_hole_and_a_png_keeps_its_white_pixels(tmp_path):
    right = make_mask("right", (28, 28), seed=0)
    assert right.shape == (1, 1, 28, 28) and right[..., :14].eq(1).all() and right[..., 14:].eq(0).all()
    centre = make_mask("centre", (28, 28), seed=0)
    assert (1 - centre).sum() == 14 * 14 and centre[..., 7:21, 7:21].eq(0).all()
    assert torch.equal(make_mask("random", (28, 28), 3), make_mask("random", (28, 28), 3))
    keep_left = np.zeros((28, 28), np.uint8)
    keep_left[:, :14] = 255
    Image.fromarray(keep_left).save(tmp_path / "keep_left.png")
    assert torch.equal(make_mask(str(tmp_path / "keep_left.png"), (28, 28), seed=0), right)
    images, references = torch.zeros(2, 1, 28, 28), torch.zeros(2, 1, 28, 28)
    references[..., 14:] = 1  # the right half differs by 1 in [-1, 1], 0.5 on the [0, 1] scale
    np.testing.assert_allclose(region_mse(images, references, 1 - right), 0.25)
    np.testing.assert_allclose(region_mse(images, references, right), 0.0)


@pytest.fixture(scope="module")
def odd_masks(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("masks")
    for name, size, value in (("small", (20, 20), 255), ("white", (28, 28), 255), ("black", (28, 28), 0)):
        Image.fromarray(np.full(size, value, np.uint8)).save(folder / f"{name}.png")
    return {name: folder / f"{name}.png" for name in ("small", "white", "black")}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--inpaint {small}", "the mask is 20x20 pixels, the images 28x28"),
        ("--inpaint {white}", "the mask is full (nothing to inpaint)"),
        ("--inpaint {black}", "the mask is empty (no pixel kept)"),
        ("--inpaint diagonal", "--inpaint must be one of left, right, top, bottom, centre, random"),
        ("--interpolate --index 3", "--interpolate needs at least two images"),
        ("--interpolate --num-images 1", "--interpolate needs at least two images"),
        ("--interpolate --steps 101", "--steps must be in [1, 100]"),
        ("--inpaint left --sampler ddim", "--sampler, --eta and --s-churn do not apply"),
        ("--interpolate --inpaint left", "--interpolate and --inpaint are separate modes"),
        ("--from-noise", "--from-noise is for --interpolate"),
        ("--inpaint left --guidance 2", "--guidance needs a class-conditional checkpoint"),
        ("--t 1 --sampler heun", "steps must be in [3, 2] to start at t=1"),
        ("--t 30 --sampler heun --steps 2", "steps must be in [3, 31]"),
        ("--t-sweep --sweep-t 1,50 --sampler heun", "reconstruction from t = 1: --sampler heun"),
        ("--t 30 --sampler ddim --s-churn 1", "--s-churn is Karras' S_churn, for --sampler heun"),
    ],
)
def test_bad_editing_input_is_one_line_and_exit_2(
    tiny_checkpoint, odd_masks, tmp_path, capsys, flags, message
):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: run_vizu(tiny_checkpoint, tmp_path, flags.format(**odd_masks)))
    assert exit_info.value.code == USER_ERROR_EXIT_CODE
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and len(error.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.csv"))


def test_reconstruction_sweep_checks_every_start_before_sampling():
    """heun cannot run from t = 1 (2 evaluations at most, 3 needed): a UserError naming that t, before
    the model is called at all (the sweep would have started at t = 50)."""
    diffusion = GaussianDiffusion(T=100)
    oracle = CountingOracle(diffusion, MU, SIGMA)
    oracle.num_classes = None
    with pytest.raises(UserError, match="reconstruction from t = 1: "):
        reconstruction_sweep(
            oracle, diffusion, torch.zeros(2, 1, 4, 4), [50, 1], sampling=SamplingSettings("heun"), seed=0,
            device=torch.device("cpu"),
        )  # fmt: skip
    assert oracle.calls == []


def test_s_churn_reaches_heun_through_the_trajectories():
    """From the same noised start (one seed), Heun with S_churn = 2 (Algorithm 2) raises the noise of
    each level to a higher trained step t_hat before evaluating there (gamma = min(2 / 4 levels,
    sqrt(2) - 1)) and ends elsewhere than the deterministic Algorithm 1 (S_churn = 0)."""
    diffusion = GaussianDiffusion(T=100)
    oracle = GaussianOracle(diffusion, MU, SIGMA)
    x0 = torch.full((2, 1, 8, 8), 0.3)  # SSIM needs 7 x 7
    plain, churned = (
        reconstruction_trajectory(
            oracle,
            diffusion,
            x0,
            60,
            SamplingSettings("heun", steps=7, s_churn=churn),
            torch.Generator().manual_seed(0),
        )
        for churn in (0.0, 2.0)
    )
    assert not torch.equal(churned.x_t[-1], plain.x_t[-1])
    churned_up = [hat > t for hat, t in zip(churned.timesteps[:-1], plain.timesteps[:-1], strict=True)]
    assert churned.timesteps[0] > plain.timesteps[0] == 60 and any(churned_up)  # sigma raised to t_hat > t
