"""Training and sampling throughput of this repo's U-Net against diffusers and denoising-diffusion-pytorch.

Networks of (within 10%) the same parameter count run in one process, interleaved
(A B C D A B C D ...), so that a noisy shared machine slows them alike:
  ours              this repo's UNet (model.py; Ho et al. 2020, arXiv:2006.11239) as set by the
                    model flags (default: the cpu preset's 1.13M U-Net)
  ours-as-diffusers this repo's UNet with exactly the diffusers block layout below
  diffusers         UNet2DModel with --reference-channels (c, 2c, 2c), --reference-layers per block
  lucidrains        denoising-diffusion-pytorch Unet(dim, dim_mults=(1, 2, 2)), dim matched to ours
  ours (trainer)    the trainer's own training step on ours (what train_MNIST.py runs: noising,
                    min-SNR weights, clipping, AdamW at the scheduled LR, the EMA), on MNIST-5k
The bare rows time forward + MSE + backward + AdamW of a fixed batch, the same for every network;
"ours x" compares them. Sampling images/s time forward passes under inference_mode divided by
--sample-steps (a 50-step DDIM or DPM-Solver++ run costs 50 network evaluations). FLOPs per image
come from torch.utils.flop_counter; MFU is reported on a GPU whose peak is known. Every network
runs as --amp, --compile and --channels-last say (default: the fast path on a GPU, fp32 eager on a
CPU). --networks picks a subset (ours always runs): on a machine without the two competitor
packages (benchmarks/requirements.txt), `--networks ours,trainer` times this repo alone.

`--preset cifar10` times colour 3 x 32 x 32 images instead: ours is the U-Net of train_MNIST.py's
cifar10 preset (Ho et al.'s CIFAR-10 model), diffusers is UNet2DModel in the layout of
google/ddpm-cifar10-32 with --reference-channels 128 and --reference-layers 2 (both 35,746,307
parameters); only these two networks run.

Example:
    python -m benchmarks.throughput --amp bf16 --threads 1 --repeats 5 --json runs/throughput.json
    python -m benchmarks.throughput --preset cifar10 --threads 1 --batch-size 4 --repeats 3 --iters 1
    python -m benchmarks.throughput --networks ours --model-channels 64 --channel-mult 1,2,2 \\
        --num-res-blocks 2 --attn-resolutions 14 --batch-size 1024            # on a GPU: the fast path
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from benchmarks.reference_models import diffusers_cifar10_setup, diffusers_unet, lucidrains_unet_matching
from ddpm.plumbing.checkpointing import build_model
from ddpm.plumbing.cli import OneLineErrorParser, parse_flags, positive_int, run_cli
from ddpm.plumbing.messages import UserError
from ddpm.plumbing.output_files import atomic_write, write_json
from ddpm.plumbing.presets import PRESETS, TrainingJob
from ddpm.plumbing.runtime import (
    SpeedPlan,
    autocast_context,
    configure_fast_path,
    plan_speed,
    prepare_unet,
    resolve_device,
    seed_everything,
    synchronize,
)
from ddpm.plumbing.settings import (
    DataSettings,
    ModelSettings,
    RunSettings,
    RuntimeSettings,
    TrainingSettings,
)
from model import UNet, count_parameters

NETWORKS = ("ours", "ours-as-diffusers", "diffusers", "lucidrains", "trainer")
MAX_PARAMETER_MISMATCH = 0.10
T_RANGE = 1000  # timesteps are drawn from 0..999 (the networks only embed them)
MODEL_KEYS = {spec.name for spec in fields(ModelSettings)}
CPU_MODEL = ModelSettings(  # unconditional, as the networks it is timed against
    **{key: value for key, value in PRESETS["cpu"].items() if key in MODEL_KEYS - {"class_cond"}}
)
# The benchmark's presets: the flag defaults, and the images each times
BENCHMARK_PRESETS = {
    "cpu": {},
    "cifar10": {key: value for key, value in PRESETS["cifar10"].items() if key in MODEL_KEYS}
    | {"networks": "ours,diffusers", "reference_channels": 128, "reference_layers": 2},
}
IMAGE_SHAPES = {"cpu": (1, 28, 28), "cifar10": (3, 32, 32)}
# Dense peak FLOP/s of GPUs, per autocast dtype (fp32 runs use TF32 tensor cores)
GPU_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "none": 494e12},
    "H100": {"bf16": 989e12, "none": 494e12},
    "A100": {"bf16": 312e12, "none": 156e12},
}


def network_names(text: str) -> tuple[str, ...]:
    """Comma-separated names from NETWORKS, in NETWORKS order, "ours" always among them."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - set(NETWORKS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown network(s) {sorted(unknown)}: choose from {NETWORKS}")
    return tuple(name for name in NETWORKS if name in names | {"ours"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        choices=tuple(BENCHMARK_PRESETS),
        default="cpu",
        help="MNIST's 1x28x28 or CIFAR-10's 3x32x32",
    )
    ModelSettings.add_flags(parser, CPU_MODEL)
    RuntimeSettings.add_flags(parser)
    add = parser.add_argument
    add("--batch-size", type=positive_int, default=64, help="images per training step / forward pass")
    add("--reference-channels", type=positive_int, default=32, help="diffusers: first block width c")
    add("--reference-layers", type=positive_int, default=1, help="diffusers: layers per block")
    add("--networks", type=network_names, default=",".join(NETWORKS), help="which networks to time")
    add("--repeats", type=positive_int, default=5, help="interleaved timing rounds")
    add("--iters", type=positive_int, default=3, help="training steps / forward passes per timing")
    add("--warmup", type=positive_int, default=2, help="untimed steps per network before timing")
    add("--sample-steps", type=positive_int, default=50, help="network evaluations per sampled image")
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add("--seed", type=int, default=0, help="seed of weights and inputs")
    add("--json", default=None, help="also write the results to this JSON file")
    add("--profile", default=None, help="also profile ours' training steps; kernel table to this file")
    args = parse_flags(parser, argv, BENCHMARK_PRESETS, "cpu")
    args.image_shape = IMAGE_SHAPES[args.preset]
    if args.preset == "cifar10" and set(args.networks) - {"ours", "diffusers"}:
        raise UserError("--preset cifar10 times ours and diffusers only: pass --networks ours,diffusers")
    return args


# ----- the contestants ----------------------------------------------------------------------------


def build_networks(args: argparse.Namespace, ours_settings: ModelSettings) -> dict[str, nn.Module]:
    """The chosen bare networks, checked to lie within 10% of ours in parameter count."""
    shape = args.image_shape
    ours = build_model({"model": ours_settings.unet_config(shape[0], shape[1]), "image_shape": list(shape)})
    c = args.reference_channels
    reference_setup = {
        "block_out_channels": (c, 2 * c, 2 * c),
        "layers_per_block": args.reference_layers,
        "attention": (False, False, False),
    }
    if args.preset == "cifar10":
        reference_setup = diffusers_cifar10_setup(c, args.reference_layers)
    builders = {
        "ours": lambda: ours,
        "ours-as-diffusers": lambda: UNet(
            model_channels=c,
            num_res_blocks=args.reference_layers,
            attention_resolutions=(),
            dropout=0.0,
            scale_shift_norm=False,  # diffusers' default resnet_time_scale_shift adds the embedding
        ),
        "diffusers": lambda: diffusers_unet(reference_setup, shape),
        "lucidrains": lambda: lucidrains_unet_matching(count_parameters(ours)),
    }
    networks = {name: builders[name]() for name in args.networks if name in builders}
    check_sizes(networks)
    return networks


def check_sizes(networks: dict[str, nn.Module]) -> None:
    """UserError unless every network's parameter count is within 10% of the first one's."""
    counts = {name: count_parameters(network) for name, network in networks.items()}
    target = next(iter(counts.values()))
    if any(abs(count - target) > MAX_PARAMETER_MISMATCH * target for count in counts.values()):
        listing = ", ".join(f"{name} {count:,}" for name, count in counts.items())
        raise UserError(f"parameter counts differ by more than 10%: {listing}; adjust the size flags")


def flops_per_image(
    network: nn.Module, device: torch.device, image_shape: tuple[int, int, int]
) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs for one image, counted by FlopCounterMode."""
    x = torch.randn(1, *image_shape, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(x, t)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        network(x, t).sum().backward()
    network.zero_grad(set_to_none=True)
    return forward, counter.get_total_flops()


class Contestant:
    """One bare network with its optimizer and fixed inputs; times training steps and forward passes."""

    def __init__(self, network: nn.Module, plan: SpeedPlan, args: argparse.Namespace, device: torch.device):
        self.network = network.to(device)
        self.forward = prepare_unet(self.network, plan)
        # fused on a GPU, as train_MNIST.py runs it (one kernel for all parameters)
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=1e-4, fused=device.type == "cuda")
        generator = torch.Generator(device=device).manual_seed(args.seed)
        shape = (args.batch_size, *args.image_shape)
        memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format
        self.x = torch.randn(shape, generator=generator, device=device).contiguous(
            memory_format=memory_format
        )
        self.target = torch.randn(shape, generator=generator, device=device)
        self.t = torch.randint(0, T_RANGE, (args.batch_size,), generator=generator, device=device)
        self.device, self.amp, self.iters = device, plan.amp, args.iters

    def train_step(self) -> None:
        with autocast_context(self.amp, self.device):
            loss = F.mse_loss(self.forward(self.x, self.t).float(), self.target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.inference_mode()
    def forward_pass(self) -> None:
        with autocast_context(self.amp, self.device):
            self.forward(self.x, self.t)

    def images_per_second(self, step) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(self.iters):
            step()
        synchronize(self.device)
        return self.iters * self.x.shape[0] / (time.perf_counter() - start)


class TrainerContestant(Contestant):
    """The trainer's own step (loop.py's Run.train_step) on ours' settings and MNIST-5k: what
    train_MNIST.py runs."""

    def __init__(self, ours_settings: ModelSettings, runtime: RuntimeSettings, args, out_dir: Path):
        from ddpm.plumbing.processes import setup_processes
        from ddpm.training.trainer import prepare_run

        job = TrainingJob(
            data=DataSettings("mnist-5k"),
            model=ours_settings,
            training=replace(TrainingSettings(), batch_size=args.batch_size, warmup_steps=0),
            runtime=runtime,
            run=RunSettings(out_dir=str(out_dir), seed=args.seed, log_every=10**9, eval_every=0),
        )
        processes = setup_processes(runtime.device)
        self.run = prepare_run(job, processes, out_dir)  # a private temp folder: no lock
        self.run.bar.disable = True
        self.batches = self.run.data.epoch_batches(args.seed, processes)
        self.batch_index, self.iters, self.device = 0, args.iters, processes.device
        self.x = self.batches[0]  # images_per_second reads the batch size from it

    def train_step(self) -> None:
        self.run.train_step(self.batches[self.batch_index % len(self.batches)], 0.0)
        self.batch_index += 1


def interleaved_rates(contestants: dict[str, Contestant], args: argparse.Namespace) -> dict[str, dict]:
    """{name: {"train": [img/s per round], "sample": [img/s per round]}}, rounds run A B C A B C..."""
    for contestant in contestants.values():
        for _ in range(args.warmup):
            contestant.train_step()
            if not isinstance(contestant, TrainerContestant):
                contestant.forward_pass()
    rates = {name: {"train": [], "sample": []} for name in contestants}
    for _ in tqdm(range(args.repeats), desc="interleaved rounds"):
        for name, contestant in contestants.items():
            rates[name]["train"].append(contestant.images_per_second(contestant.train_step))
            if not isinstance(contestant, TrainerContestant):
                forward_rate = contestant.images_per_second(contestant.forward_pass)
                rates[name]["sample"].append(forward_rate / args.sample_steps)
    return rates


def profile_training(contestant: Contestant, steps: int, path: str) -> None:
    """torch.profiler over `steps` training steps of one network: the top operators and kernels by
    self time on the device (GPU) or the host (CPU), printed and written to path."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = contestant.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            contestant.train_step()
        synchronize(contestant.device)
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=70)
    print(f"\nprofile of {steps} training steps of ours, sorted by {sort_by}:\n{table}")
    with atomic_write(path) as temp:
        temp.write_text(table)


def peak_flops(device: torch.device, amp: str) -> float | None:
    """The GPU's dense peak FLOP/s for the autocast dtype, if it is in GPU_PEAK_FLOPS; None on a CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks.get(amp) for key, peaks in GPU_PEAK_FLOPS.items() if key in name), None)


def median_ratio(ours: list[float], theirs: list[float]) -> float | None:
    """Median over rounds of ours / theirs (per round, so both saw the same machine load)."""
    return statistics.median(o / r for o, r in zip(ours, theirs, strict=True)) if theirs else None


def summarize(contestants: dict[str, Contestant], rates, flops, plan: SpeedPlan, device) -> dict:
    """Per network: parameters, FLOPs, median and min-max img/s, ratio of ours to it, MFU."""
    peak = peak_flops(device, plan.amp)
    results = {}
    for name in contestants:
        train, sample = rates[name]["train"], rates[name]["sample"]
        forward_flops, training_flops = flops["ours" if name == "trainer" else name]
        network = contestants["ours" if name == "trainer" else name].network
        results[name] = {
            "parameters": count_parameters(network),
            "forward_flops_per_image": forward_flops,
            "training_flops_per_image": training_flops,
            "train_img_per_s": statistics.median(train),
            "train_min_max": [min(train), max(train)],
            "sample_img_per_s": statistics.median(sample) if sample else None,
            "sample_min_max": [min(sample), max(sample)] if sample else None,
            "ours_train_speedup": median_ratio(rates["ours"]["train"], train),
            "ours_sample_speedup": median_ratio(rates["ours"]["sample"], sample),
            "train_mfu": None if peak is None else statistics.median(train) * training_flops / peak,
        }
    return results


# ----- report -------------------------------------------------------------------------------------


def versions(networks: tuple[str, ...]) -> dict[str, str]:
    """torch's version, and the competitor packages' of the networks that ran."""
    found = {"torch": torch.__version__}
    if "diffusers" in networks:
        import diffusers

        found["diffusers"] = diffusers.__version__
    if "lucidrains" in networks:
        from denoising_diffusion_pytorch.version import __version__ as lucidrains_version

        found["lucidrains"] = lucidrains_version
    return found


def environment(device: torch.device, plan: SpeedPlan, args: argparse.Namespace) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {
        "device": f"{name} ({torch.get_num_threads()} torch threads)",
        "images": "x".join(map(str, args.image_shape)),
        "speed": plan.describe(),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "iters": args.iters,
        "sample_steps": args.sample_steps,
        "versions": versions(args.networks),
    }


def print_table(results: dict, env: dict) -> None:
    print(
        f"\n{env['device']}, {env['speed']}, batch {env['batch_size']} images {env['images']}, "
        f"versions {env['versions']}"
    )
    print(
        f"median (min-max) of {env['repeats']} interleaved rounds; "
        f"sampling = {env['sample_steps']}-step sampler"
    )
    header = (
        f"{'network':<18}{'params':>10}{'GFLOP/img':>11}{'train img/s':>26}{'ours x':>8}"
        f"{'sample img/s':>26}{'ours x':>8}{'MFU':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        train = f"{r['train_img_per_s']:.1f} ({r['train_min_max'][0]:.1f}-{r['train_min_max'][1]:.1f})"
        sample = "-"
        if r["sample_img_per_s"] is not None:
            low, high = r["sample_min_max"]
            sample = f"{r['sample_img_per_s']:.2f} ({low:.2f}-{high:.2f})"
        mfu = "n/a" if r["train_mfu"] is None else f"{100 * r['train_mfu']:.1f}%"
        sample_ratio = "-" if r["ours_sample_speedup"] is None else f"{r['ours_sample_speedup']:.2f}"
        print(
            f"{name:<18}{r['parameters']:>10,}{r['training_flops_per_image'] / 1e9:>11.3f}{train:>26}"
            f"{r['ours_train_speedup']:>8.2f}{sample:>26}{sample_ratio:>8}{mfu:>7}"
        )
    print("GFLOP/img: forward + backward of one image; 'ours x': ours / this network, median over rounds;")
    print("trainer: the trainer's whole step (noising, loss, clipping, AdamW, EMA) on ours")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ours_settings, runtime = ModelSettings.from_args(args), RuntimeSettings.from_args(args)
    device = resolve_device(runtime.device)
    plan = plan_speed(runtime.amp, runtime.compile, runtime.compile_mode, runtime.channels_last, device)
    configure_fast_path(device)  # TF32 and cuDNN autotuning on a GPU, as in train_MNIST.py
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    networks = build_networks(args, ours_settings)
    contestants = {name: Contestant(network, plan, args, device) for name, network in networks.items()}
    flops = {name: flops_per_image(c.network, device, args.image_shape) for name, c in contestants.items()}
    with tempfile.TemporaryDirectory() as out_dir:
        if "trainer" in args.networks:
            contestants["trainer"] = TrainerContestant(ours_settings, runtime, args, Path(out_dir))
        rates = interleaved_rates(contestants, args)
    results = summarize(contestants, rates, flops, plan, device)
    env = environment(device, plan, args)
    print_table(results, env)
    if args.profile:
        profile_training(contestants["ours"], args.iters, args.profile)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json({"environment": env, "results": results, "rates": rates}, args.json)


if __name__ == "__main__":
    run_cli(main)
