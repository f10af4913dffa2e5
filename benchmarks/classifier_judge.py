"""Judging generated digits with the MNIST-5k classifier of mnist_classifier.py.

For a set of samples: the classifier's mean confidence (max softmax probability), the histogram of
predicted classes, and the classifier-feature FID (Heusel et al. 2017, arXiv:1706.08500, with the
classifier's 128-d penultimate features in place of InceptionV3's, computed by torch-fidelity)
against the held-out test digits. Samples are quantized to 8 bits first, as a saved PNG would be.

Example:
    judge = ClassifierJudge.load("checkpoints/mnist_classifier_mnist-5k.pt", test_images)
    scores = judge.score(samples)    # samples: [N, 1, 28, 28] in [-1, 1]
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from cli import UserError
from data_sources import to_model_range
from image_metrics import to_uint8
from mnist_classifier import NUM_CLASSES, load_classifier

JUDGE_BATCH = 1000


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images [N, 1, H, W] to the 256 levels of an 8-bit image, staying in [-1, 1]."""
    return to_model_range(to_uint8(images)[:, 0])


class ClassifierJudge:
    """The classifier and the FID statistics of the reference (held-out) digits."""

    def __init__(self, classifier: torch.nn.Module, reference_images: torch.Tensor):
        self.classifier = classifier.cpu().eval()
        features, _ = self.features_and_probabilities(reference_images)
        self.reference_statistics = fid_features_to_statistics(features)

    @classmethod
    def load(cls, path: str | Path, reference_images: torch.Tensor) -> ClassifierJudge:
        if not Path(path).is_file():
            raise UserError(
                f"no classifier at {path}: train it with `python mnist_classifier.py --data mnist-5k`"
            )
        classifier, _ = load_classifier(path)
        return cls(classifier, reference_images)

    @torch.no_grad()
    def features_and_probabilities(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features [N, 128] (float64, for FID) and class probabilities [N, 10]."""
        features = torch.cat([self.classifier.features(quantize(b.cpu())) for b in images.split(JUDGE_BATCH)])
        return features.double(), self.classifier.head(features).softmax(dim=1)

    def score(self, images: torch.Tensor) -> dict:
        """mean_confidence, class_fractions (10 floats, summing to 1) and classifier_fid of images."""
        features, probabilities = self.features_and_probabilities(images)
        confidence, predicted = probabilities.max(dim=1)
        counts = torch.bincount(predicted, minlength=NUM_CLASSES)
        statistics = fid_features_to_statistics(features)
        fid = fid_statistics_to_metric(statistics, self.reference_statistics, verbose=False)[KEY_METRIC_FID]
        return {
            "num_images": len(images),
            "mean_confidence": confidence.mean().item(),
            "class_fractions": (counts / len(images)).tolist(),
            "classifier_fid": float(fid),
        }


def real_data_floor(judge: ClassifierJudge, train_images: torch.Tensor, count: int, seed: int) -> dict:
    """The scores of `count` random real training digits: the best a generator can hope for."""
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(train_images), generator=generator)[:count]
    return judge.score(train_images[subset])
