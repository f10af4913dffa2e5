"""Under faults nothing is lost: a full or failing disk while saving, two runs on one folder, old and
foreign checkpoints, a gradient or weights that turn non-finite, a resume on another process count.

Tiny runs of train_MNIST.py in-process (8-channel U-Net, T = 20, 48 digits = 3 steps per epoch);
the lock test starts one real training process beside the test's own.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODEL_CONFIG, TINY_TRAIN_FLAGS, tiny_train_argv

from ddpm.plumbing.checkpointing import (
    CHECKPOINT_VERSION,
    LEGACY_VERSION,
    CheckpointError,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from ddpm.plumbing.cli import run_cli
from ddpm.training.folder_lock import LOCK_NAME, read_holder
from ddpm.training.training_log import LOG_NAME
from train_MNIST import main

REPO = Path(__file__).resolve().parents[1]


def one_error_line(argv: list[str], capsys) -> str:
    """Run train_MNIST.py argv in-process; it must exit 2 with one `error:` line, returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def temp_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def one_epoch_run(tiny_train_data, tmp_path_factory) -> Path:
    """A finished 1-epoch run (3 steps): last.pt and <data folder>_epoch_01.pt."""
    out_dir = tmp_path_factory.mktemp("one_epoch")
    main(tiny_train_argv(tiny_train_data, out_dir, "--epochs", "1", "--save-every", "1"))
    return out_dir


# ----- a full or failing disk while saving -------------------------------------------------------


def fail_on_checkpoints(monkeypatch, stage: str) -> str:
    """Make the `stage` of writing a .pt file fail as a full, broken or read-only disk would; the
    error's text is returned. Other files (train_log.csv) are written normally."""
    is_checkpoint = lambda name: ".pt." in os.path.basename(str(name))  # noqa: E731  a temp .last.pt.XXX.tmp
    if stage == "write":  # a stand-in torch.save: half the bytes reach the disk, then it is full

        def fake(state, target, *args, **kwargs):
            Path(target).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(torch, "save", fake)
        return os.strerror(errno.ENOSPC)
    original = {"sync": os.fsync, "rename": os.replace, "create": tempfile.mkstemp}[stage]
    code = {"sync": errno.EIO, "rename": errno.EROFS, "create": errno.EROFS}[stage]

    def failing(*args, **kwargs):
        names = (
            [os.readlink(f"/proc/self/fd/{args[0]}")] if stage == "sync" else [*args, kwargs.get("prefix")]
        )
        if any(is_checkpoint(name) or str(name).startswith(".last.pt") for name in names):
            raise OSError(code, os.strerror(code))
        return original(*args, **kwargs)

    target = {"sync": (os, "fsync"), "rename": (os, "replace"), "create": (tempfile, "mkstemp")}[stage]
    monkeypatch.setattr(*target, failing)
    return os.strerror(code)


@pytest.mark.parametrize("stage", ["create", "write", "sync", "rename"])
def test_a_failing_disk_stops_the_run_and_keeps_every_checkpoint(
    stage, one_epoch_run, tiny_train_data, tmp_path, monkeypatch, capsys
):
    """The epoch-2 save fails at one stage (temp file in a folder turned read-only, ENOSPC while
    writing, EIO at fsync, EROFS at the rename): one line naming last.pt and the error, last.pt and
    the epoch-1 checkpoint unchanged and loadable, no temp file, no epoch-2 checkpoint."""
    out_dir = tmp_path / "run"
    shutil.copytree(one_epoch_run, out_dir)
    epoch_name = f"{tiny_train_data.name}_epoch_{{:02d}}.pt"
    before = {name: (out_dir / name).read_bytes() for name in ("last.pt", epoch_name.format(1))}
    message = fail_on_checkpoints(monkeypatch, stage)
    argv = tiny_train_argv(tiny_train_data, out_dir, "--epochs", "2", "--resume", "latest")
    line = one_error_line(argv, capsys)
    monkeypatch.undo()
    assert f"cannot write {out_dir / 'last.pt'}: {message}" in line and "training stopped at step 6" in line
    for name, data in before.items():
        assert (out_dir / name).read_bytes() == data
        assert load_checkpoint(out_dir / name)["step"] == 3
    assert temp_files(out_dir) == [] and not (out_dir / epoch_name.format(2)).exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_while_logging_is_one_line(tiny_train_data, tmp_path, monkeypatch, capsys):
    """The disk fills up once the run has started: train_log.csv's appends go to /dev/full, where
    every write fails with ENOSPC. The first row is one line naming the log file, not a traceback."""
    real_open = Path.open

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        if path.name == LOG_NAME and "a" in mode:
            return real_open(Path("/dev/full"), mode, *args, **kwargs)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_on_a_full_disk)
    line = one_error_line(tiny_train_argv(tiny_train_data, tmp_path, "--max-steps", "1"), capsys)
    assert line == f"error: cannot write {tmp_path / LOG_NAME}: {os.strerror(errno.ENOSPC)}"


# ----- one run per folder -------------------------------------------------------------------------


def wait_for_lock(path: Path, process: subprocess.Popen, seconds: float = 90) -> dict:
    deadline = time.monotonic() + seconds
    while not (path.is_file() and read_holder(path).get("pid") == process.pid):
        assert process.poll() is None and time.monotonic() < deadline, "the first run did not start"
        time.sleep(0.1)
    return read_holder(path)


def test_a_second_run_on_a_folder_is_refused_and_a_killed_runs_lock_taken_over(
    tiny_train_data, tmp_path, capsys
):
    """A real training process (4,000 steps per epoch: it saves nothing before it is killed) holds
    out/train.lock: a new run and a resume in the same folder each
    stop with one line naming its pid and host. After kill -9 the lock is stale: a resume takes it
    over with one line, removes a temp file the killed writer left, and trains."""
    out_dir = tmp_path / "out"
    long_run = [*TINY_TRAIN_FLAGS, "--data", "mnist-5k", "--batch-size", "1", "--out-dir", str(out_dir)]
    first = subprocess.Popen(
        [sys.executable, str(REPO / "train_MNIST.py"), *long_run],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        holder = wait_for_lock(out_dir / LOCK_NAME, first)
        for extra in ([], ["--resume", "latest"]):
            line = one_error_line(
                tiny_train_argv(tiny_train_data, out_dir, "--max-steps", "1", *extra), capsys
            )
            assert f"is in use by train_MNIST.py pid {first.pid} on {holder['host']}" in line
    finally:
        first.kill()
        first.wait()
    assert (out_dir / LOCK_NAME).is_file()  # kill -9 leaves it behind
    (out_dir / ".last.pt.killed.tmp").write_bytes(b"half a checkpoint")
    capsys.readouterr()
    main(tiny_train_argv(tiny_train_data, out_dir, "--max-steps", "1", "--resume", "latest"))
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert f"took over {out_dir / LOCK_NAME} from train_MNIST.py pid {first.pid}" in notes[0]
    assert "which no longer runs" in notes[0] and "removed 1 temp file(s)" in notes[1]
    assert load_checkpoint(out_dir / "last.pt")["step"] == 1
    assert not (out_dir / LOCK_NAME).exists() and temp_files(out_dir) == []  # released at the end


# ----- checkpoints across versions ----------------------------------------------------------------


def test_checkpoint_versions_and_missing_keys(one_epoch_run, tmp_path):
    """No version (written before versions existed) loads as version 1; a newer one, or one missing a
    key this code needs, is one line saying which."""
    checkpoint = load_checkpoint(one_epoch_run / "last.pt")
    assert checkpoint["version"] == CHECKPOINT_VERSION
    cases = {
        "legacy": ({k: v for k, v in checkpoint.items() if k != "version"}, None),
        "newer": (
            checkpoint | {"version": CHECKPOINT_VERSION + 1},
            f"format version {CHECKPOINT_VERSION + 1}",
        ),
        "no config": ({k: v for k, v in checkpoint.items() if k != "config"}, "(no config)"),
        "no weights": ({k: v for k, v in checkpoint.items() if k not in ("model", "ema")}, "no model or ema"),
        "no diffusion": (
            checkpoint | {"config": {k: v for k, v in checkpoint["config"].items() if k != "diffusion"}},
            "no config['diffusion']",
        ),
    }
    for name, (contents, message) in cases.items():
        save_checkpoint(contents, tmp_path / f"{name}.pt")
        if message is None:
            assert load_checkpoint(tmp_path / f"{name}.pt")["version"] == LEGACY_VERSION
            continue
        with pytest.raises(CheckpointError, match=re.escape(message)) as error:
            load_checkpoint(tmp_path / f"{name}.pt")
        assert len(str(error.value).splitlines()) == 1, name


# ----- non-finite gradients and weights; another process count ------------------------------------


def inject_inf_gradient(monkeypatch, at_call: int) -> None:
    """An inf in one gradient at the at_call-th clip (a finite loss): clipping turns every gradient
    into NaN or 0 and AdamW writes NaN into the weights."""
    original, calls = torch.nn.utils.clip_grad_norm_, []

    def clip(parameters, *args, **kwargs):
        parameters = list(parameters)
        calls.append(1)
        if len(calls) == at_call:
            parameters[0].grad.view(-1)[0] = float("inf")
        return original(parameters, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


def test_an_infinite_gradient_at_an_epoch_end_saves_nothing(tiny_train_data, tmp_path, monkeypatch, capsys):
    """Issue 18 point 9: an inf gradient at the last step of epoch 1 stops the run before last.pt."""
    inject_inf_gradient(monkeypatch, at_call=3)
    line = one_error_line(tiny_train_argv(tiny_train_data, tmp_path, "--epochs", "2"), capsys)
    assert line.startswith("error: gradient norm became inf at step 3: training stopped")
    assert not list(tmp_path.glob("*.pt"))


def inject_nan_after_clipping(monkeypatch, at_call: int) -> None:
    """A NaN in one gradient just after the at_call-th clip has measured a finite norm: the loss and
    the logged gradient norm stay finite, and AdamW writes NaN into that weight."""
    original, calls = torch.nn.utils.clip_grad_norm_, []

    def clip(parameters, *args, **kwargs):
        parameters = list(parameters)
        norm = original(parameters, *args, **kwargs)
        calls.append(1)
        if len(calls) == at_call:
            parameters[0].grad.view(-1)[0] = float("nan")
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


def test_non_finite_weights_are_never_saved(tiny_train_data, tmp_path, monkeypatch, capsys):
    """Weights that turn NaN while the loss and the gradient norm stay finite (so the log's checks
    pass) are refused by the check before every save."""
    inject_nan_after_clipping(monkeypatch, at_call=3)
    line = one_error_line(tiny_train_argv(tiny_train_data, tmp_path, "--epochs", "2"), capsys)
    assert line.startswith("error: weights became NaN or infinite by step 3")
    assert not list(tmp_path.glob("*.pt"))


def test_a_resume_on_another_process_count_is_refused(one_epoch_run, tiny_train_data, tmp_path, capsys):
    """A checkpoint of 2 processes (two RNG states) resumed by 1 is one line, not a changed schedule."""
    out_dir = tmp_path / "run"
    shutil.copytree(one_epoch_run, out_dir)
    checkpoint = load_checkpoint(out_dir / "last.pt")
    save_checkpoint(checkpoint | {"rng": checkpoint["rng"] * 2}, out_dir / "last.pt")
    argv = tiny_train_argv(tiny_train_data, out_dir, "--epochs", "2", "--resume", "latest")
    line = one_error_line(argv, capsys)
    assert "was written by 2 process(es), this run has 1: resume it with 2" in line


# ----- outputs written whole ----------------------------------------------------------------------


class KilledMidway:
    """A file opened for writing that dies (KeyboardInterrupt, as a kill would stop the process)
    once `limit` bytes are on disk: the real file keeps exactly the half written so far."""

    def __init__(self, real, limit: int):
        self.real, self.limit, self.written = real, limit, 0

    def write(self, data) -> int:
        room = self.limit - self.written
        if len(data) >= room:
            self.real.write(data[:room])
            self.real.flush()
            raise KeyboardInterrupt
        self.written += len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.real.close()


def kill_while_writing(monkeypatch, name: str, limit: int = 200) -> None:
    """The first write of a file whose name ends with `name` (or of its temp file) dies midway, by
    whichever library writes it (PIL, matplotlib, csv, json): every open() goes through here."""
    import builtins
    import io

    original = io.open

    def open_that_dies(file, mode="r", *args, **kwargs):
        handle = original(file, mode, *args, **kwargs)
        base = os.path.basename(str(file))
        if any(flag in mode for flag in "wax") and (base.endswith(name) or f"{name}." in base):
            return KilledMidway(handle, limit)
        return handle

    monkeypatch.setattr(builtins, "open", open_that_dies)
    monkeypatch.setattr(io, "open", open_that_dies)


@pytest.mark.parametrize("name", ["original.png", "metrics.csv", "reverse.gif", "curves.png"])
def test_a_kill_while_vizu_writes_leaves_the_old_file(
    name, tiny_checkpoint, tmp_path, monkeypatch, read_data_once
):
    """vizu's PNG, CSV, GIF and matplotlib outputs: killed in the middle of writing one of them, the
    file from the run before is still there byte for byte, and no temp file is left."""
    import vizu_MNIST

    argv = ["--checkpoint", str(tiny_checkpoint), "--t", "5", "--sampler", "ddim", "--steps", "2",
            "--num-images", "1", "--gif-frames", "2", "--no-commitment",
            "--out-dir", str(tmp_path)]  # fmt: skip
    vizu_MNIST.main(argv)
    before = (tmp_path / name).read_bytes()
    assert len(before) > 200
    kill_while_writing(monkeypatch, name)
    with pytest.raises(KeyboardInterrupt):
        vizu_MNIST.main([*argv, "--seed", "1"])
    monkeypatch.undo()
    assert (tmp_path / name).read_bytes() == before and temp_files(tmp_path) == []


def test_a_kill_while_eval_writes_its_report_leaves_none(
    tiny_checkpoint, tmp_path, monkeypatch, read_data_once
):
    """eval's JSON report, killed midway on its first write: no report at all, and no temp file."""
    import eval_MNIST

    kill_while_writing(monkeypatch, "report.json", limit=50)
    with pytest.raises(KeyboardInterrupt):
        eval_MNIST.main(["--checkpoint", str(tiny_checkpoint), "--num-samples", "2", "--metrics",
                         "memorisation,recon", "--num-recon", "2", "--recon-t", "5",
                         "--sampler", "ddim", "--steps", "2", "--device", "cpu",
                         "--json", str(tmp_path / "report.json")])  # fmt: skip
    monkeypatch.undo()
    assert (tmp_path / "report_samples.png").is_file()  # written before the report
    assert not (tmp_path / "report.json").exists() and temp_files(tmp_path) == []


# ----- class-conditional checkpoints and scripts that need labels, or the reverse -----------------


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory) -> Path:
    """An untrained class-conditional tiny U-Net (T = 20): enough for what the scripts refuse or use."""
    config = {
        "model": {**TINY_MODEL_CONFIG, "num_classes": 10},
        "image_shape": [1, 28, 28],
        "diffusion": {"T": 20, "schedule": "cosine", "prediction": "eps"},
        "data": "mnist-5k",
    }
    path = tmp_path_factory.mktemp("conditional") / "conditional.pt"
    weights = build_model(config).state_dict()
    save_checkpoint({"version": CHECKPOINT_VERSION, "config": config, "ema": weights}, path)
    return path


def test_labels_and_conditioning_that_do_not_fit_are_one_line(
    tiny_checkpoint, conditional_checkpoint, one_epoch_run, tiny_train_data, tmp_path, capsys, read_data_once
):
    """An unconditional checkpoint with eval --metrics cas or --guidance, or vizu --label; a
    class-conditional one with a label it does not have; a resume that adds --class-cond."""
    import eval_MNIST
    import vizu_MNIST

    evaluate = ["--num-samples", "10", "--json", str(tmp_path / "r.json"), "--device", "cpu"]
    show = ["--t", "5", "--out-dir", str(tmp_path / "vizu")]
    cases = [
        (eval_MNIST.main, ["--checkpoint", str(tiny_checkpoint), "--metrics", "cas,recon", *evaluate],
         "--metrics cas needs a class-conditional checkpoint; this one is unconditional"),
        (eval_MNIST.main, ["--checkpoint", str(tiny_checkpoint), "--guidance", "2", *evaluate],
         "--guidance needs a class-conditional checkpoint"),
        (vizu_MNIST.main, ["--checkpoint", str(tiny_checkpoint), "--label", "3", *show],
         "--label and --guidance need a class-conditional checkpoint"),
        (vizu_MNIST.main, ["--checkpoint", str(conditional_checkpoint), "--label", "10", *show],
         "--label must be in [0, 9], got 10"),
        (main, tiny_train_argv(tiny_train_data, one_epoch_run, "--resume", "latest", "--class-cond"),
         "num_classes None there, 10 here"),
    ]  # fmt: skip
    for script, argv, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: script(argv))  # noqa: B023
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0], (argv, errors)


def test_a_class_conditional_checkpoint_draws_the_label_asked_for(conditional_checkpoint, tmp_path):
    """vizu --generate --label 7 on a class-conditional checkpoint: used, not refused."""
    import vizu_MNIST

    vizu_MNIST.main(["--checkpoint", str(conditional_checkpoint), "--generate", "--label", "7",
                     "--num-images", "2", "--sampler", "ddim", "--steps", "2", "--gif-frames", "2",
                     "--no-commitment", "--out-dir", str(tmp_path)])  # fmt: skip
    assert (tmp_path / "generated.png").is_file()
