"""Train the DDPM U-Net on MNIST: AdamW, warm-up + cosine LR, EMA, bf16, DDP, resumable to the bit.
Algorithm 1 of Ho et al. 2020 (arXiv:2006.11239) with the cosine schedule of Nichol & Dhariwal 2021
(arXiv:2102.09672). Writes config.toml (the run's flags), last.pt, <data>_epoch_XX.pt (mnist_epoch_XX.pt
for MNIST), train_log.csv, loss.png and sample grids to --out-dir; Ctrl-C saves last.pt, and --resume
latest continues. Details: docs/training.md.

Examples:
    python train_MNIST.py                                              # 100 epochs of MNIST
    python train_MNIST.py --preset cpu --data mnist-5k --max-minutes 15  # digits on a CPU, offline
    python train_MNIST.py --resume latest                              # continue checkpoints/last.pt
    python train_MNIST.py --config checkpoints/config.toml --out-dir runs/again   # repeat a run
    python train_MNIST.py --batch-size 128 --grad-accum 4              # 4 micro-batches of 32 per step
    torchrun --standalone --nproc_per_node=4 train_MNIST.py            # DistributedDataParallel
"""

from __future__ import annotations

import sys

from ddpm.plumbing.cli import run_cli
from ddpm.plumbing.presets import training_job_from_flags
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
