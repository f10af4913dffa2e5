"""Quality during training: eval_MNIST.py's classifier metrics at epoch ends, quality_log.csv and best.pt.

Every --eval-every epochs and after the last one, rank 0 draws --eval-samples images from the EMA
weights (DDIM 20 steps, sample i's noise a function of (--seed, i): sampling.generate_samples) and
scores them with eval_MNIST.py's own code: the data's classifier and test split read once per run
(scoring.classifier_comparison, the classifier eval takes by default, trained and cached once where
none exists), then scoring.set_scores through torch-fidelity: classifier-FID (Heusel et al. 2017,
arXiv:1706.08500), IS (Salimans et al. 2016, arXiv:1606.03498) and precision/recall (Kynkaanniemi et
al. 2019, arXiv:1904.06991). The numbers are those of `eval_MNIST.py --checkpoint <that epoch's
checkpoint> --num-samples N --sampler ddim --steps 20 --metrics classifier --seed S` (equal to the
bit on a CPU; on a GPU eval compiles the U-Net, so the last digits may differ), as lucidrains'
denoising-diffusion-pytorch measures FID while it trains. Each measure is a row of quality_log.csv
and a line on the terminal; best.pt is the checkpoint of the lowest FID yet, with its QualityRecord
under "quality", and is only ever replaced by a lower FID than the one it holds (also after a
resume). The measure runs with the budget clock paused (--max-minutes does not count it) and with
every RNG state put back afterwards, so that it changes nothing in the training. Under torchrun
the other ranks wait at a barrier. Data of one class (no classifier metrics) skips it with one note.

Example:
    quality = prepare_quality(job, processes, out_dir, data_labels, steps_per_epoch, diffusion, ...)
    record = quality.measure(state)  # rank 0: a QualityRecord; the other ranks wait, and get None
    quality.keep_best(record, checkpoint)
    quality.log(record)
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ddpm.datasets.checks import NUM_CLASSES, DataUnavailableError
from ddpm.evaluation.feature_metrics import Comparison, ImageSet
from ddpm.evaluation.image_metrics import to_uint8
from ddpm.evaluation.inputs import check_counts
from ddpm.evaluation.records import FidelityScores
from ddpm.evaluation.scoring import classifier_comparison, set_scores
from ddpm.plumbing.checkpointing import load_checkpoint, save_checkpoint
from ddpm.plumbing.inference_settings import EvaluationSettings
from ddpm.plumbing.messages import UserError, note
from ddpm.plumbing.output_files import write_csv
from ddpm.plumbing.presets import TrainingJob
from ddpm.plumbing.processes import Processes
from ddpm.plumbing.settings import SamplingSettings
from ddpm.sampling import generate_samples
from ddpm.training.state import TrainingState, capture_rng_states, restore_rng_states
from diffusion import GaussianDiffusion

QUALITY_LOG_NAME, BEST_NAME = "quality_log.csv", "best.pt"
QUALITY_FIELDS = ("step", "epoch", "fid", "is", "precision", "recall", "seconds")
EVAL_SAMPLER, EVAL_STEPS = "ddim", 20  # eval_MNIST.py --sampler ddim --steps 20
EVAL_METRICS = ("classifier",)  # eval_MNIST.py --metrics classifier


@dataclass(frozen=True)
class QualityRecord:
    """One measure: the position of the run, the classifier metrics of num_samples EMA samples, and
    the wall seconds the measure took (sampling and scoring)."""

    step: int
    epoch: int
    fid: float
    is_mean: float
    precision: float
    recall: float
    seconds: float
    num_samples: int

    def scalars(self) -> dict[str, float]:
        """The measured numbers by their quality_log.csv column: fid, is, precision, recall, seconds."""
        return {
            "fid": self.fid,
            "is": self.is_mean,
            "precision": self.precision,
            "recall": self.recall,
            "seconds": self.seconds,
        }

    def row(self) -> list[Any]:
        """The quality_log.csv row, in QUALITY_FIELDS order."""
        values = {"step": self.step, "epoch": self.epoch} | self.scalars()
        return [values[name] for name in QUALITY_FIELDS]


@dataclass(kw_only=True)
class TrainingQuality:
    """What a run needs to measure its quality at epoch ends: read once when it starts (comparison:
    the classifier and the test split, on rank 0 only), and the best FID in best.pt so far."""

    processes: Processes
    out_dir: Path
    every: int
    epochs: int
    settings: EvaluationSettings  # num_samples, seed and batch size, as eval_MNIST.py takes them
    diffusion: GaussianDiffusion
    image_shape: tuple[int, int, int]
    amp: str
    comparison: Comparison | None  # None on ranks other than 0
    rows: list[list[Any]] = field(default_factory=list)  # quality_log.csv's rows, header excluded
    best: dict[str, Any] | None = None  # best.pt's QualityRecord, as a dict

    def due(self, epoch: int) -> bool:
        """Whether the end of `epoch` (1-based) is measured: every --eval-every epochs and the last."""
        return epoch % self.every == 0 or epoch == self.epochs

    def measure(self, state: TrainingState) -> QualityRecord | None:
        """Rank 0 samples from the EMA weights and scores the samples (every RNG state put back after);
        the other ranks wait for it at a barrier and get None."""
        record = None
        if self.comparison is not None:
            rng_states = capture_rng_states(self.processes.device)
            start = time.perf_counter()
            scores = self.scores(state.ema.module.eval())
            seconds = time.perf_counter() - start
            restore_rng_states(rng_states, self.processes.device)
            record = QualityRecord(
                step=state.step,
                epoch=state.epoch,
                fid=scores.fid,
                is_mean=scores.is_mean,
                precision=scores.precision,
                recall=scores.recall,
                seconds=seconds,
                num_samples=self.settings.num_samples,
            )
        if self.processes.world_size > 1:
            dist.barrier()
        return record

    def scores(self, ema: torch.nn.Module) -> FidelityScores:
        """The classifier's FidelityScores of --eval-samples images drawn as eval_MNIST.py draws them."""
        assert self.comparison is not None, "only rank 0 holds the classifier"
        samples, _ = generate_samples(
            ema,
            self.diffusion,
            self.settings.num_samples,
            sampling=SamplingSettings(sampler=EVAL_SAMPLER, steps=min(EVAL_STEPS, self.diffusion.T)),
            image_shape=self.image_shape,
            seed=self.settings.seed,
            device=self.processes.device,
            amp=self.amp,
            batch_size=self.settings.batch_size,
            progress=False,
        )
        scores = set_scores(ImageSet(to_uint8(samples)), self.comparison).classifier
        assert scores is not None, "the comparison's one extractor is the classifier"
        return scores

    def keep_best(self, record: QualityRecord, checkpoint: dict[str, Any] | None) -> None:
        """Write checkpoint (the one just saved, with the record under "quality") to best.pt if its FID
        is the lowest yet: lower than the one best.pt holds."""
        if checkpoint is None or (self.best is not None and record.fid >= self.best["fid"]):
            return
        self.best = asdict(record)
        save_checkpoint(checkpoint | {"quality": self.best}, self.out_dir / BEST_NAME)

    def log(self, record: QualityRecord) -> None:
        """A row of quality_log.csv (the file rewritten whole) and a line on the terminal."""
        self.rows.append(record.row())
        write_csv([QUALITY_FIELDS, *self.rows], self.out_dir / QUALITY_LOG_NAME)
        best = (
            "" if self.best is None else f"; best.pt: FID {self.best['fid']:.2f} at step {self.best['step']}"
        )
        self.processes.announce(
            f"quality at epoch {record.epoch} (step {record.step}): classifier-FID {record.fid:.2f}, "
            f"IS {record.is_mean:.2f}, precision {record.precision:.3f}, recall {record.recall:.3f} "
            f"on {record.num_samples:,} EMA samples (DDIM {min(EVAL_STEPS, self.diffusion.T)} steps) "
            f"in {record.seconds:.1f} s, not counted by --max-minutes{best}"
        )


def prepare_quality(
    job: TrainingJob,
    processes: Processes,
    out_dir: Path,
    *,
    labels: torch.Tensor,
    steps_per_epoch: int,
    epochs_done: int,
    resume_step: int | None,
    diffusion: GaussianDiffusion,
    image_shape: tuple[int, int, int],
    amp: str,
) -> TrainingQuality | None:
    """The quality measures of a run, or None: --eval-every 0, a run that stops (--max-steps) before
    its next measure, or data of one class (one note). --eval-samples is checked first, on every rank;
    rank 0 then reads the classifier and the test split, best.pt's score and quality_log.csv's rows up
    to resume_step. labels: the training split's [N]."""
    run = job.run
    if run.eval_every == 0:
        return None
    settings = EvaluationSettings(num_samples=run.eval_samples, seed=run.seed, metrics=EVAL_METRICS)
    check_counts(settings, NUM_CLASSES if job.model.class_cond else None, flag="--eval-samples")
    training = job.training
    if not measures_before_stopping(
        run.eval_every, training.epochs, training.max_steps, steps_per_epoch, epochs_done
    ):
        return None
    if len(labels.unique()) < 2:
        if processes.is_main:
            note("quality during training skipped: the data has one class, so no classifier metrics")
        return None
    quality = TrainingQuality(
        processes=processes,
        out_dir=out_dir,
        every=run.eval_every,
        epochs=training.epochs,
        settings=settings,
        diffusion=diffusion,
        image_shape=image_shape,
        amp=amp,
        comparison=None,
    )
    if processes.is_main:
        quality.comparison = test_split_comparison(job, settings, image_shape, processes.device)
        quality.best = stored_best(out_dir / BEST_NAME, run.eval_samples)
        quality.rows = kept_rows(out_dir / QUALITY_LOG_NAME, resume_step)
        write_csv([QUALITY_FIELDS, *quality.rows], out_dir / QUALITY_LOG_NAME)
    return quality


def measures_before_stopping(
    every: int, epochs: int, max_steps: int | None, steps_per_epoch: int, epochs_done: int
) -> bool:
    """Whether the run reaches an epoch end that is measured (the next multiple of every, or the
    last epoch) before --epochs or --max-steps stops it."""
    if epochs_done >= epochs:
        return False
    next_measured = min(epochs, (epochs_done // every + 1) * every)
    return max_steps is None or next_measured * steps_per_epoch <= max_steps


def test_split_comparison(
    job: TrainingJob, settings: EvaluationSettings, image_shape: tuple[int, int, int], device: torch.device
) -> Comparison:
    """The data's test split and classifier, as eval_MNIST.py compares samples with them by default;
    a one-line UserError when the data has no test split."""
    data = job.data
    try:
        return classifier_comparison(
            data.data, data.data_dir, settings.batch_size, settings.seed, device, image_shape
        )
    except DataUnavailableError as error:
        raise UserError(
            f"{error}; --eval-every compares samples with the test split (--eval-every 0: no measures)"
        ) from None


def stored_best(path: Path, eval_samples: int) -> dict[str, Any] | None:
    """The QualityRecord (as a dict) that best.pt holds, or None without one; a note when it was
    measured on another number of samples (FID is biased by the count)."""
    if not path.is_file():
        return None
    best = load_checkpoint(path).get("quality")
    if best is not None and best["num_samples"] != eval_samples:
        note(
            f"{path} holds FID {best['fid']:.2f} of {best['num_samples']} samples, this run measures "
            f"{eval_samples}: it is replaced only by a lower FID all the same"
        )
    return best


def kept_rows(path: Path, resume_step: int | None) -> list[list[Any]]:
    """quality_log.csv's rows up to a resumed checkpoint's step (a new run: none)."""
    if resume_step is None or not path.is_file():
        return []
    with path.open(newline="") as old:
        return [
            [row[name] for name in QUALITY_FIELDS]
            for row in csv.DictReader(old)
            if int(row["step"]) <= resume_step
        ]
