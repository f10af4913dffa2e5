"""memorisation.py on the real MNIST-5k loader (4,000 train, 1,000 test digits) with the shipped classifier.

The threshold is calibrated on one random half of the test split; the stand-in "samples" are training
images (copies: rate 1), uniform noise (rate 0) and the other half of the test split (held out like
the first half: rate about 1%, the percentile that defines a copy).
"""

from __future__ import annotations

import pytest
import torch

from ddpm.datasets.sources import load_images
from ddpm.evaluation.classifier import SHIPPED_CLASSIFIER, load_classifier
from ddpm.evaluation.memorisation import COPY_PERCENTILE, NUM_CLOSEST_PAIRS, CopyDetector, nearest_neighbours

NUM_STAND_IN = 500


@pytest.fixture(scope="module")
def real(mnist_5k_test) -> dict[str, torch.Tensor]:
    train_images, _ = load_images("mnist-5k", "train")
    test_images, _ = mnist_5k_test
    order = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(0))
    return {
        "train": train_images,
        "calibration": test_images[order[:NUM_STAND_IN]],  # the test split is sorted by class: shuffle
        "held_out": test_images[order[NUM_STAND_IN:]],
    }


@pytest.fixture(scope="module")
def detector(real) -> CopyDetector:
    """Training vectors and the calibration half's distances, computed once for every test."""
    return CopyDetector(real["train"], real["calibration"], load_classifier(SHIPPED_CLASSIFIER)[0])


def copy_rates(samples: torch.Tensor, detector: CopyDetector) -> dict[str, float]:
    summary = detector.check(samples).summary()
    return {"pixels": summary.pixels.copy_rate, "classifier": summary.classifier.copy_rate}


def test_training_images_are_copies(real, detector):
    picks = torch.randperm(len(real["train"]), generator=torch.Generator().manual_seed(1))[:NUM_STAND_IN]
    assert copy_rates(real["train"][picks], detector) == {"pixels": 1.0, "classifier": 1.0}


def test_fresh_noise_is_no_copy(real, detector):
    noise = torch.rand((NUM_STAND_IN, 1, 28, 28), generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert copy_rates(noise, detector) == {"pixels": 0.0, "classifier": 0.0}


def test_held_out_digits_are_copies_about_one_percent_of_the_time(real, detector):
    """500 held-out digits against a threshold from 500 others: 5 +- 2.2 expected below it (binomial)."""
    rates = copy_rates(real["held_out"], detector)
    assert COPY_PERCENTILE == 1.0
    assert all(0 < rate <= 0.03 for rate in rates.values()), rates


def test_nearest_neighbour_is_the_exact_minimum_and_pairs_are_the_closest(real, detector):
    queries = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    references = torch.randn(11, 5, generator=torch.Generator().manual_seed(1))
    found = nearest_neighbours(queries, references)
    brute = ((queries[:, None] - references[None]) ** 2).sum(-1).sqrt()
    assert torch.equal(found.indices, brute.argmin(1))
    assert torch.allclose(found.distances, brute.min(1).values, atol=1e-6)

    samples = torch.cat([real["train"][:3], real["held_out"][:30]])  # three exact copies first
    result = detector.check(samples)
    pairs = result.closest_pairs(samples, real["train"])
    assert pairs.shape == (2 * NUM_CLOSEST_PAIRS, 1, 28, 28)
    assert sorted(result.closest_in_pixels()[:3].tolist()) == [0, 1, 2]
    assert torch.equal(pairs[NUM_CLOSEST_PAIRS : NUM_CLOSEST_PAIRS + 3], pairs[:3])  # copy = its source
    rows = result.rows(repeat=0)
    assert len(rows) == 1 + len(samples) and rows[1][:3] == [0, 0, 0]  # sample 0 is train image 0
