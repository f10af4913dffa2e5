"""Evaluate a checkpoint: FID / IS / KID / precision / recall against the real-data floor, CAS and
reconstruction scores, with provenance; offline by default.

Samples --num-samples images (DDIM 50 steps by default, fixed noise per --seed) through
sampling.generate_samples and compares them with the test split of the checkpoint's data through
torch-fidelity (feature_metrics.py): with the classifier of classifier.py (the shipped MNIST-5k one
for MNIST; for other data one trained once and cached) and with InceptionV3 when its weights are
there (--inception-weights offline). Every report has the real-data floor at the same count;
--baselines adds the noise ceiling. Class-conditional checkpoints also get CAS. Reconstruction:
test images noised to each --recon-t and denoised back (MSE, PSNR, SSIM on [0, 1] pixels).

Output: a table on the terminal, a JSON file with every metric and its provenance, and a PNG grid
of samples beside it. Without a checkpoint of your own it evaluates the shipped demo model.

Examples:
    python eval_MNIST.py --num-samples 1000                          # the newest checkpoint, or the demo
    python eval_MNIST.py --checkpoint checkpoints/last.pt --sampler dpm++2m --steps 20
    python eval_MNIST.py --inception-weights weights-inception-2015-12-05-6726825d.pth --baselines
    python eval_MNIST.py --baselines-only --data mnist-5k            # the floor and ceiling, no model
"""

from __future__ import annotations

import sys

from cli import OneLineErrorParser, run_cli
from evaluation import evaluate, format_report
from settings import DataSettings, EvaluationSettings, RuntimeSettings, SamplingSettings


def parse_args(argv: list[str] | None):
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    EvaluationSettings.add_flags(parser)
    SamplingSettings.add_flags(parser)
    DataSettings.add_checkpoint_flags(parser)
    RuntimeSettings.add_flags(parser)
    args = parser.parse_args(argv)
    return tuple(
        part.from_args(args) for part in (EvaluationSettings, SamplingSettings, RuntimeSettings, DataSettings)
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    settings, sampling, runtime, data = parse_args(argv)
    report = evaluate(settings, sampling, runtime, data, command=" ".join(["eval_MNIST.py", *argv]))
    print(format_report(report))
    outputs = report["outputs"]
    print(f"wrote {outputs['json']}" + (f" and {outputs['samples_png']}" if outputs["samples_png"] else ""))


if __name__ == "__main__":
    run_cli(main)
