"""Presets of train_MNIST.py and the TrainingJob its flags describe.

Presets (`train_MNIST.py --preset NAME`) replace some defaults; flags given explicitly override them:
  gpu  (the default) the model and recipe of the full GPU run, 100 epochs of MNIST
  cpu  the CPU recipe that reaches recognisable digits in 15 CPU-minutes on MNIST-5k: a 1.13M U-Net
       whose widths grow where the feature maps are small, class-conditional (label dropout 0.1, so
       that guidance works; eval samples every class equally, at guidance 1), v-prediction
       (Salimans & Ho 2022, arXiv:2202.00512), min-SNR-5 weights (Hang et al. 2023,
       arXiv:2303.09556), AdamW 2e-3, batch 64, EMA 0.999, bf16 autocast where the CPU computes bfloat16
       itself (AVX512-BF16 or AMX), else fp32
  cifar10  Ho et al. 2020's CIFAR-10 run (arXiv:2006.11239, appendix B): a 35.7M U-Net of 128 channels,
       widths 1,2,2,2, 2 blocks per level, attention at 16x16, dropout 0.1, the embedding added
       before the norm; linear betas, eps, AdamW 2e-4 (constant after 5,000 warm-up steps), batch
       128, EMA 0.9999, 800k steps, horizontal flips
A TrainingJob holds one dataclass of settings.py per flag group; its `plain()` values are what a
checkpoint records as config["train"], and `write_run_config` writes its flags to the run's
config.toml, which `--config` reads back into the same TrainingJob.

Example:
    job = training_job_from_flags(["--preset", "cpu", "--lr", "1e-3"])   # job.training.lr == 1e-3
    write_run_config(job, Path("checkpoints"))  # training_job_from_flags(["--config", ...]) == job
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from ddpm.plumbing.cli import OneLineErrorParser, parse_flags
from ddpm.plumbing.config_file import CONFIG_NAME, write_config
from ddpm.plumbing.runtime import cpu_has_native_bf16
from ddpm.plumbing.settings import (
    DataSettings,
    DiffusionSettings,
    ModelSettings,
    RunSettings,
    RuntimeSettings,
    Settings,
    TrainingSettings,
)

CPU_AMP = "bf16" if cpu_has_native_bf16() else "none"  # emulated bf16 is many times slower than fp32
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {},
    "cpu": {
        "model_channels": 16,
        "channel_mult": (1, 2, 4, 4),
        "num_res_blocks": 1,
        "attn_resolutions": (4,),
        "dropout": 0.0,
        "class_cond": True,  # halved classifier-FID at 15 CPU-minutes (docs/benchmarks.md)
        "prediction": "v",
        "min_snr_gamma": 5.0,
        "lr": 2e-3,
        "warmup_steps": 100,
        "ema_decay": 0.999,
        "batch_size": 64,  # 2.2x the steps of 128 per CPU-second, better digits (Zen 2, fp32: docs)
        "amp": CPU_AMP,
        "eval_every": 0,  # 1,000 samples cost 1.7 MNIST-5k epochs on 2 CPU cores: on request only
    },
    "cifar10": {
        "data": "cifar10",
        "model_channels": 128,
        "channel_mult": (1, 2, 2, 2),
        "num_res_blocks": 2,
        "attn_resolutions": (16,),
        "dropout": 0.1,
        "scale_shift_norm": False,  # Ho et al.'s residual block adds the embedding
        "schedule": "linear",
        "prediction": "eps",
        "lr": 2e-4,
        "lr_schedule": "constant",
        "warmup_steps": 5000,
        "batch_size": 128,
        "ema_decay": 0.9999,
        "epochs": 2052,  # 390 steps per epoch: enough for the 800k steps
        "max_steps": 800_000,
        "hflip": True,
        "eval_every": 50,  # 19,500 steps: 41 measures in 800k steps
    },
}
DEFAULT_PRESET = "gpu"
UNRECORDED_FLAGS = ("resume",)  # how a run was started, not what it trains: config.toml leaves it out


def presets_help() -> str:
    """The --help epilog: each preset's values as flags."""
    lines = ["presets (flags given explicitly override them):"]
    for name, values in PRESETS.items():
        flags = " ".join(_flag_text(key, value) for key, value in values.items())
        lines.append(f"  {name}: {flags or 'the defaults above'}")
    return "\n".join(lines)


def _flag_text(key: str, value: Any) -> str:
    """One preset value as the flag that sets it: --hflip, --no-hflip, --channel-mult 1,2,2."""
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} " + (",".join(map(str, value)) if isinstance(value, tuple) else str(value))


@dataclass(frozen=True)
class TrainingJob:
    """Everything `train_MNIST.py`'s flags say: what to train, how, where it runs and where it writes."""

    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    diffusion: DiffusionSettings = DiffusionSettings()
    training: TrainingSettings = TrainingSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    run: RunSettings = RunSettings()
    preset: str = DEFAULT_PRESET

    PARTS: ClassVar[tuple[type[Settings], ...]] = (
        DataSettings,
        ModelSettings,
        DiffusionSettings,
        TrainingSettings,
        RuntimeSettings,
        RunSettings,
    )

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--preset", choices=tuple(PRESETS), default=DEFAULT_PRESET, help="a set of defaults (see below)"
        )
        for part in cls.PARTS:
            part.add_flags(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainingJob:
        return cls(
            data=DataSettings.from_args(args),
            model=ModelSettings.from_args(args),
            diffusion=DiffusionSettings.from_args(args),
            training=TrainingSettings.from_args(args),
            runtime=RuntimeSettings.from_args(args),
            run=RunSettings.from_args(args),
            preset=args.preset,
        )

    def plain(self) -> dict[str, Any]:
        """Every resolved setting as plain values (tuples as lists), for the checkpoint's config."""
        return _plain(asdict(self))


def training_job_from_flags(argv: list[str], description: str | None = None) -> TrainingJob:
    """The TrainingJob that `train_MNIST.py ARGV` runs (preset < --config file < flags): the script's
    parser, also for code that trains as that command does."""
    parser = OneLineErrorParser(prog="train_MNIST.py", description=description, epilog=presets_help())
    TrainingJob.add_flags(parser)
    return TrainingJob.from_args(parse_flags(parser, argv, PRESETS, DEFAULT_PRESET))


RUN_CONFIG_HEADER = """train_MNIST.py's flags of a run, every one resolved (a preset < a --config file < the
command line); flags whose value is None, and --resume, are left out.
Repeat the run in a new folder: python train_MNIST.py --config {path} --out-dir NEW_FOLDER
Continue it:                    python train_MNIST.py --config {path} --resume latest"""


def write_run_config(job: TrainingJob, out_dir: Path) -> Path:
    """Write the job's flags to out_dir/config.toml (atomically), all but --resume, so that the file
    given to --config repeats the run (with another --out-dir) or continues it (with --resume)."""
    path = out_dir / CONFIG_NAME
    sections: dict[str, dict[str, Any]] = {"preset": {"preset": job.preset}}
    for settings in (job.data, job.model, job.diffusion, job.training, job.runtime, job.run):
        sections[settings.TITLE] = {
            key: value for key, value in settings.flag_values().items() if key not in UNRECORDED_FLAGS
        }
    write_config(sections, path, RUN_CONFIG_HEADER.format(path=path))
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return list(value) if isinstance(value, tuple | list) else value
