"""The records of an evaluation: each metric's result and the report's parts, dataclasses with named fields.

Every metric module returns one of these (feature_metrics.py FidelityScores, memorisation.py
MemorisationSummary, likelihood.py NllBound, ...); repeats.py averages them over sample sets and
fills their `over_repeats`; report.py prints them as the terminal table and writes them as the JSON
report, one object per record with its fields in the order they are declared here (fields marked
OMITTED_WHEN_NONE left out when None, `over_repeats` last and only when there are spreads).

Example:
    scores = FidelityScores(fid=45.1, is_mean=8.2, is_std=0.28, kid_mean=118.1, kid_std=35.8,
                            precision=0.757, recall=0.924, kid_subset_size=500, num_images=1000,
                            num_reference=1000)
    scores.fid, scores.over_repeats.get("fid")   # 45.1, None (one repeat)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ddpm.evaluation.repeats import Spread

OMITTED_WHEN_NONE = {"omitted_when_none": True}  # field metadata: no JSON key for a None value


def spreads() -> Any:
    """A record's `over_repeats`: per field, its Spread over the --repeats sample sets (empty: one)."""
    return field(default_factory=dict)


# ----- metric results ------------------------------------------------------------------------------


@dataclass
class FidelityScores:
    """One image set against the reference through one feature extractor (torch-fidelity): FID, IS
    (mean and std over splits), KID (mean and std over subsets of kid_subset_size), precision and
    recall; with the classifier, its mean confidence and the fraction of images predicted as each class."""

    fid: float
    is_mean: float
    is_std: float
    kid_mean: float
    kid_std: float
    precision: float
    recall: float
    kid_subset_size: int
    num_images: int
    num_reference: int
    mean_confidence: float | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    class_fractions: list[float] | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    over_repeats: dict[str, Spread] = spreads()


@dataclass
class SetScores:
    """One image set's FidelityScores per available extractor."""

    classifier: FidelityScores | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    inception: FidelityScores | None = field(default=None, metadata=OMITTED_WHEN_NONE)


@dataclass
class CasScores:
    """Classification accuracy score: a classifier trained on the samples, tested on real test images."""

    cas_accuracy: float
    epochs: int
    num_train: int
    num_test: int
    over_repeats: dict[str, Spread] = spreads()


@dataclass
class SpaceSummary:
    """Memorisation in one space (pixels or classifier features): the fraction of samples nearer to a
    training image than `threshold` (the held-out images' 1st percentile), and median distances."""

    copy_rate: float
    threshold: float
    median_distance: float
    held_out_median_distance: float
    held_out_copy_rate: float
    over_repeats: dict[str, Spread] = spreads()


@dataclass
class ClosestPair:
    """A sample, its nearest training image and their pixel distance."""

    sample: int
    train: int
    distance: float


@dataclass
class MemorisationSummary:
    """The copy check in both spaces and the samples closest (in pixels) to a training image."""

    pixels: SpaceSummary
    classifier: SpaceSummary
    percentile: float
    num_samples: int
    num_held_out: int
    closest: list[ClosestPair]
    over_repeats: dict[str, Spread] = spreads()


@dataclass
class ReconstructionAtT:
    """Test images noised to one t and denoised back in `steps` model evaluations: MSE, PSNR and SSIM
    (mean and standard deviation over the images)."""

    steps: int
    mse_mean: float
    mse_std: float
    psnr_mean: float
    psnr_std: float
    ssim_mean: float
    ssim_std: float


@dataclass
class Reconstruction:
    """The reconstruction sweep: per t (a string, as a JSON key) its scores, and the scales' meaning."""

    num_images: int
    per_t: dict[str, ReconstructionAtT]
    scale: dict[str, str]


@dataclass
class NllBound:
    """The variational bound (Ho et al. eq. 5) in bits/dim over test images: mean, std and standard
    error over images, its parts (prior L_T, decoder L_0, the KL terms' sum) and the mean term per t."""

    bits_per_dim: float
    bits_per_dim_std: float
    bits_per_dim_sem: float
    prior_bpd: float
    decoder_bpd: float
    kl_terms_bpd: float
    terms_per_t: list[float]
    num_images: int
    variance: str
    clip_x0: bool


@dataclass
class SampleSetScores:
    """Every metric of one sample set (one repeat): feature metrics, CAS, memorisation."""

    generated: SetScores
    cas: CasScores | None
    memorisation: MemorisationSummary | None


@dataclass
class Metrics:
    """The report's metrics: the samples, the real-data floor, the noise ceiling, CAS, memorisation,
    reconstruction and the NLL bound; None where not measured."""

    generated: SetScores | None = None
    floor: SetScores | None = None
    ceiling: SetScores | None = None
    cas: CasScores | None = None
    memorisation: MemorisationSummary | None = None
    reconstruction: Reconstruction | None = None
    nll: NllBound | None = None


# ----- provenance and the report -------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    """What was evaluated: the checkpoint file, its hash, where it sits in training, its config."""

    path: str
    sha256: str
    epoch: int | None
    step: int | None
    weights: str  # "ema" or "model"
    config: dict[str, Any]


@dataclass
class DataInfo:
    """The reference set: the data set's test split, its size and the hash of its uint8 images."""

    name: str
    split: str
    num_reference: int
    reference_sha256: str


@dataclass
class SamplingInfo:
    """How the samples were drawn: the sampling flags, the model evaluations per sample and the speed plan."""

    sampler: str
    steps: int
    eta: float
    guidance: float
    num_samples: int
    seeds: list[int]
    batch_size: int
    amp: str
    compiled: str | None
    channels_last: bool


@dataclass
class Provenance:
    """Everything a number depends on: checkpoint, reference data, sampling, seeds, extractors
    (their weights and hashes, or why they were skipped), library versions, device and command."""

    checkpoint: CheckpointInfo | None
    data: DataInfo
    sampling: SamplingInfo | None
    seed: int
    repeats: int
    feature_extractors: dict[str, dict[str, Any]]
    versions: dict[str, str]
    device: str
    command: str


@dataclass
class Outputs:
    """The files an evaluation wrote (None: not written)."""

    json: str
    samples_png: str | None
    closest_png: str | None
    nearest_csv: str | None
    saved_samples: str | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # --save-samples


@dataclass
class EvaluationReport:
    """One evaluation: its provenance, metrics and output files."""

    provenance: Provenance
    metrics: Metrics
    outputs: Outputs
