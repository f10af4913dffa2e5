"""Quality during training (ddpm/training/quality.py): --eval-every's rows of quality_log.csv, best.pt,
its resume, the budget clock that does not count the measures, and the numbers of eval_MNIST.py.

The runs are tiny (8-channel U-Net, 48 training digits in 3 steps of 16 per epoch, --eval-samples 20)
on an IDX folder that also holds 200 MNIST-5k test digits; its classifier is the shipped MNIST-5k one
(ensure_classifier's default path points at it here, as it does for --data mnist-5k, whose 4,000
digits would make each epoch 250 steps). torch-fidelity caches the test split's features under a
temporary TORCH_HOME.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_IMAGES, run_eval, tiny_train_argv
from tensorboard.backend.event_processing import event_accumulator

from ddpm.datasets.idx import write_idx
from ddpm.datasets.sources import load_images, spread_over_classes
from ddpm.evaluation import classifier
from ddpm.evaluation.image_metrics import to_uint8
from ddpm.plumbing.checkpointing import load_checkpoint, save_checkpoint
from ddpm.plumbing.cli import run_cli
from ddpm.plumbing.presets import training_job_from_flags
from ddpm.training.quality import BEST_NAME, QUALITY_LOG_NAME, measures_before_stopping
from ddpm.training.trainer import train
from train_MNIST import main

TEST_IMAGES = 200
EVAL_SAMPLES = "20"
IMAGES_PER_STEP = 16


def write_split(folder: Path, split: str, count: int) -> None:
    """`count` MNIST-5k digits of a split, spread over the classes, as IDX files."""
    images, labels = load_images("mnist-5k", split)
    chosen = spread_over_classes(labels, count, seed=0)
    prefix = "train" if split == "train" else "t10k"
    folder.mkdir(exist_ok=True)
    write_idx(folder / f"{prefix}-images-idx3-ubyte", to_uint8(images[chosen])[:, 0].numpy())
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels[chosen].numpy().astype(np.uint8))


@pytest.fixture(scope="module")
def quality_data(tmp_path_factory) -> Path:
    """48 MNIST-5k training digits and 200 test digits of every class, with labels, as IDX files."""
    folder = tmp_path_factory.mktemp("quality_idx")
    write_split(folder, "train", TINY_IMAGES)
    write_split(folder, "test", TEST_IMAGES)
    return folder


@pytest.fixture(autouse=True)
def shipped_classifier(monkeypatch, tmp_path_factory):
    """The shipped MNIST-5k classifier as the default one of any data; torch-fidelity's cache in a
    temporary TORCH_HOME."""
    monkeypatch.setattr(classifier, "default_classifier_path", lambda *args: classifier.SHIPPED_CLASSIFIER)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch_home"))


def quality_argv(data: Path, out_dir: Path, *extra: str) -> list[str]:
    return tiny_train_argv(data, out_dir, "--eval-samples", EVAL_SAMPLES, "--log-every", "1", *extra)


def quality_rows(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / QUALITY_LOG_NAME).open(newline="") as log_file:
        return list(csv.DictReader(log_file))


def test_rows_at_the_measured_epochs_and_best_pt_holds_the_lowest_fid(quality_data, tmp_path):
    """--epochs 5 --eval-every 2: rows after epochs 2, 4 and the last, 5 (steps 6, 12, 15), every
    number finite; best.pt is the epoch checkpoint of the row with the lowest FID, that FID and step
    inside it; the TensorBoard events hold the same rows as quality/<column> at their steps."""
    main(quality_argv(quality_data, tmp_path, "--epochs", "5", "--eval-every", "2", "--save-every", "1"))
    rows = quality_rows(tmp_path)
    assert [(int(row["step"]), int(row["epoch"])) for row in rows] == [(6, 2), (12, 4), (15, 5)]
    for row in rows:
        assert all(math.isfinite(float(row[name])) for name in ("fid", "is", "precision", "recall"))
        assert float(row["seconds"]) > 0
    lowest = min(rows, key=lambda row: float(row["fid"]))
    best = load_checkpoint(tmp_path / BEST_NAME)
    assert best["quality"]["fid"] == float(lowest["fid"]) and best["quality"]["step"] == int(lowest["step"])
    assert best["step"] == int(lowest["step"]) and best["quality"]["num_samples"] == int(EVAL_SAMPLES)
    epoch_checkpoint = load_checkpoint(tmp_path / f"{quality_data.name}_epoch_{int(lowest['epoch']):02d}.pt")
    assert all(torch.equal(best["ema"][key], value) for key, value in epoch_checkpoint["ema"].items())
    logged = event_accumulator.EventAccumulator(str(tmp_path)).Reload()  # each row also in TensorBoard
    for name in ("fid", "is", "precision", "recall"):
        scalars = [(event.step, event.value) for event in logged.Scalars(f"quality/{name}")]
        expected = [(int(row["step"]), float(row[name])) for row in rows]
        assert [step for step, _ in scalars] == [step for step, _ in expected]
        assert [value for _, value in scalars] == pytest.approx([value for _, value in expected], rel=1e-5)


def test_measures_change_nothing_in_training_and_eval_every_0_writes_nothing(quality_data, tmp_path):
    """The same 2 epochs with a measure after each and with --eval-every 0: the same weights, EMA and
    RNG states (the measures put every RNG state back); without measures no quality_log.csv, no best.pt."""
    checkpoints = {}
    for every in ("1", "0"):
        main(quality_argv(quality_data, tmp_path / every, "--epochs", "2", "--eval-every", every))
        checkpoints[every] = load_checkpoint(tmp_path / every / "last.pt")
    for key in ("model", "ema"):
        assert all(
            torch.equal(checkpoints["1"][key][name], value) for name, value in checkpoints["0"][key].items()
        )
    assert torch.equal(checkpoints["1"]["rng"][0]["torch"], checkpoints["0"]["rng"][0]["torch"])
    assert len(quality_rows(tmp_path / "1")) == 2
    assert not (tmp_path / "0" / QUALITY_LOG_NAME).exists() and not (tmp_path / "0" / BEST_NAME).exists()


@pytest.mark.parametrize("stored_fid", [-1.0, 1e9])
def test_a_resume_replaces_best_pt_only_by_a_lower_fid_than_it_holds(quality_data, tmp_path, stored_fid):
    """2 epochs, then best.pt's stored FID rewritten (torch.save of the modified checkpoint) to -1, below
    any FID, or 1e9, above any; a resume to 4 epochs measures epochs 3 and 4: best.pt stays as it was
    with -1, and with 1e9 becomes the resumed run's lowest. quality_log.csv keeps the rows up to the
    resumed step and adds the new ones."""
    main(quality_argv(quality_data, tmp_path, "--epochs", "2", "--eval-every", "1"))
    best = load_checkpoint(tmp_path / BEST_NAME)
    best["quality"]["fid"] = stored_fid
    save_checkpoint(best, tmp_path / BEST_NAME)
    main(quality_argv(quality_data, tmp_path, "--epochs", "4", "--eval-every", "1", "--resume", "latest"))
    rows = quality_rows(tmp_path)
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4]
    after = load_checkpoint(tmp_path / BEST_NAME)
    if stored_fid < 0:
        assert after["quality"] == best["quality"] and after["step"] == best["step"]
    else:
        lowest = min(rows[2:], key=lambda row: float(row["fid"]))
        assert (after["quality"]["fid"], after["step"]) == (float(lowest["fid"]), int(lowest["step"]))


def test_the_budget_does_not_count_the_measures(quality_data, tmp_path):
    """--max-minutes 0.02 (1.2 wall-seconds) with a measure after every 3-step epoch: the run still
    spends the whole budget in training steps (the logged steps' seconds add up to it), while the
    measures took at least half as long again; had the clock counted them, the steps would have had
    at most half the budget."""
    budget = 0.02 * 60
    argv = quality_argv(
        quality_data, tmp_path, "--epochs", "1000", "--max-steps", "2000", "--eval-every", "1",
        "--max-minutes", "0.02", "--clock", "wall",
    )  # fmt: skip
    result = train(training_job_from_flags(argv))
    with (tmp_path / "train_log.csv").open(newline="") as log_file:
        step_seconds = [IMAGES_PER_STEP / float(row["img_per_s"]) for row in csv.DictReader(log_file)]
    measure_seconds = sum(float(row["seconds"]) for row in quality_rows(tmp_path))
    assert result.stopped_by == "max_minutes"
    assert budget <= result.train_seconds < budget + 2 * max(step_seconds)
    assert sum(step_seconds) >= 0.9 * budget
    assert measure_seconds >= 0.5 * budget


def test_the_numbers_are_eval_mnists_for_the_same_checkpoint(quality_data, tmp_path):
    """Epoch 1's row equals eval_MNIST.py --checkpoint <epoch 1's checkpoint> --num-samples 20
    --sampler ddim --steps 20 --metrics classifier (EMA weights, seed 0): the same noise, sampler,
    classifier and torch-fidelity call, so the same bits."""
    main(quality_argv(quality_data, tmp_path, "--epochs", "1", "--eval-every", "1", "--save-every", "1"))
    (row,) = quality_rows(tmp_path)
    report_path = tmp_path / "eval.json"
    run_eval([
        "--checkpoint", str(tmp_path / f"{quality_data.name}_epoch_01.pt"), "--num-samples", EVAL_SAMPLES,
        "--sampler", "ddim", "--steps", "20", "--metrics", "classifier", "--seed", "0", "--device", "cpu",
        "--classifier", str(classifier.SHIPPED_CLASSIFIER), "--json", str(report_path),
    ])  # fmt: skip
    scores = json.loads(report_path.read_text())["metrics"]["generated"]["classifier"]
    measured = {name: float(row[name]) for name in ("fid", "is", "precision", "recall")}
    assert measured == {
        "fid": scores["fid"],
        "is": scores["is_mean"],
        "precision": scores["precision"],
        "recall": scores["recall"],
    }


def test_too_few_eval_samples_is_one_error_line_before_training(quality_data, tmp_path, capsys):
    argv = quality_argv(quality_data, tmp_path, "--eval-every", "1", "--eval-samples", "3")
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2 and time.perf_counter() - start < 30
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --eval-samples must be at least 4 (FID needs a covariance, precision/recall more than "
        "k = 3 images per set), got 3"
    ]
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.csv"))


def test_data_without_a_test_split_is_one_error_line(tmp_path, capsys):
    write_split(tmp_path / "data", "train", TINY_IMAGES)
    argv = tiny_train_argv(tmp_path / "data", tmp_path / "run", "--eval-every", "1")
    with pytest.raises(SystemExit):
        run_cli(lambda: main(argv))
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "(--eval-every 0: no measures)" in line


def test_data_of_one_class_skips_the_measures_with_one_note(tiny_train_data, tmp_path, capsys):
    """tiny_train_data's 48 digits are all zeros: no classifier metrics, one note, then training."""
    main(tiny_train_argv(tiny_train_data, tmp_path, "--eval-every", "1", "--epochs", "1"))
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: quality during training skipped: the data has one class, so no classifier metrics"
    ]
    assert (tmp_path / "last.pt").is_file() and not (tmp_path / QUALITY_LOG_NAME).exists()


@pytest.mark.parametrize(
    ("every", "epochs", "max_steps", "epochs_done", "measures"),
    [
        (10, 100, None, 0, True),  # epoch 10
        (10, 100, 29, 0, False),  # epoch 10 ends at step 30
        (10, 100, 30, 0, True),  # the stop at step 30 comes after epoch 10's end
        (10, 5, None, 0, True),  # the last epoch is measured
        (10, 100, 59, 10, False),  # resumed after epoch 10: next is epoch 20, step 60
        (1, 4, None, 4, False),  # a finished run
    ],
)
def test_measures_before_stopping(every, epochs, max_steps, epochs_done, measures):
    """3 steps per epoch: whether a run reaches a measured epoch end before it stops."""
    assert measures_before_stopping(every, epochs, max_steps, 3, epochs_done) is measures
