"""The TensorBoard events a training run writes beside train_log.csv (ddpm/training/tensorboard_log.py),
read back with TensorBoard's own EventAccumulator: the scalars equal the log's rows, the sample grids
and the settings (hparams) are there, a resume from an earlier checkpoint leaves each step once,
--no-tensorboard writes nothing, and a writer that fails (no tensorboard package, a disk that fails
at the first write or mid-run) is one note and a complete run.

Each run is the tiny run of tests/helpers.py (8-channel U-Net, T = 20, 48 digits: 3 steps per epoch),
logging every step, on one CPU thread.
"""

from __future__ import annotations

import csv
import errno
import re
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_train_argv
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.summary.writer import record_writer

from ddpm.training.tensorboard_log import flat_settings
from train_MNIST import main

SCALARS = ("loss", "lr", "grad_norm", "img_per_s")  # train_log.csv's columns after step and epoch
# the decimals train_log.csv keeps of each (lr: 4 significant digits, relative)
CSV_PRECISION = {"loss": 1e-6, "grad_norm": 1e-4, "img_per_s": 0.1}
KEEP_ALL = {event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0, event_accumulator.TENSORS: 0}


def train(data: Path, out_dir: Path, *flags: str) -> None:
    main(tiny_train_argv(data, out_dir, "--log-every", "1", *flags))


def events(out_dir: Path) -> event_accumulator.EventAccumulator:
    """Every event of the folder, as TensorBoard shows it (purged steps hidden)."""
    return event_accumulator.EventAccumulator(str(out_dir), size_guidance=KEEP_ALL).Reload()


def log_rows(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / "train_log.csv").open(newline="") as log_file:
        return list(csv.DictReader(log_file))


def assert_scalars_equal_the_log(out_dir: Path) -> None:
    """Each train/<column> has one event per row of train_log.csv, at its step, with its value."""
    accumulator, rows = events(out_dir), log_rows(out_dir)
    assert set(accumulator.Tags()["scalars"]) == {f"train/{name}" for name in SCALARS}
    for name in SCALARS:
        scalars = accumulator.Scalars(f"train/{name}")
        assert [event.step for event in scalars] == [int(row["step"]) for row in rows], name
        for event, row in zip(scalars, rows, strict=True):
            logged = float(row[name])
            if name == "lr":
                assert event.value == pytest.approx(logged, rel=1e-3), (name, event.step)
            else:
                assert event.value == pytest.approx(logged, abs=CSV_PRECISION[name]), (name, event.step)


def image_steps(out_dir: Path) -> list[int]:
    return [event.step for event in events(out_dir).Images("samples")]


def test_scalars_grids_and_settings_match_the_run(tiny_train_data, tmp_path):
    """4 steps with --sample-every 1: rows 1-4, grids at the epoch end (step 3) and the stop (4), the
    grid 8 x 8 tiles of 28 px with 2 px gaps (8 x 30 + 2 = 242 px), and the resolved settings."""
    train(tiny_train_data, tmp_path, "--max-steps", "4", "--sample-every", "1")
    assert_scalars_equal_the_log(tmp_path)
    assert [int(row["step"]) for row in log_rows(tmp_path)] == [1, 2, 3, 4]
    grids = events(tmp_path).Images("samples")
    assert [grid.step for grid in grids] == [3, 4]
    assert (grids[0].width, grids[0].height) == (242, 242)
    content = events(tmp_path).PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model.model_channels"].number_value == 8
    assert hparams["model.channel_mult"].string_value == "1,2"
    assert hparams["run.log_every"].number_value == 1
    assert hparams["training.max_steps"].number_value == 4
    assert hparams["data.hflip"].string_value == "False"  # resolved: off for digits
    assert list(tmp_path.glob("*/events.out.tfevents.*")) == []  # no sub-run folder


def test_a_resume_from_an_earlier_checkpoint_shows_each_step_once(tiny_train_data, tmp_path):
    """Steps 1-5 (checkpoint at step 3, the epoch end), then a resume from that checkpoint to step 7:
    the events the first run wrote after step 3 (rows 4-5, the step-5 grid) are hidden, as after a
    kill between checkpoints, and every tag has each step once, the scalars equal to the final log."""
    train(tiny_train_data, tmp_path, "--max-steps", "5", "--save-every", "1", "--sample-every", "1")
    (epoch_1,) = tmp_path.glob("*_epoch_01.pt")
    time.sleep(1.0)  # event files are read in name order, and their names count whole seconds
    train(tiny_train_data, tmp_path, "--max-steps", "7", "--sample-every", "1", "--resume", str(epoch_1))
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert [int(row["step"]) for row in log_rows(tmp_path)] == [1, 2, 3, 4, 5, 6, 7]
    assert_scalars_equal_the_log(tmp_path)
    assert image_steps(tmp_path) == [3, 6, 7]


def test_a_resume_by_max_steps_continues_the_curves(tiny_train_data, tmp_path):
    """--max-steps 2, then --resume latest to 4: steps 1-4 once each, grids at steps 2 and 4."""
    train(tiny_train_data, tmp_path, "--max-steps", "2")
    time.sleep(1.0)  # as above: the second event file must sort after the first
    train(tiny_train_data, tmp_path, "--max-steps", "4", "--resume", "latest")
    assert_scalars_equal_the_log(tmp_path)
    assert image_steps(tmp_path) == [2, 4]


def test_no_tensorboard_writes_no_event_file(tiny_train_data, tmp_path):
    train(tiny_train_data, tmp_path, "--max-steps", "1", "--no-tensorboard")
    assert list(tmp_path.rglob("events.out.tfevents.*")) == []
    assert (tmp_path / "last.pt").is_file()


def notes_in(stderr: str) -> list[str]:
    """The note lines of stderr, where the progress bar's carriage returns also end lines."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.startswith("note:")]


def failing_writes(monkeypatch, after: int) -> None:
    """The event file's record writer fails like a full disk after `after` records (in the writer's
    worker thread, as a real failing write would)."""
    write = record_writer.RecordWriter.write
    count = 0

    def full_disk(self, data: bytes) -> None:
        nonlocal count
        count += 1
        if count > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", full_disk)


@pytest.mark.parametrize("after", [0, 8], ids=["at the first write", "mid-run"])
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # no traceback
def test_a_failing_event_file_is_one_note_and_a_complete_run(
    tiny_train_data, tmp_path, monkeypatch, capsys, after
):
    """A disk full at the event file's first record (the writer cannot start) or after 8 records
    (the rows of step 1, mid-run): one note, no traceback, and the run's 4 rows and checkpoint."""
    failing_writes(monkeypatch, after)
    train(tiny_train_data, tmp_path, "--max-steps", "4")
    stderr = capsys.readouterr().err
    notes = notes_in(stderr)
    assert len(notes) == 1 and "No space left on device" in notes[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert [int(row["step"]) for row in log_rows(tmp_path)] == [1, 2, 3, 4]
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "samples_step_000004.png").is_file()


def test_without_tensorboard_installed_the_run_goes_on_after_one_note(
    tiny_train_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if absent
    train(tiny_train_data, tmp_path, "--max-steps", "2")
    notes = notes_in(capsys.readouterr().err)
    assert len(notes) == 1 and "pip install tensorboard" in notes[0]
    assert [int(row["step"]) for row in log_rows(tmp_path)] == [1, 2]
    assert list(tmp_path.glob("events.out.tfevents.*")) == []


def test_flat_settings_are_one_level_of_plain_values():
    nested = {
        "model": {"channel_mult": [1, 2], "class_cond": True},
        "training": {"lr": 2e-4, "max_steps": None},
    }
    assert flat_settings(nested) == {
        "model.channel_mult": "1,2",
        "model.class_cond": "True",
        "training.lr": 2e-4,
    }
