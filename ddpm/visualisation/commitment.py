"""When the digit is decided: the classifier's class of x0-hat at every step of a reverse process.

The classifier is the shipped one for MNIST (ddpm/evaluation/classifier.py), or one made before by
`python -m ddpm.evaluation.train_classifier` or eval_MNIST.py; vizu_MNIST.py reports, per image, the
first step from which x0-hat's class no longer changes (trajectories.decision_steps), in
commitment.csv and commitment.png, and --inpaint classifies its results with it.

Example:
    classifier = commitment_judge(VisualisationSettings(), DataSettings(data=None), config, device)
    rows = commitment_rows(trajectory, classifier, [0, 1, 2], labels, guidance=1.0)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddpm.evaluation.classifier import data_label, default_classifier_path, load_classifier
from ddpm.plumbing.checkpointing import data_source, image_shape
from ddpm.plumbing.inference_settings import VisualisationSettings
from ddpm.plumbing.messages import note
from ddpm.plumbing.settings import DataSettings
from ddpm.visualisation.pictures import save_commitment_plot
from ddpm.visualisation.trajectories import Trajectory, add_class_probabilities, decision_steps

COMMITMENT_HEADER = ["guidance", "image", "label", "final_class", "decided_t", "decided_step"]


def classifier_flags(name: str, data_dir: str | None, shape: tuple[int, int, int]) -> str:
    """ddpm.evaluation.train_classifier's flags for a classifier of this data at this image shape."""
    channels, height, _ = shape
    source = f"--data-dir {data_dir}" if data_dir else f"--data {name}"
    return f"{source} --channels {channels} --image-size {height}"


def commitment_judge(
    settings: VisualisationSettings, data: DataSettings, config: dict, device: torch.device
) -> nn.Module | None:
    """The classifier that says which digit x0-hat is (the shipped one for MNIST, or one made before
    by ddpm.evaluation.train_classifier or eval_MNIST.py), unless --no-commitment; None, with a note,
    if none."""
    if not settings.commitment:
        return None
    name, data_dir = data.source_or(data_source(config))
    path = default_classifier_path(name, data_dir, image_shape(config))
    if not path.is_file():
        flags = classifier_flags(name, data_dir, image_shape(config))
        note(
            f"commitment skipped: no classifier for {data_label(name, data_dir)} at {path} "
            f"(make one with `python -m ddpm.evaluation.train_classifier {flags}`)"
        )
        return None
    return load_classifier(path, device)[0]


def commitment_rows(
    trajectory: Trajectory,
    classifier: nn.Module,
    image_ids: list[int],
    labels: torch.Tensor | None,
    guidance: float,
) -> list[list]:
    """Adds the classifier's probabilities to the trajectory; one row per image: guidance, image, label
    (or ''), the finished image's class, and the t and step index from which x0-hat's class stays it."""
    add_class_probabilities(trajectory, classifier)
    steps = decision_steps(trajectory)
    final = trajectory.metrics["predicted_class"][-1]
    return [
        [guidance, image, "" if labels is None else int(labels[column]), int(final[column]),
         trajectory.timesteps[steps[column]], int(steps[column])]
        for column, image in enumerate(image_ids)
    ]  # fmt: skip


def commitment_summary(rows: list[list], path: Path, trajectory: Trajectory, title: str) -> str:
    """The plot of one run's rows, and one line: median t of decision and accuracy against the labels."""
    decided_t = np.array([row[4] for row in rows])
    save_commitment_plot(trajectory, decided_t, path, title)
    line = f"class decided (stops changing) at median t = {np.median(decided_t):g}"
    if rows[0][2] != "":
        accuracy = np.mean([row[2] == row[3] for row in rows])
        line += f"; finished images classified as their label: {accuracy:.3f}"
    return f"{line} ({len(rows)} images, guidance {rows[0][0]:g}; {path.name})"
