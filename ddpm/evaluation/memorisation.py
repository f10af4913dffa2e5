"""Memorisation: is a generated image a copy of a training image?

With 4,000 training digits (MNIST-5k) a good-looking sample may be one of them. For every sample we
find its nearest training image, by L2 distance in two spaces: pixels ([0, 1] scale, flattened) and
the 128-d penultimate features of classifier.py's CNN. What "near" means is set by real data: the
same nearest-training distance is measured for held-out test images (real digits the model never
saw), and a sample counts as a copy when its distance is below the 1st percentile of theirs. So the
held-out images themselves have a copy rate of about 1%, fresh noise about 0 and the training
images 1. Nearest-neighbour copy checks follow Carlini et al. 2023 ("Extracting training data from
diffusion models", arXiv:2301.13188) in spirit, with a threshold calibrated on held-out data.

Example:
    result = CopyDetector(train_images, test_images, classifier_model).check(samples)
    result.summary().pixels.copy_rate
    save_image_grid(result.closest_pairs(samples, train_images), "closest.png", columns=16)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ddpm.datasets.sources import to_model_range
from ddpm.evaluation.classifier import SmallCNNClassifier
from ddpm.evaluation.image_metrics import to_uint8
from ddpm.evaluation.records import ClosestPair, MemorisationSummary, SpaceSummary

COPY_PERCENTILE = 1.0  # a sample nearer than this percentile of held-out images' distances is a copy
NUM_CLOSEST_PAIRS = 16
CHUNK = 512  # query rows per distance matrix


@dataclass
class Neighbours:
    """For each query: the L2 distance to its nearest reference [N] and that reference's index [N]."""

    distances: torch.Tensor
    indices: torch.Tensor


@dataclass
class SpaceResult:
    """One space's nearest-training neighbours of the samples and of the held-out images."""

    samples: Neighbours
    held_out: Neighbours

    @property
    def threshold(self) -> float:
        """The COPY_PERCENTILE-th percentile of the held-out images' nearest-training distances."""
        return torch.quantile(self.held_out.distances.double(), COPY_PERCENTILE / 100).item()

    def summary(self) -> SpaceSummary:
        threshold = self.threshold
        return SpaceSummary(
            copy_rate=(self.samples.distances < threshold).double().mean().item(),
            threshold=threshold,
            median_distance=self.samples.distances.median().item(),
            held_out_median_distance=self.held_out.distances.median().item(),
            held_out_copy_rate=(self.held_out.distances < threshold).double().mean().item(),
        )


@dataclass
class Memorisation:
    """Nearest-training neighbours in pixels and in classifier features, for N samples."""

    spaces: dict[str, SpaceResult]  # "pixels", "classifier"

    def summary(self) -> MemorisationSummary:
        """Per space: copy rate, threshold, median distances; and the NUM_CLOSEST_PAIRS closest pairs
        in pixels (sample index, training index, distance)."""
        pixels = self.spaces["pixels"].samples
        return MemorisationSummary(
            pixels=self.spaces["pixels"].summary(),
            classifier=self.spaces["classifier"].summary(),
            percentile=COPY_PERCENTILE,
            num_samples=len(pixels.distances),
            num_held_out=len(self.spaces["pixels"].held_out.distances),
            closest=[
                ClosestPair(int(i), int(pixels.indices[i]), pixels.distances[i].item())
                for i in self.closest_in_pixels()
            ],
        )

    def closest_in_pixels(self) -> torch.Tensor:
        """Indices of the NUM_CLOSEST_PAIRS samples nearest (in pixels) to a training image."""
        distances = self.spaces["pixels"].samples.distances
        return distances.argsort()[:NUM_CLOSEST_PAIRS]

    def closest_pairs(self, samples: torch.Tensor, train_images: torch.Tensor) -> torch.Tensor:
        """[2K, C, H, W]: the K closest samples (first row), then their nearest training images."""
        order = self.closest_in_pixels()
        return torch.cat([samples[order], train_images[self.spaces["pixels"].samples.indices[order]]])

    def rows(self, repeat: int) -> list[list[Any]]:
        """The CSV header and one row per sample: repeat, sample index, then the nearest training
        image's index and distance in each space."""
        names = list(self.spaces)
        header = ["repeat", "sample"]
        header += [f"{name}_{part}" for name in names for part in ("train_index", "distance")]
        count = len(self.spaces[names[0]].samples.distances)
        body: list[list[Any]] = [
            [repeat, i]
            + [
                value
                for name in names
                for value in (
                    int(self.spaces[name].samples.indices[i]),
                    f"{self.spaces[name].samples.distances[i].item():.6g}",
                )
            ]
            for i in range(count)
        ]
        return [header, *body]


def nearest_neighbours(queries: torch.Tensor, references: torch.Tensor) -> Neighbours:
    """The nearest reference (L2) of each query: queries [N, D], references [M, D]."""
    distances, indices = [], []
    for chunk in queries.split(CHUNK):
        nearest = torch.cdist(chunk, references).clamp(min=0).min(dim=1)
        distances.append(nearest.values)
        indices.append(nearest.indices)
    return Neighbours(torch.cat(distances), torch.cat(indices))


def pixel_vectors(images: torch.Tensor) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] -> [N, C*H*W] on the [0, 1] scale."""
    return ((images.float() + 1) / 2).flatten(1)


@torch.no_grad()
def feature_vectors(classifier: SmallCNNClassifier, images: torch.Tensor) -> torch.Tensor:
    """The classifier's penultimate features [N, 128] of images [N, C, H, W] in [-1, 1]."""
    device = next(classifier.parameters()).device
    return torch.cat([classifier.features(chunk.to(device)).cpu() for chunk in images.split(CHUNK)])


class CopyDetector:
    """The training set's vectors in each space and the held-out images' nearest-training distances,
    computed once; `check(samples)` finds the samples' nearest training images against them.

    train_images, held_out: [N, C, H, W] in [-1, 1]; classifier: classifier.py's CNN (its features).
    """

    def __init__(self, train_images: torch.Tensor, held_out: torch.Tensor, classifier: SmallCNNClassifier):
        self.embeddings: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "pixels": pixel_vectors,
            "classifier": partial(feature_vectors, classifier),
        }
        self.train_vectors = {name: embed(train_images) for name, embed in self.embeddings.items()}
        self.held_out = {
            name: nearest_neighbours(embed(held_out), self.train_vectors[name])
            for name, embed in self.embeddings.items()
        }

    def check(self, samples: torch.Tensor) -> Memorisation:
        """Nearest training images of samples [N, C, H, W] in [-1, 1], quantized to 8 bits first (as
        a saved PNG would be)."""
        samples = to_model_range(to_uint8(samples))
        return Memorisation(
            {
                name: SpaceResult(
                    nearest_neighbours(embed(samples), self.train_vectors[name]), self.held_out[name]
                )
                for name, embed in self.embeddings.items()
            }
        )
