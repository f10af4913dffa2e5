"""Evaluate a checkpoint: FID / IS / KID / precision / recall against the real-data floor, CAS,
memorisation, reconstruction scores and the NLL bound, with provenance; offline by default.

Samples --num-samples images (DDIM 50 steps by default, fixed noise per --seed) through
sampling.generate_samples and compares them with the test split of the checkpoint's data through
torch-fidelity (feature_metrics.py): with the classifier of classifier.py (the shipped MNIST-5k one
for MNIST; for other data one trained once and cached) and with InceptionV3 when its weights are
there (--inception-weights offline). Every report has the real-data floor at the same count;
--baselines adds the noise ceiling. Class-conditional checkpoints also get CAS. Reconstruction:
test images noised to each --recon-t and denoised back (MSE, PSNR, SSIM on [0, 1] pixels).
--repeats K: K sample sets (seeds seed, seed+1, ...), each number as mean ± std over them (the floor
too). Memorisation: each sample's nearest training image (pixels and classifier features) and the
copy rate, the fraction nearer than the 1st percentile of held-out test images' distances. --nll:
the variational bound in bits/dim (Ho et al. 2020, arXiv:2006.11239, eq. 5) on --num-nll test images.
Several checkpoints (a quoted glob or comma-separated paths): each is evaluated, and FID, IS,
precision, recall and the floor against the epoch go to <out-dir>/training_curve.csv and .png.

Output: a table on the terminal, a JSON file with every metric and its provenance, and beside it a
PNG grid of samples, a PNG of the 16 samples closest to a training image (top row) above those
training images, and a CSV of every sample's nearest training image. Without a checkpoint of your own
it evaluates the shipped demo model.

Examples:
    python eval_MNIST.py --num-samples 1000                          # the newest checkpoint, or the demo
    python eval_MNIST.py --checkpoint checkpoints/last.pt --sampler dpm++2m --steps 20
    python eval_MNIST.py --inception-weights weights-inception-2015-12-05-6726825d.pth --baselines
    python eval_MNIST.py --baselines-only --data mnist-5k            # the floor and ceiling, no model
    python eval_MNIST.py --checkpoint demo --num-samples 500 --repeats 3 --nll --num-nll 100
    python eval_MNIST.py --checkpoint "checkpoints/mnist_epoch_*.pt" --num-samples 1000   # the curve
"""

from __future__ import annotations

import sys

from ddpm.evaluation.curves import evaluate_checkpoints
from ddpm.plumbing.cli import OneLineErrorParser, parse_flags, run_cli
from ddpm.plumbing.settings import DataSettings, EvaluationSettings, RuntimeSettings, SamplingSettings


def parse_args(argv: list[str] | None):
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    EvaluationSettings.add_flags(parser)
    SamplingSettings.add_flags(parser)
    DataSettings.add_checkpoint_flags(parser)
    RuntimeSettings.add_flags(parser)
    args = parse_flags(parser, argv)
    return tuple(
        part.from_args(args) for part in (EvaluationSettings, SamplingSettings, RuntimeSettings, DataSettings)
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    settings, sampling, runtime, data = parse_args(argv)
    print(evaluate_checkpoints(settings, sampling, runtime, data, command=" ".join(["eval_MNIST.py", *argv])))


if __name__ == "__main__":
    run_cli(main)
