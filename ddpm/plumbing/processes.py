"""The processes of a run: one alone, or the ranks of a torchrun job (training's DistributedDataParallel,
evaluation's samples split over the ranks).

`setup_processes` joins the torchrun job when RANK is set (gloo on a CPU, nccl on CUDA), else runs
alone as rank 0 of 1. `Processes` says where this process stands and carries the few collective
operations the trainer and the evaluation need: the maxima of the trainer's stop-rule values (a
signal to any rank stops them all), gathering RNG states for the checkpoint and the evaluation's
sample sets, and checking at the end of training that every rank holds the same weights (one SHA-256
per tensor, provenance.sha256_of_tensor). Data parallelism as in PyTorch's DDP (Li et al. 2020,
arXiv:2006.15704).

Example:
    processes = setup_processes("auto")
    processes.announce(f"rank {processes.rank} of {processes.world_size} on {processes.device}")
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from ddpm.plumbing.messages import UserError
from ddpm.plumbing.provenance import sha256_of_tensor
from ddpm.plumbing.runtime import resolve_device


class Processes(NamedTuple):
    """This process's place in a torchrun job (rank 0 of 1 without torchrun) and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def announce(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def maxima(self, values: list[float]) -> list[float]:
        """Each value's maximum over the ranks (the values themselves without DDP)."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """values averaged over the ranks (values itself without DDP)."""
        if self.world_size == 1:
            return values
        dist.all_reduce(values)
        return values / self.world_size

    def concatenated(self, tensor: torch.Tensor) -> torch.Tensor:
        """tensor [N, ...] (the same N on every rank) from every rank, concatenated in rank order
        [world_size * N, ...] (tensor itself without DDP)."""
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def gather(self, value: Any) -> list[Any]:
        """value from every rank, in rank order."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered


def setup_processes(device_name: str) -> Processes:
    """Join the torchrun job when RANK is set (gloo on CPU, nccl on CUDA), else run alone."""
    device = resolve_device(device_name)
    if "RANK" not in os.environ:
        return Processes(rank=0, world_size=1, device=device)
    if device.type == "mps":
        raise UserError("torchrun on MPS: torch.distributed has no MPS backend (run one process)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def end_processes() -> None:
    """Leave the torchrun job, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def replicas_agree(model: torch.nn.Module, processes: Processes) -> bool:
    """Whether every rank holds bit-identical weights (a SHA-256 of each tensor, compared over ranks)."""
    hashes = [sha256_of_tensor(tensor) for tensor in model.state_dict().values()]
    return len({tuple(rank_hashes) for rank_hashes in processes.gather(hashes)}) == 1
