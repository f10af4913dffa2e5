"""Time to digits: train from scratch for a fixed wall time, then judge 256 samples with a classifier.

This repo's set-up (defaults below): a lean U-Net of 1.09M parameters whose widths grow where the
feature maps are small (16, 32, 64, 64 channels at 28, 14, 7, 4 pixels; attention only at 4x4),
v-prediction (Salimans & Ho 2022, arXiv:2202.00512), min-SNR-5 loss weighting (Hang et al. 2023,
arXiv:2303.09556), batches of 128, AdamW with a linear LR warm-up and a cosine decay that reaches 0
when the time budget does, an EMA whose decay warms up (training_state.WarmupEMA) and bf16
autocast (the CPU's AMX units); --compile adds torch.compile, its compiling counted in the budget.
Sampling: DDIM 50 steps
(Song et al. 2021, arXiv:2010.02502) of the EMA weights, through diffusion.sample.
With --reference the tuned diffusers set-up of issue 7 trains under the same budget and is judged by
the same classifier: UNet2DModel (32, 64, 64), 1 layer per block, no block attention (1,062,497
parameters), DDPMScheduler cosine ("squaredcos_cap_v2"), v-prediction, min-SNR-5 via
diffusers.training_utils.compute_snr, AdamW 2e-3, diffusers EMAModel with warm-up (as in diffusers'
train_unconditional example), batches of 64, fp32; sampled by DDIMScheduler, 50 steps, "trailing" spacing.
Scores (benchmarks/classifier_judge.py): mean classifier confidence, predicted-class histogram and
classifier-FID against the 1,000 held-out digits, next to real training digits (the floor).
--clock cpu counts this process's CPU seconds instead of wall seconds, for a machine shared with others.

Example:
    python benchmarks/time_to_digits.py --minutes 15 --reference --json runs/time_to_digits.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.classifier_judge import ClassifierJudge, real_data_floor  # noqa: E402
from benchmarks.reference_models import DIFFUSERS_TUNED, diffusers_unet  # noqa: E402
from checkpointing import CHECKPOINT_VERSION, build_model, save_checkpoint  # noqa: E402
from cli import (  # noqa: E402
    OneLineErrorParser,
    UserError,
    add_compile_flags,
    compile_unet,
    int_tuple,
    non_negative_int,
    parse_with_unet_speed_flags,
    positive_float,
    positive_int,
    resolve_device,
    run_cli,
    seed_everything,
    writable_dir,
)
from data_sources import DATA_SETS, load_images  # noqa: E402
from diffusion import PREDICTIONS, SAMPLERS, GaussianDiffusion  # noqa: E402
from image_metrics import save_image_grid  # noqa: E402
from mnist_classifier import default_classifier_path  # noqa: E402
from model import count_parameters  # noqa: E402
from training_state import WarmupEMA  # noqa: E402

SECONDS_PER_MINUTE = 60
REFERENCE_LR = 2e-3
REFERENCE_BATCH_SIZE = 64  # issue 7's set-up
REFERENCE_MIN_SNR_GAMMA = 5.0
REFERENCE_EMA = {"decay": 0.9999, "use_ema_warmup": True, "inv_gamma": 1.0, "power": 0.75}
GRID_IMAGES, GRID_COLUMNS = 100, 10
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
LR_SCHEDULES = ("cosine", "constant")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--minutes", type=positive_float, default=15.0, help="training budget per set-up")
    add(
        "--clock", choices=tuple(CLOCKS), default="wall", help="budget in wall seconds or process CPU seconds"
    )
    add("--data", choices=DATA_SETS, default="mnist-5k", help="training set; its test split is the reference")
    add("--data-dir", default=None, help="folder of MNIST-format IDX files (overrides --data)")
    add("--batch-size", type=positive_int, default=128, help="images per training step of ours")
    add("--model-channels", type=positive_int, default=16, help="width of the first U-Net level")
    add("--channel-mult", type=int_tuple, default="1,2,4,4", help="width of each level / model-channels")
    add("--num-res-blocks", type=positive_int, default=1, help="residual blocks per level")
    add("--attn-resolutions", type=int_tuple, default="4", help="feature-map sizes with self-attention")
    add("--dropout", type=float, default=0.0, help="dropout in the residual blocks")
    add("--prediction", choices=PREDICTIONS, default="v", help="what the network predicts")
    add("--min-snr-gamma", type=positive_float, default=5.0, help="min-SNR loss weight gamma")
    add("--lr", type=positive_float, default=2e-3, help="peak AdamW learning rate")
    add("--warmup-steps", type=non_negative_int, default=100, help="linear LR warm-up steps")
    add("--lr-schedule", choices=LR_SCHEDULES, default="cosine", help="LR after the warm-up, over the budget")
    add("--ema-decay", type=float, default=0.999, help="EMA decay, reached after its warm-up")
    add("--amp", choices=("bf16", "none"), default="bf16", help="autocast dtype of our training steps")
    add_compile_flags(parser, "our U-Net's training forward (compiling counts against the budget)")
    add("--reference", action=argparse.BooleanOptionalAction, default=False, help="also train diffusers")
    add("--num-samples", type=positive_int, default=256, help="samples judged per set-up")
    add("--sampler", choices=SAMPLERS, default="ddim", help="our sampler (the reference uses DDIM)")
    add("--steps", type=positive_int, default=50, help="sampling steps")
    add("--classifier", default=None, help="MNIST classifier weights (default: mnist_classifier.py's path)")
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add("--seed", type=int, default=0, help="seed of weights, data order, noise and sampling")
    add("--device", default="auto", help="auto | cpu | cuda")
    add("--out-dir", default="runs/time_to_digits", help="sample grids and our checkpoint ours.pt")
    add("--json", default=None, help="also write the results to this JSON file")
    return parse_with_unet_speed_flags(parser, argv)


# ----- one training loop, two set-ups ------------------------------------------------------------


def check_sampling_flags(args: argparse.Namespace) -> None:
    """Refuse a sampler / step count pair before training rather than after it."""
    diffusion = GaussianDiffusion(prediction=args.prediction)
    try:
        diffusion.timesteps(args.sampler, args.steps, diffusion.T - 1)
    except ValueError as error:
        raise UserError(f"--sampler {args.sampler} --steps {args.steps}: {error}") from None


def train_for(budget_s: float, clock: str, images: torch.Tensor, batch_size: int, seed: int, step_fn) -> dict:
    """Call step_fn(batch, step, budget_fraction) on shuffled batches until budget_s seconds of the
    clock have passed; step counts from 0, budget_fraction in [0, 1) is the part of the budget spent."""
    generator = torch.Generator().manual_seed(seed)
    now, steps, loss = CLOCKS[clock], 0, float("nan")
    start = now()
    with tqdm(total=round(budget_s), unit="s", desc="training") as progress:
        while now() - start < budget_s:
            for batch in torch.randperm(len(images), generator=generator).split(batch_size):
                if len(batch) < batch_size or now() - start >= budget_s:
                    break
                loss = step_fn(images[batch], steps, (now() - start) / budget_s)
                steps += 1
                progress.set_postfix(steps=steps, loss=f"{loss:.4f}", refresh=False)
                progress.update(min(round(now() - start), progress.total) - progress.n)  # redraws <= 10/s
    return {
        "steps": steps,
        "batch_size": batch_size,
        "images_seen": steps * batch_size,
        "train_seconds": now() - start,
    }


def lr_factor(step: int, warmup_steps: int, budget_fraction: float, schedule: str) -> float:
    """LR multiplier: linear warm-up over steps, then 1 (constant) or a cosine that reaches 0 when the
    time budget does (train_MNIST.lr_factor's decay, over time instead of steps)."""
    warmup = min(1.0, (step + 1) / max(1, warmup_steps))
    if schedule == "constant":
        return warmup
    return warmup * 0.5 * (1 + math.cos(math.pi * budget_fraction))


def train_ours(args: argparse.Namespace, images: torch.Tensor, device: torch.device):
    """This repo's set-up; saves out-dir/ours.pt and returns (EMA U-Net, diffusion, training stats)."""
    model_config = {
        "in_channels": 1,
        "model_channels": args.model_channels,
        "channel_mult": args.channel_mult,
        "num_res_blocks": args.num_res_blocks,
        "attention_resolutions": args.attn_resolutions,
        "dropout": args.dropout,
        "num_classes": None,
    }
    model = build_model({"model": model_config}).to(device)
    diffusion = GaussianDiffusion(prediction=args.prediction).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ema = WarmupEMA(model, args.ema_decay)
    network = compile_unet(model, args.compile_mode) if args.compile else model
    autocast = torch.autocast(device.type, torch.bfloat16) if args.amp == "bf16" else nullcontext()

    def step(x0: torch.Tensor, step_index: int, budget_fraction: float) -> float:
        factor = lr_factor(step_index, args.warmup_steps, budget_fraction, args.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * factor
        with autocast:
            loss = diffusion.training_loss(network, x0, min_snr_gamma=args.min_snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update()
        return loss.item()

    stats = train_for(args.minutes * SECONDS_PER_MINUTE, args.clock, images, args.batch_size, args.seed, step)
    config = {"model": model_config, "diffusion": diffusion.config(), "data": args.data}
    checkpoint = {
        "version": CHECKPOINT_VERSION,
        "config": config,
        "model": model.state_dict(),
        "ema": ema.module.state_dict(),
        "epoch": 0,
        "step": stats["steps"],
    }
    save_checkpoint(checkpoint, Path(args.out_dir) / "ours.pt")
    return ema.module.eval(), diffusion, {**stats, "parameters": count_parameters(model)}


def train_reference(args: argparse.Namespace, images: torch.Tensor, device: torch.device):
    """The tuned diffusers set-up of issue 7; returns (EMA-weighted denoiser, DDPM scheduler, stats)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr

    torch.manual_seed(args.seed)
    denoiser = diffusers_unet(DIFFUSERS_TUNED).to(device)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=REFERENCE_LR)
    ema = EMAModel(denoiser.parameters(), **REFERENCE_EMA)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def step(x0: torch.Tensor, step_index: int, budget_fraction: float) -> float:  # constant LR (issue 7)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator, device=device
        )
        prediction = denoiser(scheduler.add_noise(x0, noise, t), t)
        per_example = F.mse_loss(prediction, scheduler.get_velocity(x0, noise, t), reduction="none").mean(
            (1, 2, 3)
        )
        snr = compute_snr(scheduler, t)
        loss = (
            per_example * snr.clamp(max=REFERENCE_MIN_SNR_GAMMA) / (snr + 1)
        ).mean()  # v-prediction weight
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.step(denoiser.parameters())
        return loss.item()

    budget_s = args.minutes * SECONDS_PER_MINUTE
    stats = train_for(budget_s, args.clock, images, REFERENCE_BATCH_SIZE, args.seed, step)
    ema.copy_to(denoiser.parameters())
    return denoiser.eval(), scheduler, {**stats, "parameters": count_parameters(denoiser)}


# ----- sampling -----------------------------------------------------------------------------------


def timed(sample: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    images = sample()
    return images.cpu(), time.perf_counter() - start


def sample_ours(model, diffusion: GaussianDiffusion, args, device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(args.seed)
    return diffusion.sample(
        model, args.num_samples, sampler=args.sampler, steps=args.steps, generator=generator
    )


@torch.no_grad()
def sample_reference(denoiser, ddpm_scheduler, args, device) -> torch.Tensor:
    """DDIM (eta = 0) with diffusers' DDIMScheduler built from the training scheduler's config."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(ddpm_scheduler.config, timestep_spacing="trailing")
    scheduler.set_timesteps(args.steps)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn((args.num_samples, 1, 28, 28), generator=generator, device=device)
    for t in tqdm(scheduler.timesteps, desc="reference DDIM", leave=False):
        x = scheduler.step(denoiser(x, t.expand(len(x)).to(device)), t, x).prev_sample
    return x.clamp(-1, 1)


# ----- report -------------------------------------------------------------------------------------


def print_table(rows: dict[str, dict], args: argparse.Namespace) -> None:
    print(
        f"\n{args.minutes:g} {args.clock}-clock minutes of training each,"
        f" {args.num_samples} samples, {args.steps} steps"
    )
    print(
        f"{'set-up':<20}{'params':>11}{'batch':>6}{'steps':>7}{'sample s':>10}"
        f"{'mean conf':>11}{'min class':>11}{'cFID':>8}"
    )
    for name, row in rows.items():
        params = f"{row['parameters']:,}" if "parameters" in row else "-"
        steps, batch = str(row.get("steps", "-")), str(row.get("batch_size", "-"))
        sample_s = f"{row['sample_seconds']:.0f}" if "sample_seconds" in row else "-"
        print(
            f"{name:<20}{params:>11}{batch:>6}{steps:>7}{sample_s:>10}{row['mean_confidence']:>11.3f}"
            f"{min(row['class_fractions']):>11.1%}{row['classifier_fid']:>8.2f}"
        )
    print("\npredicted-class histogram (% of samples, digits 0-9)")
    for name, row in rows.items():
        print(f"{name:<20}" + " ".join(f"{100 * f:4.1f}" for f in row["class_fractions"]))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_sampling_flags(args)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out_dir = writable_dir(args.out_dir)
    train_images, _ = load_images(args.data, "train", args.data_dir)
    test_images, _ = load_images(args.data, "test", args.data_dir)
    needed = max(args.batch_size, REFERENCE_BATCH_SIZE) if args.reference else args.batch_size
    if needed > len(train_images):  # a smaller set would never fill a batch: no step in the budget
        raise UserError(f"a batch of {needed} exceeds the {len(train_images)} training images")
    judge = ClassifierJudge.load(
        args.classifier or default_classifier_path(args.data, args.data_dir), test_images
    )
    rows = {"real train digits": real_data_floor(judge, train_images, args.num_samples, args.seed)}

    model, diffusion, stats = train_ours(args, train_images.to(device), device)
    samples, seconds = timed(lambda: sample_ours(model, diffusion, args, device))
    rows["ours"] = {**stats, "sample_seconds": seconds, **judge.score(samples)}
    save_image_grid(samples[:GRID_IMAGES], out_dir / "ours.png", columns=GRID_COLUMNS)
    if args.reference:
        seed_everything(args.seed)
        denoiser, scheduler, stats = train_reference(args, train_images.to(device), device)
        samples, seconds = timed(lambda: sample_reference(denoiser, scheduler, args, device))
        rows["diffusers tuned"] = {**stats, "sample_seconds": seconds, **judge.score(samples)}
        save_image_grid(samples[:GRID_IMAGES], out_dir / "diffusers_tuned.png", columns=GRID_COLUMNS)

    print_table(rows, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "torch": torch.__version__, "results": rows}, indent=2)
        )


if __name__ == "__main__":
    run_cli(main)
