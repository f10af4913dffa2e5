"""What a result was measured with: file and tensor hashes, library versions, the hardware.

Example:
    report["provenance"] = {"versions": library_versions(), "device": hardware(device)}
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path

import numpy as np
import torch

HASH_CHUNK_BYTES = 1 << 20


def sha256_of_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of_tensor(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def library_versions() -> dict[str, str]:
    """Python, torch, torchvision, torch-fidelity, NumPy and scikit-image versions."""
    import torch_fidelity
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_fidelity": torch_fidelity.__version__,
        "numpy": np.__version__,
        "scikit_image": importlib.metadata.version("scikit-image"),  # its stubs lack __version__
    }


def hardware(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"CPU {names[0] if names else platform.machine()}, {os.cpu_count()} cores"
