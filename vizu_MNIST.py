"""Watch the reverse diffusion process step by step: reconstructions of noised test digits, or samples.
Test digits (spread over the classes) are noised to step --t with q(x_t | x_0) (eq. 4 of Ho et al.
2020, arXiv:2006.11239) and denoised back by the checkpoint's sampler, recording at every model
evaluation the MSE and SSIM of x_t and of the predicted x0; --t-sweep tabulates the final MSE/SSIM
from several starting steps, --generate starts from pure noise; --interpolate slerps between
DDIM-inverted digits (Song et al. 2021, arXiv:2010.02502) and --inpaint fills a masked region with
RePaint (Lugmayr et al. 2022, arXiv:2201.09865). Pictures, a GIF and CSVs go to --out-dir. Under
torchrun --generate deals its --batch-size batches over the processes (one process's files); the other
modes run on one process (under torchrun with several they stop with one line). Details:
docs/visualisation.md.

Examples:
    python vizu_MNIST.py                                     # the demo model (or yours), t = 500, DDPM
    python vizu_MNIST.py --checkpoint checkpoints/last.pt --t 500 --sampler ddim --steps 50
    python vizu_MNIST.py --t-sweep --num-images 16 --sampler ddim --steps 100
    python vizu_MNIST.py --generate --num-images 8
    python vizu_MNIST.py --generate --num-images 100 --sampler ddim --steps 50   # when digits are decided
    torchrun --standalone --nproc_per_node=4 vizu_MNIST.py --generate --num-images 100 --batch-size 25
    python vizu_MNIST.py --checkpoint CONDITIONAL.pt --generate --guidance 1,2,4 --num-images 20
    python vizu_MNIST.py --interpolate --index 3,2 --frames 8             # DDIM inversion, 100 steps
    python vizu_MNIST.py --inpaint right --num-images 8                   # RePaint, 100 levels, j = r = 10
"""

from __future__ import annotations

import os

from ddpm.plumbing.cli import OneLineErrorParser, parse_flags, run_cli
from ddpm.plumbing.inference_settings import EditingSettings, VisualisationSettings
from ddpm.plumbing.messages import UserError
from ddpm.plumbing.processes import end_processes, setup_processes
from ddpm.plumbing.settings import DataSettings, GuidedSamplingSettings
from ddpm.visualisation.visualise import DEFAULT_SAMPLING, visualise

SETTINGS = (VisualisationSettings, GuidedSamplingSettings, DataSettings, EditingSettings)
STEPS_HELP = (
    "model evaluations from t down to 0 (default: min(50, t+1); ddpm always t+1); --interpolate: DDIM steps "
    "of the inversion and of each decoding (default 100); --inpaint: RePaint's noise levels (default 100)"
)


def parse_args(argv: list[str] | None):
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    VisualisationSettings.add_flags(parser)
    GuidedSamplingSettings.add_flags(parser, DEFAULT_SAMPLING, {"steps": STEPS_HELP})
    DataSettings.add_checkpoint_flags(parser)
    EditingSettings.add_flags(parser)
    args = parse_flags(parser, argv)
    return tuple(part.from_args(args) for part in SETTINGS)


def main(argv: list[str] | None = None) -> None:
    settings, sampling, data, editing = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not settings.generate:  # a few images: nothing to split
        raise UserError(
            f"only --generate splits over torchrun processes: run {mode_name(settings, editing)} with "
            "python, not torchrun --nproc_per_node N"
        )
    processes = setup_processes(settings.device)  # torchrun: the ranks share --generate's samples
    try:
        text = visualise(settings, sampling, data, editing, processes)
        if processes.is_main:
            print(text)
    finally:
        end_processes()


def mode_name(settings: VisualisationSettings, editing: EditingSettings) -> str:
    """The chosen mode's flag, for messages ("reconstruction" when none is given)."""
    if settings.t_sweep:
        return "--t-sweep"
    if editing.interpolate:
        return "--interpolate"
    return "--inpaint" if editing.inpaint is not None else "reconstruction"


if __name__ == "__main__":
    run_cli(main)
