"""Evaluate a checkpoint: FID / IS / KID / precision / recall against the real-data floor, CAS,
memorisation, reconstruction scores and the NLL bound, with provenance; offline by default. Prints a
table and writes a JSON report with a sample grid beside it (docs/evaluation.md says what each
number means); several checkpoints also give the metrics against the epoch. --save-samples writes every
sample (a PNG folder or guided-diffusion's .npz); under torchrun the ranks share the sampling and rank
0 scores, prints and writes.

Examples:
    python eval_MNIST.py --num-samples 1000                          # the newest checkpoint, or the demo
    python eval_MNIST.py --checkpoint checkpoints/last.pt --sampler dpm++2m --steps 20
    python eval_MNIST.py --inception-weights weights-inception-2015-12-05-6726825d.pth --baselines
    python eval_MNIST.py --baselines-only --data mnist-5k            # the floor and ceiling, no model
    python eval_MNIST.py --checkpoint demo --num-samples 500 --repeats 3 --nll --num-nll 100
    python eval_MNIST.py --checkpoint "checkpoints/mnist_epoch_*.pt" --num-samples 1000   # the curve
    python eval_MNIST.py --num-samples 10000 --save-samples eval_outputs/samples        # 000000.png ...
    torchrun --nproc_per_node 2 eval_MNIST.py --num-samples 10000  # the samples split over 2 processes
"""

from __future__ import annotations

import sys
from dataclasses import replace

from ddpm.evaluation.curves import evaluate_over_training
from ddpm.evaluation.evaluate import evaluate, sample_for_rank_0
from ddpm.evaluation.report import format_report, wrote_line
from ddpm.plumbing.checkpointing import resolve_checkpoints
from ddpm.plumbing.cli import OneLineErrorParser, parse_flags, run_cli
from ddpm.plumbing.inference_settings import EvaluationSettings
from ddpm.plumbing.processes import end_processes, setup_processes
from ddpm.plumbing.settings import DataSettings, RuntimeSettings, SamplingSettings


def parse_args(
    argv: list[str] | None,
) -> tuple[EvaluationSettings, SamplingSettings, RuntimeSettings, DataSettings]:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    EvaluationSettings.add_flags(parser)
    SamplingSettings.add_flags(parser)
    DataSettings.add_checkpoint_flags(parser)
    RuntimeSettings.add_flags(parser)
    args = parse_flags(parser, argv)
    return (
        EvaluationSettings.from_args(args),
        SamplingSettings.from_args(args),
        RuntimeSettings.from_args(args),
        DataSettings.from_args(args),
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    settings, sampling, runtime, data = parse_args(argv)
    command = " ".join(["eval_MNIST.py", *argv])
    checkpoints = resolve_checkpoints(settings.checkpoint)
    processes = setup_processes(runtime.device)  # torchrun: the ranks share the sampling
    try:
        if not processes.is_main:
            for path in checkpoints:
                sample_for_rank_0(replace(settings, checkpoint=str(path)), sampling, runtime, processes)
        elif len(checkpoints) > 1:
            print(evaluate_over_training(checkpoints, settings, sampling, runtime, data, command, processes))
        else:
            one = replace(settings, checkpoint=str(checkpoints[0]))
            report = evaluate(one, sampling, runtime, data, command, processes)
            print(format_report(report) + "\n" + wrote_line(report.outputs))
    finally:
        end_processes()


if __name__ == "__main__":
    run_cli(main)
