"""Where and how the U-Net runs: device, autocast precision, TF32, torch.compile, NHWC, seeding.

The fast path is the default where it is fast: with `auto` (the default of every speed flag) a
CUDA GPU gets bf16 autocast, torch.compile with CUDA graphs ("reduce-overhead") and channels_last
weights, and a CPU runs eager in fp32. bf16 autocast pays on a CPU only where the CPU computes
bfloat16 itself (AVX512-BF16 or AMX, `cpu_has_native_bf16`); elsewhere torch emulates it, many times
slower than fp32, and `--amp bf16` on such a CPU says so in one line. If compiling fails (no C++
compiler, an unsupported GPU, a torch error), the run goes on eager after one line that says why.

`--device auto` takes a CUDA GPU, else an Apple-silicon GPU (MPS), else the CPU (`choose_device`).
On MPS `auto` means eager fp32: --amp fp16 / bf16 and --compile on are there to opt in (bf16
autocast needs macOS 14; older ones fall back to fp32 after one line), as MPS's Inductor backend and
its fp16 grad scaling are younger than CUDA's and were never measured here.

Example:
    plan = plan_speed(amp="auto", compile="auto", compile_mode="auto", channels_last="auto", device=device)
    unet = prepare_unet(unet, plan)          # NHWC and/or compiled as planned
    with autocast_context(plan.amp, device):
        images = diffusion.sample(unet, 16, image_shape=(1, 28, 28))
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from ddpm.plumbing.messages import UserError, note

DEVICE_PATTERN = re.compile(r"cpu|mps|cuda(:\d+)?")  # what --device may name besides auto
DEVICE_HELP = "auto (cuda, else mps, else cpu) | cpu | cuda[:N] | mps (an Apple-silicon GPU)"
MPS_BF16_MACOS = (14, 0)  # bf16 autocast on MPS needs macOS 14 or newer
AMP_MODES = ("auto", "bf16", "fp16", "none")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SWITCHES = ("auto", "on", "off")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GPU_COMPILE_MODE = "reduce-overhead"  # CUDA graphs: at batch 128 the eager step is bound by the host
MULTI_PROCESS_COMPILE_MODE = "default"  # CUDA graphs under DDP were never measured here


def resolve_device(name: str) -> torch.device:
    """The device --device NAME names on this machine (choose_device); a UserError if it is absent."""
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return choose_device(name, cuda_count=cuda_count, mps=torch.backends.mps.is_available())


def choose_device(name: str, cuda_count: int, mps: bool) -> torch.device:
    """--device NAME on a machine with `cuda_count` CUDA GPUs and (or not) an Apple-silicon GPU:
    'auto' -> cuda, else mps, else cpu; a device that is not there is a UserError."""
    if name == "auto":
        return torch.device("cuda" if cuda_count else "mps" if mps else "cpu")
    if not DEVICE_PATTERN.fullmatch(name):
        raise UserError(f"--device must be auto, cpu, cuda[:N] or mps, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda" and not cuda_count:
        raise UserError("--device cuda was asked for, but no CUDA GPU is available (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= cuda_count:
        raise UserError(f"--device {name}: this machine has {cuda_count} CUDA GPU(s)")
    if device.type == "mps" and not mps:
        raise UserError(
            "--device mps was asked for, but no Apple-silicon GPU (MPS) is available (use --device cpu)"
        )
    return device


def configure_fast_path(device: torch.device) -> None:
    """TF32 matmuls and convolutions, and cuDNN autotuning, on a GPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"  # type: ignore[attr-defined]  # not in torch's stubs
        torch.backends.cudnn.benchmark = True


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX tiles). Without either, a
    training step of the cpu preset under bf16 autocast took 13x as long as in fp32 (AMD EPYC Zen 2,
    AVX2; docs/benchmarks.md); with them bf16 is the faster of the two."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_amp(mode: str, device: torch.device, announce: Callable[[str], None] = note) -> str:
    """auto -> bf16 on a CUDA GPU that supports it, else none (on MPS too: fp32 until asked). An
    explicit mode the device lacks: a UserError on CUDA, fp32 after one line on MPS, and bf16 after
    one line on a CPU that only emulates it."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if mode == "auto":
        return "bf16" if bf16_ok else "none"
    if mode == "bf16" and device.type == "cuda" and not bf16_ok:
        raise UserError("--amp bf16: this GPU has no bfloat16 support (use --amp fp16)")
    if mode == "bf16" and device.type == "mps" and not torch.backends.mps.is_macos_or_newer(*MPS_BF16_MACOS):
        announce("--amp bf16 on MPS needs macOS 14 or newer: running fp32 (or use --amp fp16)")
        return "none"
    if mode == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        announce(
            "--amp bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so autocast emulates it, "
            "many times slower than fp32 (--amp none)"
        )
    return mode


def autocast_context(amp: str, device: torch.device) -> AbstractContextManager:
    """The autocast of a resolved amp mode (a SpeedPlan's: none, bf16 or fp16); a no-op for none.
    Called at every step, so it judges nothing: plan_speed resolved the mode once."""
    return nullcontext() if amp == "none" else torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (a no-op on a CPU), so that a host clock times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class SpeedPlan:
    """How the U-Net runs, every 'auto' resolved for one device."""

    amp: str
    compile: bool
    compile_mode: str
    channels_last: bool

    def describe(self) -> str:
        compiled = f"compiled ({self.compile_mode})" if self.compile else "eager"
        return f"amp {self.amp}, {compiled}{', channels_last' if self.channels_last else ''}"


def plan_speed(
    amp: str, compile: str, compile_mode: str, channels_last: str, device: torch.device, processes: int = 1
) -> SpeedPlan:
    """Resolve the speed flags: `auto` means the fast path on CUDA (bf16, compiled with CUDA graphs,
    NHWC) and eager fp32 on a CPU or MPS. A --compile-mode that would be ignored is a UserError."""
    on_cuda = device.type == "cuda"
    compiled = {"auto": on_cuda, "on": True, "off": False}[compile]
    if compile_mode != "auto" and not compiled:
        raise UserError(f"--compile-mode {compile_mode} needs --compile on (or auto on a CUDA GPU)")
    if compile_mode == "auto":
        compile_mode = GPU_COMPILE_MODE if on_cuda and processes == 1 else MULTI_PROCESS_COMPILE_MODE
    nhwc = {"auto": on_cuda, "on": True, "off": False}[channels_last]
    return SpeedPlan(resolve_amp(amp, device), compiled, compile_mode, nhwc)


def prepare_unet(model: nn.Module, plan: SpeedPlan, announce: Callable[[str], None] = note) -> nn.Module:
    """The U-Net as the plan asks: NHWC weights (in place) and/or compiled with an eager fallback."""
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return compile_or_eager(model, plan.compile_mode, announce) if plan.compile else model


def compile_or_eager(model: nn.Module, mode: str, announce: Callable[[str], None] = note) -> nn.Module:
    """torch.compile(model, mode=mode) behind an `EagerFallback`; the model itself when compiling
    cannot even start (on a CPU, Inductor needs a C++ compiler), after one line saying why."""
    if next(model.parameters()).device.type == "cpu" and not _has_cpp_compiler():
        announce("torch.compile on a CPU needs a C++ compiler (g++ or clang++, or CXX=...): running eager")
        return model
    try:
        compiled = torch.compile(model, mode=mode)
    except Exception as error:  # noqa: BLE001 - any failure to compile means: run eager
        announce(f"torch.compile failed ({_first_line(error)}): running eager")
        return model
    return EagerFallback(model, compiled, announce)


class EagerFallback(nn.Module):
    """Runs the compiled module; if it raises at its first call (when torch.compile compiles) or raises
    a torch._dynamo error later (a recompilation), says so in one line and runs the eager module from
    then on. Attributes such as `num_classes` are the eager module's."""

    compiled: Callable[..., torch.Tensor] | None  # in __dict__, not a submodule

    def __init__(self, model: nn.Module, compiled: Callable, announce: Callable[[str], None]):
        super().__init__()
        self.model = model
        self.__dict__["compiled"] = compiled  # not a submodule: the parameters are the model's
        self.announce, self.succeeded_once = announce, False

    @property
    def num_classes(self) -> int | None:
        return cast(int | None, self.model.num_classes)

    def forward(self, *inputs, **kwargs):
        if self.compiled is not None:
            try:
                output = self.compiled(*inputs, **kwargs)
            except Exception as error:  # noqa: BLE001
                if self.succeeded_once and not isinstance(error, torch._dynamo.exc.TorchDynamoException):
                    raise
                self.announce(f"torch.compile failed ({_first_line(error)}): running eager")
                self.__dict__["compiled"] = None
            else:
                self.succeeded_once = True
                return output
        return self.model(*inputs, **kwargs)


def _has_cpp_compiler() -> bool:
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except RuntimeError:  # torch._inductor.exc.InvalidCxxCompiler, or the Windows checks
        return False
    return True


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
