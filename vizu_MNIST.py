"""Watch the reverse diffusion process step by step: reconstructions of noised test digits, or samples.

Reconstruction (default): take test digits (spread over the classes), noise them to step --t with
q(x_t | x_0) (eq. 4 of Ho et al. 2020, arXiv:2006.11239), run the checkpoint's reverse process back
to the clean end with `diffusion.reconstruct`, and record at every model evaluation the MSE and SSIM
of x_t and of the predicted x0 against the original ([0, 1] scale, skimage SSIM with data_range=1).
--t-sweep repeats the reconstruction from several starting steps and tabulates the final MSE/SSIM.
--generate starts from pure noise instead and records how much the predicted x0 still changes.

Files written to --out-dir:
  reconstruction  original.png noised.png denoised.png strip.png curves.png metrics.csv reverse.gif
  --t-sweep       t_sweep.csv t_sweep.png (and a table on the terminal)
  --generate      generated.png strip.png curves.png metrics.csv reverse.gif (several --guidance
                  values: each file suffixed _guidance<g>)
  and, unless --no-commitment, commitment.png commitment.csv: when the digit is decided (the
  classifier's class of x0-hat at every step)
strip.png has one row per image and one column per step (about --strip-steps of them); each cell shows
x_t on top of the predicted x0. reverse.gif shows x_t (top row) and the predicted x0 (bottom row).

Conventions: timesteps as in diffusion.py, t in {0..T-1} with the finished image reported as t = -1.
--steps counts model evaluations from t down to 0: DDPM always makes t + 1 of them; DDIM and
DPM-Solver++ make 1..t+1 (in --t-sweep, at most t+1). Without a checkpoint of your own it shows the
shipped demo model. Papers: DDIM, Song et al. 2021 (arXiv:2010.02502); DPM-Solver++, Lu et al. 2022
(arXiv:2211.01095); classifier-free guidance, Ho & Salimans 2022 (arXiv:2207.12598); SSIM, Wang et
al. 2004 (IEEE TIP 13(4), no arXiv id).

Examples:
    python vizu_MNIST.py                                     # the demo model (or yours), t = 500, DDPM
    python vizu_MNIST.py --checkpoint checkpoints/last.pt --t 500 --sampler ddim --steps 50
    python vizu_MNIST.py --t-sweep --num-images 16 --sampler ddim --steps 100
    python vizu_MNIST.py --generate --num-images 8
    python vizu_MNIST.py --generate --num-images 100 --sampler ddim --steps 50   # when digits are decided
    python vizu_MNIST.py --checkpoint CONDITIONAL.pt --generate --guidance 1,2,4 --num-images 20
"""

from __future__ import annotations

from ddpm.plumbing.cli import OneLineErrorParser, run_cli
from ddpm.plumbing.settings import DataSettings, GuidedSamplingSettings, VisualisationSettings
from ddpm.visualisation.visualise import visualise


def parse_args(argv: list[str] | None):
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    VisualisationSettings.add_flags(parser)
    GuidedSamplingSettings.add_flags(parser, GuidedSamplingSettings(sampler="ddpm"))
    DataSettings.add_checkpoint_flags(parser)
    args = parser.parse_args(argv)
    return tuple(
        part.from_args(args) for part in (VisualisationSettings, GuidedSamplingSettings, DataSettings)
    )


def main(argv: list[str] | None = None) -> None:
    print(visualise(*parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
