"""Train the DDPM U-Net on MNIST: AdamW, warm-up + cosine LR, EMA, bf16, DDP, resumable to the bit.

Algorithm 1 of Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239), with
the cosine schedule of Nichol & Dhariwal 2021 (arXiv:2102.09672); the loop is ddpm/training/loop.py's.
On a GPU the defaults take the fast path (bf16, torch.compile with CUDA graphs, NHWC); on a CPU, eager
fp32.

Writes to --out-dir: last.pt (every epoch and at any stop), <data>_epoch_XX.pt (every --save-every
epochs: mnist_epoch_XX.pt for MNIST and MNIST-5k, cifar10_epoch_XX.pt, the folder's name for
--data-dir), train_log.csv, loss.png and samples_epoch_XX.png (EMA weights, fixed noise, DDIM 50 steps).
Ctrl-C or SIGTERM saves last.pt and exits; `--resume latest` continues where the run stopped.

Examples:
    python train_MNIST.py                                              # 100 epochs of MNIST
    python train_MNIST.py --preset cpu --data mnist-5k --max-minutes 15  # digits on a CPU, offline
    python train_MNIST.py --resume latest                              # continue checkpoints/last.pt
    torchrun --standalone --nproc_per_node=4 train_MNIST.py            # DistributedDataParallel
"""

from __future__ import annotations

import sys

from ddpm.plumbing.cli import run_cli
from ddpm.plumbing.settings import training_job_from_flags
from ddpm.training.trainer import train


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    result = train(training_job_from_flags(argv, description=__doc__.split("\n\n")[0]))
    position = f"step {result.step} ({result.epoch} epochs + {result.batch_in_epoch} batches)"
    if result.signal_number is None:
        if result.is_main:
            print(f"{position}, stopped by {result.stopped_by}: {result.out_dir / 'last.pt'}")
        return
    if result.is_main:
        print(
            f"stopped by {result.stopped_by} at {position}: saved {result.out_dir / 'last.pt'}, "
            "continue with --resume latest"
        )
    raise SystemExit(128 + result.signal_number)


if __name__ == "__main__":
    run_cli(main)
