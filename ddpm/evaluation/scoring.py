"""Scores of one image set against the test split: the feature metrics of every extractor, the
classifier's confidence, and CAS (Ravuri & Vinyals 2019, arXiv:1905.10887) for labelled samples.

`compare_with_test_split` sets up what every image set of an evaluation is compared with (the test
split, the extractors among --metrics that can run: the classifier one, loaded once, and InceptionV3
when its weights are there). The benchmarks judge their samples with the same code through
`classifier_comparison` and `classifier_scores`.

Example:
    comparison, _ = compare_with_test_split(settings, real, judge, device)
    scores = set_scores(ImageSet(to_uint8(samples)), comparison)   # SetScores
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ddpm.datasets.sources import load_images, shape_options, to_model_range
from ddpm.evaluation.classifier import (
    LoadedClassifier,
    accuracy,
    data_label,
    ensure_classifier,
    judge,
    train_classifier,
)
from ddpm.evaluation.feature_metrics import (
    Comparison,
    Extractor,
    ImageSet,
    classifier_extractor,
    inception_extractor,
    metrics_per_extractor,
    real_set,
    skipped,
)
from ddpm.evaluation.image_metrics import to_uint8
from ddpm.evaluation.inputs import RealData
from ddpm.evaluation.records import CasScores, SetScores
from ddpm.evaluation.report import as_json
from ddpm.plumbing.checkpointing import LEGACY_IMAGE_SHAPE
from ddpm.plumbing.inference_settings import EvaluationSettings


def resolve_extractors(
    settings: EvaluationSettings, real: RealData, classifier: LoadedClassifier | None
) -> tuple[list[Extractor], dict[str, Any]]:
    """The feature extractors among --metrics that can run (the classifier one for data of two or
    more classes), and the provenance of each."""
    extractors, provenance = [], {}
    if "classifier" in settings.metrics and len(real.test_labels.unique()) < 2:
        provenance["classifier"] = skipped(
            f"classifier metrics skipped: {real.label} has one class (use the Inception ones)"
        )
    elif "classifier" in settings.metrics and classifier is not None:
        extractor, provenance["classifier"] = classifier_extractor(classifier, real.label)
        extractors.append(extractor)
    if "inception" in settings.metrics:
        inception, provenance["inception"] = inception_extractor(settings.inception_weights)
        extractors += [inception] if inception is not None else []
    return extractors, provenance


def compare_with_test_split(
    settings: EvaluationSettings, real: RealData, classifier: LoadedClassifier | None, device: torch.device
) -> tuple[Comparison, dict[str, Any]]:
    """The Comparison every image set of an evaluation goes through, and the extractors' provenance."""
    extractors, provenance = resolve_extractors(settings, real, classifier)
    reference = real_set(real.test_images, real.label, "test")
    comparison = Comparison(
        reference, extractors, settings.batch_size, settings.seed, device, settings.cache_dir
    )
    return comparison, provenance


def set_scores(images: ImageSet, comparison: Comparison) -> SetScores:
    """Every feature metric of one image set, plus the classifier's mean confidence and predicted-class
    fractions (how recognisable the images are) where the classifier is among the extractors."""
    scores = metrics_per_extractor(images, comparison)
    classifier = next(
        (extractor.model for extractor in comparison.extractors if extractor.model is not None), None
    )
    if scores.classifier is not None and classifier is not None:
        verdict = judge(classifier, to_model_range(images.images))
        scores.classifier = replace(
            scores.classifier,
            mean_confidence=verdict["mean_confidence"],
            class_fractions=verdict["class_fractions"],
        )
    return scores


def class_accuracy_score(
    samples: torch.Tensor,
    labels: torch.Tensor,
    real: RealData,
    epochs: int,
    seed: int,
    device: torch.device,
) -> CasScores:
    """CAS: train the classifier architecture on the generated images (quantized to 8 bits, as a
    saved PNG would be), test it on the real test images."""
    model = train_classifier(
        to_model_range(to_uint8(samples)), labels, epochs=epochs, seed=seed, device=device
    )
    return CasScores(
        cas_accuracy=accuracy(model, real.test_images, real.test_labels),
        epochs=epochs,
        num_train=len(labels),
        num_test=len(real.test_labels),
    )


# ----- the benchmarks' judge ----------------------------------------------------------------------


def classifier_comparison(
    data: str,
    data_dir: str | None,
    batch_size: int,
    seed: int,
    device: torch.device,
    image_shape: tuple[int, int, int] = LEGACY_IMAGE_SHAPE,
) -> Comparison:
    """The data set's test split (at image_shape) as the reference and its classifier (shipped, or
    trained once) as the only extractor: what the benchmarks judge samples with."""
    label = data_label(data, data_dir)
    test_images, _ = load_images(data, "test", data_dir, **shape_options(image_shape))
    extractor, _ = classifier_extractor(ensure_classifier(data, data_dir, None, device, image_shape), label)
    return Comparison(real_set(test_images, label, "test"), [extractor], batch_size, seed, device)


def classifier_scores(images: torch.Tensor | ImageSet, comparison: Comparison) -> dict[str, Any]:
    """The classifier's FID, IS, KID, precision, recall, mean confidence and class fractions of an
    ImageSet, or of images [N, C, H, W] in [-1, 1] (quantized to 8 bits first, as a saved PNG would
    be), as the JSON report writes them: a benchmark's row."""
    image_set = images if isinstance(images, ImageSet) else ImageSet(to_uint8(images))
    return as_json(set_scores(image_set, comparison).classifier)
