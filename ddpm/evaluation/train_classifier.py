"""Train the small CNN behind the classifier metrics (classifier.py) on a data set and save it.

The MNIST-5k classifier that eval_MNIST.py uses by default for --data mnist and mnist-5k is shipped
in weights/ and was made by the first example below; other data sets get theirs trained once by
eval_MNIST.py itself, or by this script.

Examples (about two minutes on a 2-core CPU for MNIST-5k):
    python -m ddpm.evaluation.train_classifier --data mnist-5k --out weights/classifier_mnist5k.pt
    python -m ddpm.evaluation.train_classifier --data fashion-mnist  # checkpoints/classifier_fashion-mnist.pt
"""

from __future__ import annotations

from ddpm.evaluation.classifier import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    MIN_STEPS,
    train_and_save,
)
from ddpm.plumbing.cli import OneLineErrorParser, parse_flags, positive_float, positive_int, run_cli
from ddpm.plumbing.runtime import resolve_device
from ddpm.plumbing.settings import DataSettings


def parse_args(argv: list[str] | None = None):
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    DataSettings.add_flags(parser, names=("data", "data_dir", "image_size", "channels"))
    add = parser.add_argument
    add("--out", default=None, help="weights file (default: classifier.default_classifier_path of the data)")
    add(
        "--epochs",
        type=positive_int,
        default=None,
        help=f"passes over the train split (default: {DEFAULT_EPOCHS}, more for fewer than "
        f"{MIN_STEPS} batches in all)",
    )
    add("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="training batch size")
    add("--lr", type=positive_float, default=DEFAULT_LR, help="Adam learning rate")
    add("--seed", type=int, default=0, help="seed of the initial weights and batch order")
    add("--device", default="auto", help="auto | cpu | cuda[:N]")
    return parse_flags(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = DataSettings.from_args(args)
    info = train_and_save(
        args.out,
        data.data,
        data.data_dir,
        args.epochs,
        args.batch_size,
        args.lr,
        args.seed,
        resolve_device(args.device),
        data.image_size,
        data.channels,
    )
    accuracy = f"{info['test_accuracy']:.4f}"
    print(
        f"test accuracy on {info['data']} test ({info['num_test']} images): {accuracy}; saved {info['path']}"
    )


if __name__ == "__main__":
    run_cli(main)
