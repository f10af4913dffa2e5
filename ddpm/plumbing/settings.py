"""Settings declared once: small frozen dataclasses whose fields are the scripts' flags.

Each dataclass field is one flag (`model_channels` -> `--model-channels`) with its type, default and
help; `Settings.add_flags(parser)` adds a dataclass's flags to a parser and `Settings.from_args(args)`
reads them back, so every script and benchmark shares the same names, types and defaults. Library
functions take these dataclasses (or plain keywords), never an argparse namespace. The presets of
train_MNIST.py and the TrainingJob that gathers its settings are in presets.py; the settings of
eval_MNIST.py and vizu_MNIST.py alone are in inference_settings.py.

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
    NONE_WORD,
    float_strictly_between,
    fraction,
    int_between,
    int_tuple,
    int_tuple_between,
    non_negative_float,
    non_negative_float_tuple,
    non_negative_int,
    positive_float,
    positive_float_or_none,
    positive_int,
    seed_number,
)
from ddpm.plumbing.messages import UserError
from ddpm.plumbing.runtime import AMP_MODES, COMPILE_MODES, DEVICE_HELP, SWITCHES
from diffusion import PREDICTIONS, SAMPLERS, SCHEDULES

LR_SCHEDULES = ("cosine", "constant")
CLOCKS = ("wall", "cpu")
TIMESTEP_SAMPLERS = ("uniform", "loss-aware", "log-normal")  # ddpm/training/timestep_sampler.py
MAX_EMA_SIGMA_REL = (1 / 12) ** 0.5  # the power EMA's sigma_rel at exponent gamma = 0 (a plain average)
# Upper limits of the sizes, far above any useful value, so that a typo is one line, not an allocation
# of terabytes: U-Net width, width multiplier per level, residual blocks per level, diffusion steps.
MAX_MODEL_CHANNELS, MAX_CHANNEL_MULT, MAX_RES_BLOCKS, MAX_T = 1024, 16, 16, 100_000
IMAGE_CHANNELS = (1, 3)


def setting(default: Any, help: str, type=None, choices=None, flag: str | None = None):  # noqa: A002
    """A dataclass field that is also a command-line flag."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "flag": flag})


def flag_of(spec: Field[Any]) -> str:
    """The flag of a settings field: its own (`--T`) or its name with dashes (`--batch-size`)."""
    return spec.metadata["flag"] or "--" + spec.name.replace("_", "-")


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
            group.add_argument(flag_of(spec), **options)

    def flag_values(self) -> dict[str, Any]:
        """{flag name without dashes: value} of every field: a config file's keys. None is written
        "none" where the flag takes that word (so that it can override a preset's value)."""
        return {flag_of(spec).removeprefix("--"): self._flag_value(spec) for spec in fields(self)}

    def _flag_value(self, spec: Field[Any]) -> Any:
        value = getattr(self, spec.name)
        return NONE_WORD if value is None and spec.metadata["type"] is positive_float_or_none else value

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
    prediction: str = setting(
        "eps",
        "what the network predicts: eps, v, or edm (Karras et al. 2022's preconditioned F, sigma_data 0.5)",
        choices=PREDICTIONS,
    )
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
    batch_size: int = setting(
        128, "images per optimizer step on each process, whatever --grad-accum (EDM's --batch)", positive_int
    )
    grad_accum: int = setting(
        1,
        "micro-batches per optimizer step: each process's --batch-size images go through the U-Net in K "
        "parts of batch-size / K (less memory, the same step; EDM's --batch-gpu is batch-size / K)",
        positive_int,
    )
    lr: float = setting(2e-4, "peak AdamW learning rate", positive_float)
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay", non_negative_float)
    warmup_steps: int = setting(1000, "linear LR warm-up steps", non_negative_int)
    lr_schedule: str = setting(
        "cosine", "LR after the warm-up (cosine: to 0 at the end)", choices=LR_SCHEDULES
    )
    grad_clip: float = setting(1.0, "clip the gradient norm to this", positive_float)
    ema_decay: float = setting(0.9999, "EMA decay, in [0, 1), reached after a warm-up", fraction)
    ema_sigma_rel: float | None = setting(
        None,
        "EDM2's power-function EMA of this relative width, e.g. 0.1, instead of --ema-decay: its averaging "
        "window grows with the run, for budgets of unknown length (Karras et al. 2024, section 3.1)",
        float_strictly_between(0.0, MAX_EMA_SIGMA_REL),
    )
    min_snr_gamma: float | None = setting(
        None,
        "min-SNR loss weight gamma, e.g. 5, or none: plain MSE (edm: its own weighting)",
        positive_float_or_none,
    )
    p_uncond: float = setting(0.1, "label dropout for classifier-free guidance, in [0, 1)", fraction)
    timestep_sampler: str = setting(
        "uniform",
        "how t is drawn: uniform (Algorithm 1); loss-aware, p_t ~ sqrt(E[L_t^2]) over the last 10 losses "
        "of each t with losses weighted by 1/(T p_t) (Nichol & Dhariwal section 3.3); or log-normal, "
        "ln sigma_t ~ N(-1.2, 1.2^2) (Karras et al. 2022, Table 1)",
        choices=TIMESTEP_SAMPLERS,
    )
    max_steps: int | None = setting(None, "also stop after this many steps", positive_int)
    max_minutes: float | None = setting(
        None, "also stop after this many minutes of training steps (the LR decays over them)", positive_float
    )
    clock: str = setting(
        "wall", "what --max-minutes counts: wall seconds or this process's CPU seconds", choices=CLOCKS
    )

    def __post_init__(self) -> None:
        if self.batch_size % self.grad_accum:
            raise UserError(
                f"--grad-accum {self.grad_accum} does not divide --batch-size {self.batch_size}: "
                "each micro-batch must hold batch-size / grad-accum images"
            )

    @property
    def micro_batch_size(self) -> int:
        """Images per forward and backward pass on each process."""
        return self.batch_size // self.grad_accum


@dataclass(frozen=True)
class RuntimeSettings(Settings):
    TITLE = "where and how the U-Net runs (auto: the fast path on a CUDA GPU, eager fp32 on a CPU or MPS)"
    device: str = setting("auto", DEVICE_HELP)
    amp: str = setting("auto", "autocast dtype; auto: bf16 on a CUDA GPU that has it", choices=AMP_MODES)
    compile: str = setting("auto", "torch.compile the U-Net; auto: on a CUDA GPU", choices=SWITCHES)
    compile_mode: str = setting(
        "auto", "torch.compile mode; auto: reduce-overhead (CUDA graphs) on a GPU", choices=COMPILE_MODES
    )
    channels_last: str = setting("auto", "NHWC U-Net weights; auto: on a CUDA GPU", choices=SWITCHES)


@dataclass(frozen=True)
class SamplerChoice(Settings):
    """The sampling flags SamplingSettings and GuidedSamplingSettings share: sampler, steps, eta."""

    TITLE = "sampling (diffusion.py)"
    sampler: str = setting(
        "heun",
        "reverse process: ddpm (all T steps, or respaced to --steps), ddim, dpm++2m, or heun (Karras et al. "
        "2022: 2 evaluations per noise level, so at least 3 or 4)",
        choices=SAMPLERS,
    )
    steps: int | None = setting(
        None, "model evaluations from t down to 0 (default: min(50, t+1); ddpm: t+1)", positive_int
    )
    eta: float = setting(0.0, "DDIM eta (0: deterministic, 1: DDPM's posterior variance)", non_negative_float)
    s_churn: float = setting(
        0.0,
        "heun: Karras et al.'s S_churn (Algorithm 2; 0: the deterministic Algorithm 1)",
        non_negative_float,
    )


@dataclass(frozen=True)
class SamplingSettings(SamplerChoice):
    guidance: float = setting(
        1.0, "classifier-free guidance scale (class-conditional models)", non_negative_float
    )

    def sampler_options(self) -> dict[str, Any]:
        """These settings as keywords of diffusion.py's sample_progressive / sample / reconstruct."""
        return {
            "sampler": self.sampler,
            "steps": self.steps,
            "eta": self.eta,
            "s_churn": self.s_churn,
            "guidance": self.guidance,
        }


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
        return SamplingSettings(
            sampler=self.sampler, steps=self.steps, eta=self.eta, s_churn=self.s_churn, guidance=guidance
        )


@dataclass(frozen=True)
class RunSettings(Settings):
    TITLE = "outputs"
    out_dir: str = setting("checkpoints", "checkpoints, log, loss plot and sample grids")
    resume: str | None = setting(None, "latest (newest checkpoint in --out-dir) or a checkpoint path")
    seed: int = setting(0, "seed for weights, data order, noise and sample grids", seed_number)
    save_every: int = setting(10, "epochs between mnist_epoch_XX.pt files", positive_int)
    sample_every: int = setting(5, "epochs between sample grids", positive_int)
    eval_every: int = setting(
        10,
        "epochs between quality measures, and after the last (0: none): eval_MNIST.py's classifier-FID, IS, "
        "precision and recall of --eval-samples EMA samples (DDIM 20 steps) to quality_log.csv; best.pt "
        "keeps the lowest FID",
        non_negative_int,
    )
    eval_samples: int = setting(
        1000, "samples per quality measure (at least 4; 10 for a class-conditional model)", positive_int
    )
    log_every: int = setting(50, "steps between rows of train_log.csv", positive_int)
    tensorboard: bool = setting(
        True, "also write each row, the sample grids and the settings as TensorBoard events in --out-dir"
    )
