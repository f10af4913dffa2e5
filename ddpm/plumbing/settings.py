"""Settings declared once: small frozen dataclasses whose fields are the scripts' flags.

Each dataclass field is one flag (`model_channels` -> `--model-channels`) with its type, default and
help; `Settings.add_flags(parser)` adds a dataclass's flags to a parser and `Settings.from_args(args)`
reads them back, so every script and benchmark shares the same names, types and defaults. Library
functions take these dataclasses (or plain keywords), never an argparse namespace. The presets of
train_MNIST.py and the TrainingJob that gathers its settings are in presets.py.

Example:
    parser = OneLineErrorParser()
    ModelSettings.add_flags(parser)
    model = ModelSettings.from_args(parser.parse_args(["--model-channels", "32"]))
"""

from __future__ import annotations

import argparse
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, ClassVar, Self

from ddpm.datasets.checks import NUM_CLASSES
from ddpm.datasets.sources import DATA_SETS, flips_by_default
from ddpm.plumbing.cli import (
    fraction,
    int_between,
    int_tuple,
    int_tuple_between,
    non_negative_float,
    non_negative_float_tuple,
    non_negative_int,
    positive_float,
    positive_int,
    seed_number,
)
from ddpm.plumbing.runtime import AMP_MODES, COMPILE_MODES, SWITCHES
from diffusion import PREDICTIONS, SAMPLERS, SCHEDULES

LR_SCHEDULES = ("cosine", "constant")
CLOCKS = ("wall", "cpu")
TIMESTEP_SAMPLERS = ("uniform", "loss-aware")  # ddpm/training/timestep_sampler.py
# Upper limits of the sizes, far above any useful value, so that a typo is one line, not an allocation
# of terabytes: U-Net width, width multiplier per level, residual blocks per level, diffusion steps.
MAX_MODEL_CHANNELS, MAX_CHANNEL_MULT, MAX_RES_BLOCKS, MAX_T = 1024, 16, 16, 100_000
MAX_REPEATS = 1000  # eval's sample sets
IMAGE_CHANNELS = (1, 3)


def setting(default: Any, help: str, type=None, choices=None, flag: str | None = None):  # noqa: A002
    """A dataclass field that is also a command-line flag."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "flag": flag})


class Settings:
    """Base of the settings dataclasses: their fields as flags, and back."""

    TITLE: ClassVar[str] = ""
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # every subclass is a dataclass

    @classmethod
    def add_flags(
        cls,
        parser: argparse.ArgumentParser,
        defaults: Settings | None = None,
        helps: dict[str, str] | None = None,
        names: tuple[str, ...] | None = None,
    ) -> None:
        """Add one flag per field (or per field among `names`) in a group: defaults from `defaults`
        (else the dataclass's), help texts from `helps` where given (a script's own wording of what
        its default means)."""
        defaults = defaults if defaults is not None else cls()
        group = parser.add_argument_group(cls.TITLE)
        for spec in fields(cls):
            if names is not None and spec.name not in names:
                continue
            meta, value = spec.metadata, getattr(defaults, spec.name)
            help_text = (helps or {}).get(spec.name, meta["help"])
            options = {"dest": spec.name, "default": value, "help": help_text}
            if isinstance(value, bool) or meta["type"] is bool:  # bool, or None meaning "it depends"
                options["action"] = argparse.BooleanOptionalAction
            else:
                options |= {"type": meta["type"], "choices": meta["choices"]}
                if isinstance(value, tuple):  # given as text, so that the field's type parses it
                    options["default"] = ",".join(map(str, value))
            group.add_argument(meta["flag"] or "--" + spec.name.replace("_", "-"), **options)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        """The dataclass of the parsed flags; fields without a flag (see add_flags' names) keep
        their defaults."""
        return cls(
            **{spec.name: getattr(args, spec.name) for spec in fields(cls) if hasattr(args, spec.name)}
        )


@dataclass(frozen=True)
class DataSettings(Settings):
    TITLE = "data"
    data: str = setting(
        "mnist", "data set (mnist, cifar10, celeba download into data/ once)", choices=DATA_SETS
    )
    data_dir: str | None = setting(
        None,
        "folder of MNIST-format IDX files, CIFAR-10's cifar-10-batches-py, CelebA, or PNG/JPEG images "
        "(a sub-folder per class); overrides --data",
    )
    image_size: int | None = setting(
        None, "resize (centre-cropped) to S x S (default: the data's own size; celeba 64)", positive_int
    )
    channels: int | None = setting(
        None, "1 (grey) or 3 (RGB) (default: the data's own)", int, choices=IMAGE_CHANNELS
    )
    hflip: bool | None = setting(
        None, "random horizontal flips of the training batches (default: on for cifar10 and celeba)", bool
    )
    CHECKPOINT_FLAGS: ClassVar[tuple[str, ...]] = ("data", "data_dir")

    @classmethod
    def add_checkpoint_flags(cls, parser: argparse.ArgumentParser) -> None:
        """--data and --data-dir for scripts that read a checkpoint: by default its own data, at the
        checkpoint's image shape."""
        helps = {
            "data": "data set of the test images (default: the checkpoint's)",
            "data_dir": "folder of the test images, any layout --data-dir takes (default: the checkpoint's)",
        }
        cls.add_flags(parser, cls(), helps, cls.CHECKPOINT_FLAGS)
        parser.set_defaults(data=None)  # None: the checkpoint's (source_or)

    def source_or(self, trained_on: tuple[str, str | None]) -> tuple[str, str | None]:
        """(data set, data folder) that --data / --data-dir name, else trained_on (a checkpoint's own):
        --data alone drops the checkpoint's folder."""
        name, data_dir = trained_on
        return self.data or name, self.data_dir or (None if self.data else data_dir)

    def with_defaults(self) -> DataSettings:
        """hflip resolved for this data (on for CIFAR-10 and CelebA unless told otherwise)."""
        if self.hflip is not None:
            return self
        return replace(self, hflip=flips_by_default(self.data, self.data_dir))


@dataclass(frozen=True)
class ModelSettings(Settings):
    TITLE = "U-Net (model.py)"
    model_channels: int = setting(64, "width of the first U-Net level", int_between(1, MAX_MODEL_CHANNELS))
    channel_mult: tuple[int, ...] = setting(
        (1, 2, 2), "width of each level / model-channels", int_tuple_between(1, MAX_CHANNEL_MULT)
    )
    num_res_blocks: int = setting(2, "residual blocks per level", int_between(1, MAX_RES_BLOCKS))
    attn_resolutions: tuple[int, ...] = setting((14,), "feature-map sizes with self-attention", int_tuple)
    dropout: float = setting(0.1, "dropout in the residual blocks, in [0, 1)", fraction)
    class_cond: bool = setting(False, "condition on the class labels (classifier-free guidance)")
    scale_shift_norm: bool = setting(
        True, "t and the label scale and shift each block's second GroupNorm (AdaGN; off: added before it)"
    )

    def unet_config(self, in_channels: int, image_size: int) -> dict[str, Any]:
        """The keyword arguments of model.UNet, as plain values (lists, not tuples)."""
        return {
            "in_channels": in_channels,
            "model_channels": self.model_channels,
            "channel_mult": list(self.channel_mult),
            "num_res_blocks": self.num_res_blocks,
            "attention_resolutions": list(self.attn_resolutions),
            "dropout": self.dropout,
            "num_classes": NUM_CLASSES if self.class_cond else None,
            "image_size": image_size,
            "scale_shift_norm": self.scale_shift_norm,
        }


@dataclass(frozen=True)
class DiffusionSettings(Settings):
    TITLE = "diffusion (diffusion.py)"
    T: int = setting(1000, "diffusion steps", int_between(2, MAX_T), flag="--T")
    schedule: str = setting("cosine", "noise schedule", choices=SCHEDULES)
    prediction: str = setting("eps", "what the network predicts", choices=PREDICTIONS)
    learn_sigma: bool = setting(
        False,
        "learn the reverse variance (Nichol & Dhariwal eq. 15; the U-Net outputs 2C channels) with "
        "L_hybrid = L_simple + 0.001 L_vlb",
    )

    def config(self) -> dict[str, Any]:
        """The keyword arguments of diffusion.GaussianDiffusion."""
        return {
            "T": self.T,
            "schedule": self.schedule,
            "prediction": self.prediction,
            "learn_sigma": self.learn_sigma,
        }


@dataclass(frozen=True)
class TrainingSettings(Settings):
    TITLE = "optimisation and stop rules"
    epochs: int = setting(100, "passes over the training set", positive_int)
    batch_size: int = setting(128, "images per step on each process", positive_int)
    lr: float = setting(2e-4, "peak AdamW learning rate", positive_float)
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay", non_negative_float)
    warmup_steps: int = setting(1000, "linear LR warm-up steps", non_negative_int)
    lr_schedule: str = setting(
        "cosine", "LR after the warm-up (cosine: to 0 at the end)", choices=LR_SCHEDULES
    )
    grad_clip: float = setting(1.0, "clip the gradient norm to this", positive_float)
    ema_decay: float = setting(0.9999, "EMA decay, in [0, 1), reached after a warm-up", fraction)
    min_snr_gamma: float | None = setting(
        None, "min-SNR loss weight gamma, e.g. 5 (default None: plain MSE)", positive_float
    )
    p_uncond: float = setting(0.1, "label dropout for classifier-free guidance, in [0, 1)", fraction)
    timestep_sampler: str = setting(
        "uniform",
        "how t is drawn: uniform (Algorithm 1), or loss-aware, p_t ~ sqrt(E[L_t^2]) over the last 10 losses "
        "of each t with losses weighted by 1/(T p_t) (Nichol & Dhariwal section 3.3)",
        choices=TIMESTEP_SAMPLERS,
    )
    max_steps: int | None = setting(None, "also stop after this many steps", positive_int)
    max_minutes: float | None = setting(
        None, "also stop after this many minutes of training steps (the LR decays over them)", positive_float
    )
    clock: str = setting(
        "wall", "what --max-minutes counts: wall seconds or this process's CPU seconds", choices=CLOCKS
    )


@dataclass(frozen=True)
class RuntimeSettings(Settings):
    TITLE = "where and how the U-Net runs (auto: the fast path on a GPU, eager fp32 on a CPU)"
    device: str = setting("auto", "auto | cpu | cuda[:N]")
    amp: str = setting("auto", "autocast dtype; auto: bf16 on a GPU that has it", choices=AMP_MODES)
    compile: str = setting("auto", "torch.compile the U-Net; auto: on a GPU", choices=SWITCHES)
    compile_mode: str = setting(
        "auto", "torch.compile mode; auto: reduce-overhead (CUDA graphs) on a GPU", choices=COMPILE_MODES
    )
    channels_last: str = setting("auto", "NHWC U-Net weights; auto: on a GPU", choices=SWITCHES)


@dataclass(frozen=True)
class SamplerChoice(Settings):
    """The sampling flags SamplingSettings and GuidedSamplingSettings share: sampler, steps, eta."""

    TITLE = "sampling (diffusion.py)"
    sampler: str = setting(
        "ddim", "reverse process: ddpm (all T steps, or respaced to --steps), ddim, dpm++2m", choices=SAMPLERS
    )
    steps: int | None = setting(
        None, "model evaluations from t down to 0 (default: min(50, t+1); ddpm: t+1)", positive_int
    )
    eta: float = setting(0.0, "DDIM eta (0: deterministic, 1: DDPM's posterior variance)", non_negative_float)


@dataclass(frozen=True)
class SamplingSettings(SamplerChoice):
    guidance: float = setting(
        1.0, "classifier-free guidance scale (class-conditional models)", non_negative_float
    )


@dataclass(frozen=True)
class GuidedSamplingSettings(SamplerChoice):
    """vizu_MNIST.py's sampling flags: --guidance may list several scales, each drawn in turn."""

    guidance: tuple[float, ...] = setting(
        (1.0,),
        "classifier-free guidance scale(s) (class-conditional models); several (1,2,4) with --generate: "
        "the same noise drawn with each",
        non_negative_float_tuple,
    )

    def at(self, guidance: float) -> SamplingSettings:
        """The plain sampling settings with one guidance scale."""
        return SamplingSettings(sampler=self.sampler, steps=self.steps, eta=self.eta, guidance=guidance)


@dataclass(frozen=True)
class RunSettings(Settings):
    TITLE = "outputs"
    out_dir: str = setting("checkpoints", "checkpoints, log, loss plot and sample grids")
    resume: str | None = setting(None, "latest (newest checkpoint in --out-dir) or a checkpoint path")
    seed: int = setting(0, "seed for weights, data order, noise and sample grids", seed_number)
    save_every: int = setting(10, "epochs between mnist_epoch_XX.pt files", positive_int)
    sample_every: int = setting(5, "epochs between sample grids", positive_int)
    log_every: int = setting(50, "steps between rows of train_log.csv", positive_int)


SAMPLE_METRICS = ("inception", "classifier", "cas", "memorisation")  # measured on generated samples
METRICS = (*SAMPLE_METRICS, "recon")


def metric_names(text: str) -> tuple[str, ...]:
    """argparse type: a comma-separated subset of METRICS, e.g. 'classifier,recon'."""
    chosen = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not chosen or set(chosen) - set(METRICS):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {', '.join(METRICS)}, got {text!r}"
        )
    return chosen


@dataclass(frozen=True)
class EvaluationSettings(Settings):
    TITLE = "evaluation"
    checkpoint: str | None = setting(
        None,
        "checkpoint: a path, demo (the shipped model), or by default the newest in checkpoints/, else demo; "
        'several (comma-separated, or a quoted glob such as "checkpoints/mnist_epoch_*.pt"): each evaluated, '
        "and the metrics against the epoch in <out-dir>/training_curve.csv and .png",
    )
    ema: bool = setting(True, "use the EMA weights")
    num_samples: int = setting(10000, "images to generate for FID/IS/KID/precision/recall/CAS", positive_int)
    repeats: int = setting(
        1,
        "sample sets (seeds seed, seed+1, ...): each sample metric as mean ± std over them",
        int_between(1, MAX_REPEATS),
    )
    batch_size: int = setting(250, "images per sampler / feature batch", positive_int)
    seed: int = setting(0, "seed of the sampling noise, image subsets and KID subsets", seed_number)
    metrics: tuple[str, ...] = setting(
        METRICS,
        "comma-separated subset of " + ", ".join(METRICS) + " (cas: class-conditional checkpoints only; "
        "the default skips it for others)",
        metric_names,
    )
    inception_weights: str | None = setting(None, "local copy of torch-fidelity's InceptionV3 weights")
    classifier: str | None = setting(
        None, "classifier weights (default: the shipped one for MNIST, else trained once into checkpoints/)"
    )
    cas_epochs: int = setting(10, "epochs of the CAS classifier (class-conditional models)", positive_int)
    baselines: bool = setting(
        False, "also the uniform-noise ceiling (the real-data floor is always reported)"
    )
    baselines_only: bool = setting(False, "only the floor and the ceiling: no checkpoint needed")
    recon_t: tuple[int, ...] | None = setting(
        None,
        "noise levels t of the reconstruction (default: 50,100,250,500,750 below T-1, and T-1)",
        int_tuple,
    )
    num_recon: int = setting(100, "test images to reconstruct per t", positive_int)
    nll: bool = setting(False, "also the NLL bound in bits/dim (Ho et al. eq. 5) on --num-nll test images")
    num_nll: int = setting(1000, "test images of --nll (each costs T model evaluations)", positive_int)
    out_dir: str = setting("eval_outputs", "folder of the default JSON and sample grid")
    json: str | None = setting(None, "JSON report path (default <out-dir>/eval_<checkpoint>.json)")
    cache_dir: str | None = setting(None, "torch-fidelity cache (default $TORCH_HOME/fidelity_cache)")


@dataclass(frozen=True)
class VisualisationSettings(Settings):
    TITLE = "what vizu_MNIST.py shows"
    checkpoint: str | None = setting(
        None,
        "checkpoint: a path, demo (the shipped model), or by default the newest in checkpoints/, else demo",
    )
    ema: bool = setting(True, "use the EMA weights")
    num_images: int = setting(4, "images to reconstruct or generate", positive_int)
    index: tuple[int, ...] = setting(
        (), "comma-separated test-split indices (default: --num-images spread over the classes)", int_tuple
    )
    t: int = setting(500, "reconstruction: noise the images to this step, in [0, T-1]", int, flag="--t")
    t_sweep: bool = setting(False, "final MSE/SSIM of the reconstruction from each --sweep-t")
    sweep_t: tuple[int, ...] | None = setting(
        None, "starting steps of --t-sweep (default: 50,100,250,500,750 below T-1, and T-1)", int_tuple
    )
    generate: bool = setting(False, "sample from pure noise instead of reconstructing test images")
    label: int | None = setting(
        None,
        "class to condition on, for class-conditional checkpoints (default: each test image's own label; "
        "with --generate, 0, 1, 2, ... in turn)",
        int,
    )
    commitment: bool = setting(
        True,
        "the classifier's class of x0-hat at every step: commitment.png/.csv (when the digit is decided)",
    )
    strip_steps: int = setting(10, "columns (steps) in strip.png", positive_int)
    gif_frames: int = setting(60, "most frames in reverse.gif", positive_int)
    out_dir: str = setting("step_outputs_mnist", "where images, CSVs and plots go")
    seed: int = setting(0, "seed for the image choice, the noise and the sampler", seed_number)
    device: str = setting("auto", "auto | cpu | cuda[:N]")
