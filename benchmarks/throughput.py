"""Training and sampling throughput of this repo's U-Net against diffusers and denoising-diffusion-pytorch.

Four networks of (within 10%) the same parameter count run in one process, interleaved
(A B C D A B C D ...), so that a noisy shared machine slows them alike:
  ours             this repo's UNet (model.py; Ho et al. 2020, arXiv:2006.11239) as set by the flags
  ours-as-diffusers this repo's UNet with exactly the diffusers block layout below
  diffusers        UNet2DModel with --reference-channels (c, 2c, 2c), --reference-layers per block
  lucidrains       denoising-diffusion-pytorch Unet(dim, dim_mults=(1, 2, 2)), dim matched to ours
Training images/s time forward + backward + AdamW step of a batch; sampling images/s time forward
passes under inference_mode and divide by --sample-steps (a 50-step DDIM or DPM-Solver++ run,
arXiv:2010.02502 / arXiv:2211.01095, costs 50 network evaluations; the sampler's own arithmetic is
negligible). FLOPs per image come from torch.utils.flop_counter (convolutions and matmuls); MFU is
reported on a GPU whose peak is known. All networks run in the same dtype (fp32, or bf16 autocast),
and with --compile all go through torch.compile. --networks picks a subset (ours always runs): on a
GPU machine without the two competitor packages, `--networks ours` times this repo's U-Net alone.

Example:
    python benchmarks/throughput.py --dtype bfloat16 --repeats 5 --json runs/throughput.json
    python benchmarks/throughput.py --networks ours --model-channels 64 --channel-mult 1,2,2 \
        --num-res-blocks 2 --attn-resolutions 14 --batch-size 128 --dtype bfloat16 --compile  # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reference_models import diffusers_unet, lucidrains_unet_matching  # noqa: E402
from cli import (  # noqa: E402
    OneLineErrorParser,
    UserError,
    add_compile_flags,
    compile_unet,
    configure_fast_path,
    int_tuple,
    parse_with_unet_speed_flags,
    positive_int,
    resolve_device,
    run_cli,
    seed_everything,
    synchronize,
)
from model import UNet, count_parameters  # noqa: E402

NETWORKS = ("ours", "ours-as-diffusers", "diffusers", "lucidrains")
MAX_PARAMETER_MISMATCH = 0.10
T_RANGE = 1000  # timesteps are drawn from 0..999 (the networks only embed them)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Dense peak FLOP/s of GPUs, per autocast dtype (fp32 runs use TF32 tensor cores)
GPU_PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "H100": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--batch-size", type=positive_int, default=64, help="images per training step / forward pass")
    add("--model-channels", type=positive_int, default=16, help="ours: width of the first level")
    add(
        "--channel-mult", type=int_tuple, default="1,2,4,4", help="ours: width of each level / model-channels"
    )
    add("--num-res-blocks", type=positive_int, default=1, help="ours: residual blocks per level")
    add("--attn-resolutions", type=int_tuple, default="4", help="ours: feature-map sizes with attention")
    add("--reference-channels", type=positive_int, default=32, help="diffusers: first block width c")
    add("--reference-layers", type=positive_int, default=1, help="diffusers: layers per block")
    add("--dtype", choices=tuple(DTYPES), default="float32", help="fp32, or bf16 autocast, for every network")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=False, help="NHWC for all")
    add_compile_flags(parser, "every network")
    add("--networks", type=network_names, default=",".join(NETWORKS), help="which networks to time")
    add("--repeats", type=positive_int, default=5, help="interleaved timing rounds")
    add("--iters", type=positive_int, default=3, help="training steps / forward passes per timing")
    add("--warmup", type=positive_int, default=2, help="untimed steps per network before timing")
    add("--sample-steps", type=positive_int, default=50, help="network evaluations per sampled image")
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add("--seed", type=int, default=0, help="seed of weights and inputs")
    add("--device", default="auto", help="auto | cpu | cuda")
    add("--json", default=None, help="also write the results to this JSON file")
    add("--profile", default=None, help="also profile ours' training steps; kernel table to this file")
    return parse_with_unet_speed_flags(parser, argv)


def network_names(text: str) -> tuple[str, ...]:
    """Comma-separated names from NETWORKS, in NETWORKS order, "ours" always among them."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - set(NETWORKS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown network(s) {sorted(unknown)}: choose from {NETWORKS}")
    return tuple(name for name in NETWORKS if name in names | {"ours"})


# ----- the contestants ----------------------------------------------------------------------------


def build_networks(args: argparse.Namespace) -> dict[str, nn.Module]:
    """The chosen networks, checked to lie within 10% of ours in parameter count."""
    ours = UNet(
        model_channels=args.model_channels,
        channel_mult=args.channel_mult,
        num_res_blocks=args.num_res_blocks,
        attention_resolutions=args.attn_resolutions,
        dropout=0.0,
    )
    c = args.reference_channels
    reference_setup = {
        "block_out_channels": (c, 2 * c, 2 * c),
        "layers_per_block": args.reference_layers,
        "attention": (False, False, False),
    }
    builders = {
        "ours": lambda: ours,
        "ours-as-diffusers": lambda: UNet(
            model_channels=c, num_res_blocks=args.reference_layers, attention_resolutions=(), dropout=0.0
        ),
        "diffusers": lambda: diffusers_unet(reference_setup),
        "lucidrains": lambda: lucidrains_unet_matching(count_parameters(ours)),
    }
    networks = {name: builders[name]() for name in args.networks}
    check_sizes(networks)
    return networks


def check_sizes(networks: dict[str, nn.Module]) -> None:
    """UserError unless every network's parameter count is within 10% of the first one's."""
    counts = {name: count_parameters(network) for name, network in networks.items()}
    target = next(iter(counts.values()))
    if any(abs(count - target) > MAX_PARAMETER_MISMATCH * target for count in counts.values()):
        listing = ", ".join(f"{name} {count:,}" for name, count in counts.items())
        raise UserError(f"parameter counts differ by more than 10%: {listing}; adjust the size flags")


# ----- measurements -------------------------------------------------------------------------------


def flops_per_image(network: nn.Module, device: torch.device) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs for one 28x28 image, counted by FlopCounterMode."""
    x = torch.randn(1, 1, 28, 28, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(x, t)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        network(x, t).sum().backward()
    network.zero_grad(set_to_none=True)
    return forward, counter.get_total_flops()


class Contestant:
    """One network with its optimizer and fixed inputs; times training steps and forward passes."""

    def __init__(self, network: nn.Module, args: argparse.Namespace, device: torch.device):
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.network = network.to(device, memory_format=memory_format)
        self.forward = compile_unet(self.network, args.compile_mode) if args.compile else self.network
        # fused on a GPU, as train_MNIST.py runs it (one kernel for all parameters)
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=1e-4, fused=device.type == "cuda")
        generator = torch.Generator(device=device).manual_seed(args.seed)
        shape = (args.batch_size, 1, 28, 28)
        self.x = torch.randn(shape, generator=generator, device=device).contiguous(
            memory_format=memory_format
        )
        self.target = torch.randn(shape, generator=generator, device=device)
        self.t = torch.randint(0, T_RANGE, (args.batch_size,), generator=generator, device=device)
        self.device, self.dtype, self.iters = device, DTYPES[args.dtype], args.iters

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def train_step(self) -> None:
        with self.autocast():
            loss = F.mse_loss(self.forward(self.x, self.t).float(), self.target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.inference_mode()
    def forward_pass(self) -> None:
        with self.autocast():
            self.forward(self.x, self.t)

    def images_per_second(self, step) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(self.iters):
            step()
        synchronize(self.device)
        return self.iters * self.x.shape[0] / (time.perf_counter() - start)


def interleaved_rates(contestants: dict[str, Contestant], args: argparse.Namespace) -> dict[str, dict]:
    """{name: {"train": [img/s per round], "sample": [img/s per round]}}, rounds run A B C A B C..."""
    for contestant in contestants.values():
        for _ in range(args.warmup):
            contestant.train_step()
            contestant.forward_pass()
    rates = {name: {"train": [], "sample": []} for name in contestants}
    for _ in tqdm(range(args.repeats), desc="interleaved rounds"):
        for name, contestant in contestants.items():
            rates[name]["train"].append(contestant.images_per_second(contestant.train_step))
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(table)


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """The GPU's dense peak FLOP/s for dtype, if it is in GPU_PEAK_FLOPS; None on a CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[dtype] for key, peaks in GPU_PEAK_FLOPS.items() if key in name), None)


def summarize(networks, rates, flops, args, device) -> dict:
    """Per network: parameters, FLOPs, median and min-max img/s, ratio of ours to it, MFU."""
    peak = peak_flops(device, args.dtype)
    results = {}
    for name, network in networks.items():
        train, sample = rates[name]["train"], rates[name]["sample"]
        forward_flops, training_flops = flops[name]
        results[name] = {
            "parameters": count_parameters(network),
            "forward_flops_per_image": forward_flops,
            "training_flops_per_image": training_flops,
            "train_img_per_s": statistics.median(train),
            "train_min_max": [min(train), max(train)],
            "sample_img_per_s": statistics.median(sample),
            "sample_min_max": [min(sample), max(sample)],
            # per round, so that both sides of a ratio saw the same machine load
            "ours_train_speedup": statistics.median(
                o / r for o, r in zip(rates["ours"]["train"], train, strict=True)
            ),
            "ours_sample_speedup": statistics.median(
                o / r for o, r in zip(rates["ours"]["sample"], sample, strict=True)
            ),
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


def environment(device: torch.device, args: argparse.Namespace) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {
        "device": f"{name} ({torch.get_num_threads()} torch threads)",
        "dtype": args.dtype,
        "channels_last": args.channels_last,
        "compiled": args.compile_mode if args.compile else False,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "iters": args.iters,
        "sample_steps": args.sample_steps,
        "versions": versions(args.networks),
    }


def print_table(results: dict, env: dict) -> None:
    print(
        f"\n{env['device']}, {env['dtype']}, batch {env['batch_size']}, channels_last {env['channels_last']},"
        f" compiled {env['compiled']}, versions {env['versions']}"
    )
    print(
        f"median (min-max) of {env['repeats']} interleaved rounds;"
        f" sampling = {env['sample_steps']}-step sampler"
    )
    header = (
        f"{'network':<18}{'params':>10}{'GFLOP/img':>11}{'train img/s':>26}{'ours x':>8}"
        f"{'sample img/s':>26}{'ours x':>8}{'MFU':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        train = f"{r['train_img_per_s']:.1f} ({r['train_min_max'][0]:.1f}-{r['train_min_max'][1]:.1f})"
        sample = f"{r['sample_img_per_s']:.2f} ({r['sample_min_max'][0]:.2f}-{r['sample_min_max'][1]:.2f})"
        mfu = "n/a" if r["train_mfu"] is None else f"{100 * r['train_mfu']:.1f}%"
        print(
            f"{name:<18}{r['parameters']:>10,}{r['training_flops_per_image'] / 1e9:>11.3f}{train:>26}"
            f"{r['ours_train_speedup']:>8.2f}{sample:>26}{r['ours_sample_speedup']:>8.2f}{mfu:>7}"
        )
    print("GFLOP/img: forward + backward of one image; 'ours x': ours / this network, median over rounds")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    configure_fast_path(device)  # TF32 and cuDNN autotuning on a GPU, as in train_MNIST.py
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    networks = build_networks(args)
    contestants = {name: Contestant(network, args, device) for name, network in networks.items()}
    flops = {name: flops_per_image(c.network, device) for name, c in contestants.items()}
    rates = interleaved_rates(contestants, args)
    results = summarize(networks, rates, flops, args, device)
    env = environment(device, args)
    print_table(results, env)
    if args.profile:
        profile_training(contestants["ours"], args.iters, args.profile)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"environment": env, "results": results, "rates": rates}, indent=2)
        )


if __name__ == "__main__":
    run_cli(main)
