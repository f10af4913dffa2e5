"""Classifier-free guidance and CAS on a tiny class-conditional model trained for them (conftest):
its samples follow their labels above chance, guidance changes them and raises that accuracy, and a
classifier trained on them (CAS) beats chance on real test digits."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_eval

from ddpm.evaluation.classifier import SHIPPED_CLASSIFIER, accuracy, load_classifier
from ddpm.plumbing.checkpointing import load_for_inference
from ddpm.plumbing.settings import SamplingSettings
from ddpm.sampling import generate_samples

CHANCE = 0.1  # ten classes
NUM_SAMPLES = 100  # ten per class


@pytest.fixture(scope="module")
def guided_samples(trained_conditional_checkpoint) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
    model, diffusion, _ = load_for_inference(trained_conditional_checkpoint, torch.device("cpu"))
    return {
        guidance: generate_samples(
            model,
            diffusion,
            NUM_SAMPLES,
            sampling=SamplingSettings(steps=10, guidance=guidance),
            image_shape=(1, 28, 28),
            seed=0,
            device=torch.device("cpu"),
            progress=False,
        )
        for guidance in (1.0, 3.0)
    }


def test_guidance_changes_the_samples_and_raises_their_accuracy_against_the_label(guided_samples):
    """The shipped classifier judges whether each sample shows its label. One sample's accuracy is a
    Bernoulli draw, so 100 of them have a standard error of at most 0.05: the margins are 2-4 of it."""
    judge, _ = load_classifier(SHIPPED_CLASSIFIER)
    scores = {guidance: accuracy(judge, *samples) for guidance, samples in guided_samples.items()}
    assert not torch.allclose(guided_samples[1.0][0], guided_samples[3.0][0], atol=0.1)
    assert scores[1.0] > CHANCE + 0.1
    assert scores[3.0] > scores[1.0] + 0.1


def test_cas_is_above_chance_for_a_model_trained_for_it(trained_conditional_checkpoint, tmp_path):
    """CAS trains the classifier on 100 guided samples (40 epochs of one batch) and tests it on the
    1,000 real test digits."""
    json_path = tmp_path / "cas.json"
    run_eval(["--checkpoint", str(trained_conditional_checkpoint), "--metrics", "cas", "--num-samples",
              str(NUM_SAMPLES), "--sampler", "ddim", "--steps", "10", "--guidance", "3", "--cas-epochs", "40",
              "--json", str(json_path), "--device", "cpu"])  # fmt: skip
    cas = json.loads(json_path.read_text())["metrics"]["cas"]
    assert cas["num_train"] == NUM_SAMPLES and cas["num_test"] == 1000
    assert cas["cas_accuracy"] > CHANCE + 0.1
