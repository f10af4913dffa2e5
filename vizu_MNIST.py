"""Watch the reverse diffusion process step by step: reconstructions of noised test digits, or samples.
Test digits (spread over the classes) are noised to step --t with q(x_t | x_0) (eq. 4 of Ho et al.
2020, arXiv:2006.11239) and denoised back by the checkpoint's sampler, recording at every model
evaluation the MSE and SSIM of x_t and of the predicted x0; --t-sweep tabulates the final MSE/SSIM
from several starting steps, --generate starts from pure noise. Pictures, a GIF and CSVs go to
--out-dir. Details: docs/visualisation.md.

Examples:
    python vizu_MNIST.py                                     # the demo model (or yours), t = 500, DDPM
    python vizu_MNIST.py --checkpoint checkpoints/last.pt --t 500 --sampler ddim --steps 50
    python vizu_MNIST.py --t-sweep --num-images 16 --sampler ddim --steps 100
    python vizu_MNIST.py --generate --num-images 8
    python vizu_MNIST.py --generate --num-images 100 --sampler ddim --steps 50   # when digits are decided
    python vizu_MNIST.py --checkpoint CONDITIONAL.pt --generate --guidance 1,2,4 --num-images 20
"""

from __future__ import annotations

from ddpm.plumbing.cli import OneLineErrorParser, parse_flags, run_cli
from ddpm.plumbing.settings import DataSettings, GuidedSamplingSettings, VisualisationSettings
from ddpm.visualisation.visualise import visualise


def parse_args(argv: list[str] | None):
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    VisualisationSettings.add_flags(parser)
    GuidedSamplingSettings.add_flags(parser, GuidedSamplingSettings(sampler="ddpm"))
    DataSettings.add_checkpoint_flags(parser)
    args = parse_flags(parser, argv)
    return tuple(
        part.from_args(args) for part in (VisualisationSettings, GuidedSamplingSettings, DataSettings)
    )


def main(argv: list[str] | None = None) -> None:
    print(visualise(*parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
