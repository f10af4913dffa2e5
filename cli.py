"""Command-line plumbing shared by the scripts: one-line errors, argparse types, device, precision, seed.

Every script wraps its `main` in `run_cli`, so a `UserError` (bad flag, missing data, corrupt
checkpoint, unwritable folder) prints one line to stderr and exits with status 2, never a traceback.

Example:
    if __name__ == "__main__":
        run_cli(main)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

USER_ERROR_EXIT_CODE = 2
AMP_MODES = ("auto", "bf16", "fp16", "none")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


def run_cli(main: Callable[[], None]) -> None:
    """Run main(); turn a UserError into `error: <message>` on stderr and exit status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each flag's default to its help, unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UserErrors (run_cli prints one line, not the usage block)
    and whose --help shows every default."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = float(text)
    if not (value > 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def int_tuple(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers, e.g. '1,2,2' -> (1, 2, 2); '' -> ()."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available (use --device cpu)")
    return torch.device(name)


def configure_fast_path(device: torch.device) -> None:
    """TF32 matmuls and convolutions, and cuDNN autotuning, on a GPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cudnn.benchmark = True


def resolve_amp(mode: str, device: torch.device) -> str:
    """auto -> bf16 on a GPU that supports it, else none."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if mode == "auto":
        return "bf16" if bf16_ok else "none"
    if mode == "bf16" and device.type == "cuda" and not bf16_ok:
        raise UserError("--amp bf16: this GPU has no bfloat16 support (use --amp fp16)")
    return mode


def autocast_context(mode: str, device: torch.device) -> AbstractContextManager:
    """The autocast of an --amp mode (auto resolved as resolve_amp does); a no-op for none."""
    amp = resolve_amp(mode, device)
    return nullcontext() if amp == "none" else torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def add_unet_speed_flags(parser: argparse.ArgumentParser) -> None:
    """--amp, --compile, --compile-mode and --channels-last: how the U-Net runs (not what it computes)."""
    add = parser.add_argument
    add(
        "--amp",
        choices=AMP_MODES,
        default="auto",
        help="U-Net autocast dtype; auto: bf16 on a GPU that has it",
    )
    add_compile_flags(parser, "the U-Net")
    add(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="NHWC U-Net weights (faster GPU convs)",
    )


def add_compile_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """--compile (torch.compile `what`) and --compile-mode."""
    add = parser.add_argument
    add("--compile", action=argparse.BooleanOptionalAction, default=False, help=f"torch.compile {what}")
    add(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile mode (reduce-overhead: CUDA graphs)",
    )


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (a no-op on a CPU), so that a host clock times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_with_unet_speed_flags(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace:
    """parser.parse_args, refusing a --compile-mode that would be ignored for want of --compile
    (for any parser with add_compile_flags)."""
    args = parser.parse_args(argv)
    if args.compile_mode != "default" and not args.compile:
        parser.error(f"--compile-mode {args.compile_mode} needs --compile")
    return args


def inference_unet(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """The U-Net as add_unet_speed_flags asks: NHWC weights and/or torch.compile (same parameters)."""
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return compile_unet(model, args.compile_mode) if args.compile else model


def compile_unet(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """torch.compile(model, mode=mode). On a CPU, Inductor builds C++ code at the first forward: a
    missing C++ compiler is a UserError here rather than a traceback then."""
    if next(model.parameters()).device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except RuntimeError:  # torch._inductor.exc.InvalidCxxCompiler, or the Windows checks
            raise UserError(
                "--compile on a CPU needs a C++ compiler for torch.compile (g++ or clang++ on the PATH, "
                "or CXX=...): none found; run without --compile"
            ) from None
    return torch.compile(model, mode=mode)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def writable_dir(path: str | Path) -> Path:
    """Create the folder if needed and check that files can be written in it, else a UserError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output folder {path}: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"output folder {path} is not writable")
    return path
