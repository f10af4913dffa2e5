"""Time to digits: train from scratch for a fixed time budget, then judge the samples as eval_MNIST.py does.

This repo's side is exactly `train_MNIST.py --preset cpu --data DATA --max-minutes M --clock C` (the
trainer of trainer.py; the command is printed and recorded) followed by `eval_MNIST.py --metrics
classifier --num-samples N` on its last.pt (evaluation.evaluate): the cpu preset's recipe (its
description is in ddpm/plumbing/presets.py) with an LR that reaches 0 when the budget does, sampled
from the EMA weights, every class equally at guidance 1, with eval_MNIST.py's default, Heun with 50
model evaluations (Karras et al. 2022, arXiv:2206.00364, Algorithm 1), or --sampler / --steps.
--train-flags adds train_MNIST.py flags after the preset's, for ablations (docs/benchmarks.md).
With --reference, the tuned diffusers set-up trains under the same budget in the same process and
is judged by the same code (scoring.classifier_scores): UNet2DModel (32, 64, 64), 1 layer per
block, no block attention (1,062,497 parameters), DDPMScheduler cosine ("squaredcos_cap_v2"),
v-prediction, min-SNR-5 via diffusers.training_utils.compute_snr, AdamW 2e-3, diffusers EMAModel
with warm-up (as in diffusers' train_unconditional example), batches of 64, fp32; sampled by
DDIMScheduler, 50 steps, "trailing" spacing.
Scores: classifier-FID, precision, recall, mean confidence and the predicted-class histogram against
the test split, next to as many real training digits (the floor). --clock cpu counts this
process's CPU seconds instead of wall seconds, for a machine shared with others.

Example:
    python -m benchmarks.time_to_digits --minutes 15 --clock cpu --threads 1 --reference \\
        --out-dir runs/ttd15 --json runs/ttd15/result.json
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.reference_models import DIFFUSERS_TUNED, diffusers_unet
from ddpm.datasets.sources import MNIST_LIKE, load_images
from ddpm.evaluation.evaluate import evaluate
from ddpm.evaluation.report import as_json
from ddpm.evaluation.scoring import classifier_comparison, classifier_scores
from ddpm.plumbing.checkpointing import build_model
from ddpm.plumbing.cli import OneLineErrorParser, positive_float, positive_int, run_cli
from ddpm.plumbing.inference_settings import EvaluationSettings
from ddpm.plumbing.messages import UserError
from ddpm.plumbing.output_files import write_json
from ddpm.plumbing.presets import training_job_from_flags
from ddpm.plumbing.runtime import resolve_device, seed_everything
from ddpm.plumbing.settings import CLOCKS, DataSettings, RuntimeSettings, SamplingSettings
from ddpm.training.clocks import CLOCK_READERS, SECONDS_PER_MINUTE
from ddpm.training.trainer import train
from ddpm.visualisation.pictures import save_image_grid
from diffusion import SAMPLERS
from model import count_parameters

REFERENCE_LR = 2e-3
REFERENCE_BATCH_SIZE = 64
REFERENCE_MIN_SNR_GAMMA = 5.0
REFERENCE_EMA = {"decay": 0.9999, "use_ema_warmup": True, "inv_gamma": 1.0, "power": 0.75}
SAMPLING_STEPS = 50
GRID_IMAGES, GRID_COLUMNS = 100, 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--minutes", type=positive_float, default=15.0, help="training budget per set-up")
    add("--clock", choices=CLOCKS, default="wall", help="budget in wall seconds or process CPU seconds")
    add(
        "--data", choices=MNIST_LIKE, default="mnist-5k", help="training set; its test split is the reference"
    )
    add(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile ours (in budget)",
    )
    add("--reference", action=argparse.BooleanOptionalAction, default=False, help="also train diffusers")
    add(
        "--train-flags",
        default="",
        help="more train_MNIST.py flags for our side, after the preset's, written with '=' (argparse reads "
        "a lone '--flag' value as a flag): --train-flags=--no-class-cond",
    )
    add("--sampler", choices=SAMPLERS, default=SamplingSettings.sampler, help="our side's sampler")
    add("--steps", type=positive_int, default=SAMPLING_STEPS, help="our side's model evaluations per sample")
    add("--num-samples", type=positive_int, default=1000, help="samples judged per set-up")
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add("--seed", type=int, default=0, help="seed of weights, data order, noise and sampling")
    add("--device", default="auto", help="auto | cpu | cuda[:N]")
    add("--out-dir", default="runs/time_to_digits", help="ours/ (its checkpoints) and the sample grids")
    add("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


# ----- this repo: train_MNIST.py's trainer, then eval_MNIST.py's evaluation -----------------------


def ours_flags(args: argparse.Namespace, out_dir: Path) -> list[str]:
    """The train_MNIST.py command line of our side."""
    flags = [
        "--preset",
        "cpu",
        "--data",
        args.data,
        "--max-minutes",
        f"{args.minutes:g}",
        "--clock",
        args.clock,
    ]
    flags += ["--seed", str(args.seed), "--device", args.device, "--out-dir", str(out_dir)]
    return flags + (["--compile", "on"] if args.compile else []) + shlex.split(args.train_flags)


def run_ours(args: argparse.Namespace, out_dir: Path) -> dict:
    """Train through the trainer and evaluate through evaluation.evaluate; returns its row and floor."""
    flags = ours_flags(args, out_dir / "ours")
    print("ours: train_MNIST.py " + " ".join(flags))
    result = train(training_job_from_flags(flags))
    checkpoint = out_dir / "ours" / "last.pt"
    settings = EvaluationSettings(
        checkpoint=str(checkpoint),
        num_samples=args.num_samples,
        seed=args.seed,
        metrics=("classifier",),
        json=str(out_dir / "ours_eval.json"),
    )
    command = (
        f"eval_MNIST.py --checkpoint {checkpoint} --num-samples {args.num_samples} --metrics classifier "
        f"--sampler {args.sampler} --steps {args.steps} --seed {args.seed}"
    )
    sampling = SamplingSettings(sampler=args.sampler, steps=args.steps)
    report = as_json(
        evaluate(settings, sampling, RuntimeSettings(device=args.device), DataSettings(None), command)
    )
    return {
        "train_command": "train_MNIST.py " + " ".join(flags),
        "eval_command": command,
        "steps": result.step,
        "parameters": count_parameters(build_model(report["provenance"]["checkpoint"]["config"])),
        **report["metrics"]["generated"]["classifier"],
        "floor": report["metrics"]["floor"]["classifier"],
        "samples_png": report["outputs"]["samples_png"],
    }


# ----- the reference: diffusers, its own loop -----------------------------------------------------


def train_for(budget_s: float, clock: str, images: torch.Tensor, batch_size: int, seed: int, step_fn) -> dict:
    """Call step_fn(batch) on shuffled batches until budget_s seconds of the clock have passed."""
    generator = torch.Generator().manual_seed(seed)
    now, steps, loss = CLOCK_READERS[clock], 0, float("nan")
    start = now()
    with tqdm(total=round(budget_s), unit="s", desc="reference training") as progress:
        while now() - start < budget_s:
            for batch in torch.randperm(len(images), generator=generator).split(batch_size):
                if len(batch) < batch_size or now() - start >= budget_s:
                    break
                loss = step_fn(images[batch])
                steps += 1
                progress.set_postfix(steps=steps, loss=f"{loss:.4f}", refresh=False)
                progress.update(min(round(now() - start), progress.total) - progress.n)
    return {"steps": steps, "batch_size": batch_size, "train_seconds": now() - start}


def train_reference(args: argparse.Namespace, images: torch.Tensor, device: torch.device):
    """The tuned diffusers set-up; returns (EMA-weighted denoiser, DDPM scheduler, stats)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr

    torch.manual_seed(args.seed)
    denoiser = diffusers_unet(DIFFUSERS_TUNED).to(device)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=REFERENCE_LR)
    ema = EMAModel(denoiser.parameters(), **REFERENCE_EMA)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def step(x0: torch.Tensor) -> float:  # constant LR
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator, device=device
        )
        prediction = denoiser(scheduler.add_noise(x0, noise, t), t)
        target = scheduler.get_velocity(x0, noise, t)
        per_example = F.mse_loss(prediction, target, reduction="none").mean((1, 2, 3))
        snr = compute_snr(scheduler, t)
        loss = (
            per_example * snr.clamp(max=REFERENCE_MIN_SNR_GAMMA) / (snr + 1)
        ).mean()  # v-prediction weight
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.step(denoiser.parameters())
        return loss.item()

    stats = train_for(
        args.minutes * SECONDS_PER_MINUTE, args.clock, images, REFERENCE_BATCH_SIZE, args.seed, step
    )
    ema.copy_to(denoiser.parameters())
    return denoiser.eval(), scheduler, {**stats, "parameters": count_parameters(denoiser)}


@torch.no_grad()
def sample_reference(denoiser, ddpm_scheduler, args, device) -> torch.Tensor:
    """DDIM (eta = 0) with diffusers' DDIMScheduler built from the training scheduler's config."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(ddpm_scheduler.config, timestep_spacing="trailing")
    scheduler.set_timesteps(SAMPLING_STEPS)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn((args.num_samples, 1, 28, 28), generator=generator, device=device)
    for t in tqdm(scheduler.timesteps, desc="reference DDIM", leave=False):
        x = scheduler.step(denoiser(x, t.expand(len(x)).to(device)), t, x).prev_sample
    return x.clamp(-1, 1).cpu()


def run_reference(args: argparse.Namespace, out_dir: Path, device: torch.device) -> dict:
    seed_everything(args.seed)
    train_images, _ = load_images(args.data, "train")
    denoiser, scheduler, stats = train_reference(args, train_images.to(device), device)
    start = time.perf_counter()
    samples = sample_reference(denoiser, scheduler, args, device)
    seconds = time.perf_counter() - start
    save_image_grid(samples[:GRID_IMAGES], out_dir / "diffusers_tuned.png", columns=GRID_COLUMNS)
    comparison = classifier_comparison(args.data, None, EvaluationSettings().batch_size, args.seed, device)
    return {**stats, "sample_seconds": seconds, **classifier_scores(samples, comparison)}


# ----- report -------------------------------------------------------------------------------------


def print_table(rows: dict[str, dict], args: argparse.Namespace) -> None:
    print(
        f"\n{args.minutes:g} {args.clock}-clock minutes of training each, {args.num_samples} samples; ours: "
        f"{args.sampler} {args.steps} evaluations, diffusers: DDIM {SAMPLING_STEPS} steps"
    )
    print(
        f"{'set-up':<20}{'steps':>7}{'confidence':>11}{'min class':>10}{'precision':>10}"
        f"{'recall':>8}{'cFID':>8}"
    )
    for name, row in rows.items():
        print(
            f"{name:<20}{row.get('steps', '-'):>7}{row['mean_confidence']:>11.3f}"
            f"{min(row['class_fractions']):>10.1%}{row['precision']:>10.3f}{row['recall']:>8.3f}{row['fid']:>8.2f}"
        )
    print("\npredicted-class histogram (% of samples, digits 0-9)")
    for name, row in rows.items():
        print(f"{name:<20}" + " ".join(f"{100 * f:4.1f}" for f in row["class_fractions"]))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    if (out_dir / "ours").exists():
        raise UserError(f"{out_dir / 'ours'} exists: give this run another --out-dir")
    ours = run_ours(args, out_dir)
    rows = {"real train digits": ours.pop("floor"), "ours": ours}
    if args.reference:
        rows["diffusers tuned"] = run_reference(args, out_dir, device)
    print_table(rows, args)
    if args.json:
        write_json({"args": vars(args), "torch": torch.__version__, "results": rows}, args.json)


if __name__ == "__main__":
    run_cli(main)
