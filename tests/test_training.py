"""train_MNIST.py and the trainer (ddpm/training) on a tiny U-Net (8 channels, T = 20) and tiny data,
on one CPU thread: resuming to the bit, stop rules (signals, --max-steps, the --max-minutes budget),
what each training flag changes, DDP under torchrun, bad input, and the checkpoints' names.

Most runs call `main(argv)` or `train(job)` in-process; SIGTERM, exit codes and torchrun need a
subprocess. The tiny data set is the first 48 MNIST-5k digits as IDX files (conftest's
tiny_train_data): with --batch-size 16 an epoch is 3 steps, so a few steps cross epoch ends
(checkpoints, sample grids, a new shuffle).
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import TINY_TRAIN_FLAGS, tiny_config, tiny_train_argv
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ddpm.datasets.idx import write_idx
from ddpm.datasets.sources import load_images
from ddpm.evaluation import image_metrics
from ddpm.plumbing.checkpointing import (
    CHECKPOINT_VERSION,
    CheckpointError,
    build_model,
    data_name,
    latest_checkpoint,
    load_checkpoint,
    load_for_inference,
    resolve_checkpoint,
    resolve_checkpoints,
    save_checkpoint,
)
from ddpm.plumbing.cli import run_cli
from ddpm.plumbing.presets import training_job_from_flags
from ddpm.plumbing.processes import Processes
from ddpm.plumbing.runtime import SpeedPlan, seed_everything
from ddpm.training.loop import Run, TrainingData, drop_labels
from ddpm.training.timestep_sampler import UniformSampler
from ddpm.training.trainer import TrainingResult, train
from diffusion import GaussianDiffusion
from train_MNIST import main

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = [*TINY_TRAIN_FLAGS, "--log-every", "1"]  # T = 20, batch 16, 2 warm-up steps, on the CPU
IMAGES_PER_STEP = 16
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
EVENTS = "events.out.tfevents.*"  # rank 0's TensorBoard event file, one per start
TORCHRUN_STEPS = 24  # the torchrun runs' length: room for a SIGTERM after step 2 to land before the end


def tiny_argv(data: Path, out_dir: Path, *extra: str) -> list[str]:
    """A tiny run (helpers.tiny_train_argv) that logs every step."""
    return tiny_train_argv(data, out_dir, "--log-every", "1", *extra)


def run(data: Path, out_dir: Path, *flags: str) -> dict:
    """Train a tiny run in-process; its last.pt."""
    main(tiny_argv(data, out_dir, *flags))
    return load_checkpoint(out_dir / "last.pt")


def train_in_process(argv: list[str]) -> TrainingResult:
    """What `train_MNIST.py argv` trains, through the library: where it stopped and why."""
    return train(training_job_from_flags(argv))


def logged(out_dir: Path, column: str) -> list[float]:
    with (out_dir / "train_log.csv").open(newline="") as log_file:
        return [float(row[column]) for row in csv.DictReader(log_file)]


def logged_steps(out_dir: Path) -> list[int]:
    return [int(step) for step in logged(out_dir, "step")]


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def assert_same_training_state(first: dict, second: dict) -> None:
    """Bit-identical weights, EMA, optimizer moments and torch RNG, at the same position."""
    for key in ("step", "epoch", "batch_in_epoch", "ema_n_averaged"):
        assert first[key] == second[key], key
    assert_same_weights(first["model"], second["model"])
    assert_same_weights(first["ema"], second["ema"])
    for index, moments in first["optimizer"]["state"].items():
        assert_same_weights(moments, second["optimizer"]["state"][index])
    assert torch.equal(first["rng"][0]["torch"], second["rng"][0]["torch"])


# ----- resuming to the bit --------------------------------------------------------------------------


def test_resume_mid_epoch_is_bit_exact(tiny_train_data, tmp_path):
    """6 steps (2 epochs) straight == 3 steps (an epoch end, as after kill -9) + resume + 1 step
    (stopped after batch 1 of epoch 2) + resume + 2 steps.

    Class-conditional with dropout, so timesteps, noise, dropout masks and label dropout all draw
    from the RNG; the data order of epoch 2 must also be the same after the resume.
    """
    flags = ["--epochs", "2", "--class-cond", "--dropout", "0.1"]
    main(tiny_argv(tiny_train_data, tmp_path / "straight", *flags))
    for max_steps, position in (("3", (3, 1, 0)), ("4", (4, 1, 1))):
        resume = ["--resume", "latest"] if max_steps == "4" else []
        main(tiny_argv(tiny_train_data, tmp_path / "split", *flags, "--max-steps", max_steps, *resume))
        stopped = load_checkpoint(tmp_path / "split" / "last.pt")
        assert (stopped["step"], stopped["epoch"], stopped["batch_in_epoch"]) == position
    main(tiny_argv(tiny_train_data, tmp_path / "split", *flags, "--resume", "latest"))

    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "split" / "last.pt")
    assert (straight["step"], straight["epoch"]) == (6, 2)
    assert_same_training_state(straight, resumed)
    assert not torch.equal(straight["model"]["input_conv.weight"], straight["ema"]["input_conv.weight"])
    assert logged_steps(tmp_path / "split") == [1, 2, 3, 4, 5, 6]
    for name in (f"{tiny_train_data.name}_epoch_02.pt", "samples_epoch_02.png", "loss.png"):  # the last epoch
        assert (tmp_path / "split" / name).is_file(), name
    assert not (tmp_path / "split" / "samples_epoch_01.png").exists()  # --sample-every 5


def test_checkpoint_loads_for_inference(tiny_train_data, tmp_path):
    """The checkpoint rebuilds the U-Net (EMA weights, 10 classes) and the diffusion without flags;
    after 3 steps with a short EMA the EMA and the raw weights differ, and load_for_inference takes the
    EMA ones (the raw ones with use_ema=False)."""
    flags = ["--max-steps", "3", "--class-cond", "--prediction", "v", "--ema-decay", "0.5"]
    main(tiny_argv(tiny_train_data, tmp_path, *flags))
    model, diffusion, checkpoint = load_for_inference(tmp_path / "last.pt", torch.device("cpu"))
    assert checkpoint["version"] == CHECKPOINT_VERSION
    assert checkpoint["config"]["train"]["training"]["max_steps"] == 3
    assert checkpoint["config"]["image_shape"] == [1, 28, 28]
    assert (model.num_classes, model.model_channels) == (10, 8)
    assert (diffusion.T, diffusion.prediction) == (20, "v")
    assert_same_weights(model.state_dict(), checkpoint["ema"])
    assert not torch.equal(checkpoint["ema"]["input_conv.weight"], checkpoint["model"]["input_conv.weight"])
    raw, _, _ = load_for_inference(tmp_path / "last.pt", torch.device("cpu"), use_ema=False)
    assert_same_weights(raw.state_dict(), checkpoint["model"])


def test_sigterm_mid_epoch_saves_and_resumes_bit_exact(tmp_path):
    """SIGTERM after a few steps: exit 143 with last.pt saved mid-epoch; resuming it to step k + 2
    equals k + 2 steps straight. MNIST-5k has 250 steps per epoch, so the stop is mid-epoch."""
    flags = [*TINY_RUN, "--data", "mnist-5k", "--epochs", "2"]
    out_dir = tmp_path / "interrupted"
    command = [sys.executable, str(REPO / "train_MNIST.py"), *flags, "--out-dir", str(out_dir)]
    process = subprocess.Popen(command, cwd=REPO, env=ONE_THREAD_ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((out_dir / "train_log.csv").is_file() and len(logged_steps(out_dir)) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]

    stopped = load_checkpoint(out_dir / "last.pt")
    steps = stopped["step"]
    assert stopped["epoch"] == 0 and stopped["batch_in_epoch"] == steps >= 2
    main([*flags, "--out-dir", str(out_dir), "--resume", "latest", "--max-steps", str(steps + 2)])
    main([*flags, "--out-dir", str(tmp_path / "straight"), "--max-steps", str(steps + 2)])
    resumed = load_checkpoint(out_dir / "last.pt")
    assert_same_training_state(load_checkpoint(tmp_path / "straight" / "last.pt"), resumed)


def test_interrupted_save_keeps_previous_checkpoint(tiny_train_data, tmp_path, monkeypatch):
    """An interruption just before os.replace leaves the old last.pt, byte for byte, and no temp file."""
    main(tiny_argv(tiny_train_data, tmp_path, "--max-steps", "2"))
    before = (tmp_path / "last.pt").read_bytes()

    def interrupted_replace(source, destination):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_argv(tiny_train_data, tmp_path, "--max-steps", "4", "--resume", "latest"))
    assert (tmp_path / "last.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")) == []


def test_ema_is_the_warm_up_average_and_excludes_the_schedule(tiny_train_data, tmp_path):
    """With --ema-decay 0.2 the EMA after 3 steps is, by hand: e1 = p1 (first update copies),
    e2 = d1 e1 + (1 - d1) p2 with d1 = min(0.2, 2/11) = 2/11, e3 = d2 e2 + (1 - d2) p3 with
    d2 = min(0.2, 3/12) = 0.2. p1..p3 come from a run stopped and resumed after every step."""
    weights = []
    for step in (1, 2, 3):
        resume = ["--resume", "latest"] if step > 1 else []
        main(tiny_argv(tiny_train_data, tmp_path, "--ema-decay", "0.2", "--max-steps", str(step), *resume))
        weights.append(load_checkpoint(tmp_path / "last.pt")["model"])
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert checkpoint["ema_n_averaged"] == 3
    assert checkpoint["ema"].keys() == checkpoint["model"].keys()  # the U-Net's, and nothing else
    schedule_buffers = {name for name, _ in GaussianDiffusion(T=20).named_buffers()}
    assert schedule_buffers and not schedule_buffers & {key.split(".")[-1] for key in checkpoint["ema"]}
    for key, ema_value in checkpoint["ema"].items():
        expected = weights[0][key]
        for decay, model_value in zip((2 / 11, 0.2), weights[1:], strict=True):
            expected = decay * expected + (1 - decay) * model_value[key]
        torch.testing.assert_close(ema_value, expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(checkpoint["ema"]["input_conv.weight"], weights[2]["input_conv.weight"])


def test_non_finite_loss_stops_with_one_line_and_keeps_last_checkpoint(
    tiny_train_data, tmp_path, monkeypatch, capsys
):
    """A NaN loss at step 4 stops the run with exit code 2 and one line naming step 4, although the
    log only syncs at steps 3 and 6. The epoch-1 checkpoints (step 3) stay; epoch 2 (step 6) is
    never saved."""
    original_losses, calls = GaussianDiffusion.training_losses, []

    def loss_that_turns_nan(self, *args, **kwargs):
        calls.append(1)
        losses = original_losses(self, *args, **kwargs)
        return losses * float("nan") if len(calls) == 4 else losses

    monkeypatch.setattr(GaussianDiffusion, "training_losses", loss_that_turns_nan)
    argv = tiny_argv(tiny_train_data, tmp_path, "--epochs", "3", "--log-every", "3", "--save-every", "1")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: loss became nan at step 4: training stopped")
    saved = sorted(path.name for path in tmp_path.glob("*.pt"))
    assert saved == ["last.pt", f"{tiny_train_data.name}_epoch_01.pt"]
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert checkpoint["step"] == 3 and all(
        torch.isfinite(value).all() for value in checkpoint["model"].values()
    )
    assert logged_steps(tmp_path) == [3]


def torchrun_command(out_dir: Path, *extra: str) -> list[str]:
    """2 CPU processes (gloo) of the tiny run on MNIST-5k (156 steps per epoch)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO / "train_MNIST.py"), *TINY_RUN, "--data", "mnist-5k",
        "--lr", "2e-3", "--warmup-steps", "0", "--out-dir", str(out_dir), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def torchrun_straight(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out_dir = tmp_path_factory.mktemp("torchrun")
    result = subprocess.run(
        torchrun_command(out_dir, "--max-steps", str(TORCHRUN_STEPS)),
        cwd=REPO, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return result, out_dir


def test_torchrun_two_cpu_processes(torchrun_straight):
    """torchrun, gloo, 2 processes: the loss falls, both ranks end with identical weights (checked by
    the trainer's SHA-256 comparison), rank 0 alone writes one checkpoint (and one event file), and it
    loads for inference."""
    result, out_dir = torchrun_straight
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the 2 processes end with identical weights" in result.stdout
    grid = f"samples_step_{TORCHRUN_STEPS:06d}.png"
    assert output_names(out_dir) == ["config.toml", EVENTS, "last.pt", "loss.png", grid, "train_log.csv"]
    with (out_dir / "train_log.csv").open(newline="") as log_file:
        losses = [float(row["loss"]) for row in csv.DictReader(log_file)]
    assert len(losses) == TORCHRUN_STEPS and np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3])
    model, _, checkpoint = load_for_inference(out_dir / "last.pt", torch.device("cpu"))
    assert checkpoint["step"] == TORCHRUN_STEPS and not any(
        key.startswith("module.") for key in checkpoint["model"]
    )
    assert len(checkpoint["rng"]) == 2  # each rank's own random stream
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])


def output_names(out_dir: Path) -> list[str]:
    """The folder's file names, each TensorBoard event file as EVENTS (its name has a time and a pid)."""
    return sorted(EVENTS if path.name.startswith(EVENTS[:-1]) else path.name for path in out_dir.iterdir())


def worker_of_rank(agent: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=rank (Linux /proc)."""
    for _ in range(600):
        children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
        for pid in children:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environment:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError("no torchrun worker found")


def test_sigterm_to_one_rank_stops_both_and_resumes_bit_exact(torchrun_straight, tmp_path):
    """SIGTERM to rank 1 only: both ranks stop at the same step (a signal to any rank stops them all
    within a step), rank 0 saves last.pt once; resuming it with torchrun to the end is bit-identical
    to the straight run."""
    out_dir = tmp_path / "interrupted"
    agent = subprocess.Popen(
        torchrun_command(out_dir, "--max-steps", str(TORCHRUN_STEPS)),
        cwd=REPO, env=ONE_THREAD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    rank_1 = worker_of_rank(agent, 1)
    deadline = time.monotonic() + 120
    while not ((out_dir / "train_log.csv").is_file() and len(logged_steps(out_dir)) >= 2):
        assert agent.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    os.kill(rank_1, signal.SIGTERM)
    stdout, stderr = agent.communicate(timeout=120)
    assert agent.returncode != 0  # both workers exit with 143
    saved = [line for line in stdout.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(saved) == 1 and "saved" in saved[0], stdout + stderr[-2000:]
    stopped = load_checkpoint(out_dir / "last.pt")
    assert 2 <= stopped["step"] < TORCHRUN_STEPS and f"at step {stopped['step']} " in saved[0]
    assert output_names(out_dir) == ["config.toml", EVENTS, "last.pt", "loss.png", "train_log.csv"]

    resumed = subprocess.run(
        torchrun_command(out_dir, "--max-steps", str(TORCHRUN_STEPS), "--resume", "latest"),
        cwd=REPO, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = load_checkpoint(torchrun_straight[1] / "last.pt")
    final = load_checkpoint(out_dir / "last.pt")
    assert_same_training_state(straight, final)
    assert torch.equal(straight["rng"][1]["torch"], final["rng"][1]["torch"])


@pytest.fixture(scope="module")
def finished_run(tiny_train_data, tmp_path_factory) -> Path:
    """The folder of a 1-step tiny run: last.pt and its log."""
    out_dir = tmp_path_factory.mktemp("finished")
    main(tiny_argv(tiny_train_data, out_dir, "--max-steps", "1"))
    return out_dir


def bad_input_cases(
    tiny_train_data: Path, finished_run: Path, tmp_path: Path
) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, what the one-line error must say)."""
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((finished_run / "last.pt").read_bytes()[:1000])
    weights_only = tmp_path / "weights_only.pt"
    checkpoint = load_checkpoint(finished_run / "last.pt")
    save_checkpoint({key: checkpoint[key] for key in ("version", "config", "model", "ema")}, weights_only)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    fresh = tiny_argv(tiny_train_data, tmp_path / "fresh")
    own_flags = f"resume it with its own flags (--config {finished_run / 'config.toml'})"
    return {
        "zero epochs": ([*fresh, "--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
        "negative batch": ([*fresh, "--batch-size", "-8"], "argument --batch-size: must be a positive"),
        "zero lr": ([*fresh, "--lr", "0"], "argument --lr: must be a positive number, got 0"),
        "T below 2": ([*fresh, "--T", "1"], "argument --T: must be an integer in [2, 100000], got 1"),
        "zero grad-accum": (
            [*fresh, "--grad-accum", "0"],
            "argument --grad-accum: must be a positive integer",
        ),
        "grad-accum not dividing the batch": (
            [*fresh, "--grad-accum", "3"],
            "--grad-accum 3 does not divide --batch-size 16",
        ),
        "no MPS here": ([*fresh, "--device", "mps"], "--device mps was asked for, but no Apple-silicon GPU"),
        "unknown data": ([*fresh, "--data", "imagenet"], "argument --data: invalid choice: 'imagenet'"),
        "compile mode alone": (
            [*fresh, "--compile-mode", "reduce-overhead"],
            "reduce-overhead needs --compile",
        ),
        "unwritable out-dir": (tiny_argv(tiny_train_data, a_file), f"cannot create output folder {a_file}"),
        "missing resume": ([*fresh, "--resume", str(tmp_path / "nope.pt")], "no checkpoint file at"),
        "corrupt resume": ([*fresh, "--resume", str(corrupt)], "is not a readable checkpoint"),
        "other architecture": (
            [*fresh, "--resume", str(finished_run / "last.pt"), "--model-channels", "16"],
            f"is another setup (model_channels 8 there, 16 here): {own_flags}",
        ),
        "other batch size": (
            [*fresh, "--resume", str(finished_run / "last.pt"), "--batch-size", "8"],
            f"is another setup (batch_size 16 there, 8 here): {own_flags}",
        ),
        "no training state": ([*fresh, "--resume", str(weights_only)], "can be evaluated but not resumed"),
        "run already there": (
            tiny_argv(tiny_train_data, finished_run),
            "exists: continue that run with --resume",
        ),
        "resume into another run": (
            [*tiny_argv(tiny_train_data, finished_run), "--resume", str(weights_only)],
            "exists: continue that run with --resume",
        ),
    }


BAD_INPUTS = [
    "zero epochs", "negative batch", "zero lr", "T below 2", "zero grad-accum",
    "grad-accum not dividing the batch", "no MPS here", "unknown data", "compile mode alone",
    "unwritable out-dir", "missing resume", "corrupt resume", "other architecture", "other batch size",
    "no training state", "run already there", "resume into another run",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_and_exit_code_2(case, tiny_train_data, finished_run, tmp_path, capsys):
    argv, message = bad_input_cases(tiny_train_data, finished_run, tmp_path)[case]
    log_before = (finished_run / "train_log.csv").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith("error: ") and message in error_lines[0]
    assert (finished_run / "train_log.csv").read_bytes() == log_before  # nothing of the old run touched


def test_compile_without_a_cpp_compiler_runs_eager_after_one_line(
    tiny_train_data, tmp_path, capsys, monkeypatch
):
    """On a CPU, torch.compile needs a C++ compiler; without one, --compile on says so in one line
    and the run goes on eager to its checkpoint."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-c++-compiler",))
    capsys.readouterr()
    main([*tiny_argv(tiny_train_data, tmp_path / "run", "--max-steps", "1"), "--compile", "on"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "C++ compiler" in line]
    assert len(lines) == 1 and "running eager" in lines[0]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 1


def test_command_line_error_has_no_traceback():
    result = subprocess.run(
        [sys.executable, str(REPO / "train_MNIST.py"), "--epochs", "-1"],
        cwd=REPO, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: argument --epochs: must be a positive integer, got -1 (see train_MNIST.py --help)"
    ]


# ----- the time budget (--max-minutes) ----------------------------------------------------------------

# T = 2: a stop's sample grid costs 2 steps. 3,000 steps of epochs and no warm-up: the budget alone
# shapes the LR and stops the run (a --max-steps 200 stops one that ignores its budget).
BUDGET_RUN = ("--T", "2", "--epochs", "1000", "--warmup-steps", "0", "--lr", "1e-3", "--clock", "cpu")


def longest_step_seconds(out_dir: Path) -> float:
    """The longest logged step's wall seconds, from img_per_s (16 images, one row per step): on one
    thread no fewer than its CPU seconds."""
    return max(IMAGES_PER_STEP / rate for rate in logged(out_dir, "img_per_s"))


def test_max_minutes_stops_once_the_budget_is_spent(tiny_train_data, tmp_path):
    """--max-minutes 0.01 --clock cpu: 0.6 CPU-seconds of training steps. The rule is checked before
    each step, so the run stops after the first step that ends at or past 0.6 s: the seconds recorded
    are at least 0.6 and less than 0.6 plus one step (bounded by twice the longest logged step)."""
    budget = 0.01 * 60
    argv = tiny_argv(tiny_train_data, tmp_path, *BUDGET_RUN, "--max-minutes", "0.01", "--max-steps", "200")
    result = train_in_process(argv)
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert result.stopped_by == "max_minutes" and 2 <= result.step == checkpoint["step"]
    assert logged_steps(tmp_path) == list(range(1, result.step + 1))
    assert budget <= checkpoint["train_seconds"] == result.train_seconds
    assert result.train_seconds < budget + 2 * longest_step_seconds(tmp_path)
    assert (tmp_path / f"samples_step_{result.step:06d}.png").is_file()


def test_the_cosine_lr_reaches_zero_at_the_end_of_the_budget(tiny_train_data, tmp_path):
    """After 3 steps (s CPU-seconds recorded; the epochs' own cosine has done 3 of its 3,000 steps),
    a resume with budget B trains its next step at 1e-3 x 0.5 (1 + cos(pi s / B)): B = 2 s gives
    cos(pi / 2) = 0, half the peak, 5e-4; B = 1.02 s gives at most 0.5 (1 + cos(pi / 1.02)) = 9.48e-4
    of the peak, and that run stops after the step, its budget spent."""
    first = tmp_path / "first"
    train_in_process(tiny_argv(tiny_train_data, first, *BUDGET_RUN, "--max-steps", "3"))
    seconds = load_checkpoint(first / "last.pt")["train_seconds"]
    results, next_lrs = {}, {}
    for ratio, max_steps in ((2.0, "4"), (1.02, "200")):
        out_dir = tmp_path / f"budget_{ratio}"
        shutil.copytree(first, out_dir)
        budget = ["--max-minutes", repr(ratio * seconds / 60), "--max-steps", max_steps]
        results[ratio] = train_in_process(
            tiny_argv(tiny_train_data, out_dir, *BUDGET_RUN, *budget, "--resume", "latest")
        )
        next_lrs[ratio] = logged(out_dir, "lr")[3]  # step 4's
    assert next_lrs[2.0] == pytest.approx(5e-4, rel=1e-3) and results[2.0].stopped_by == "max_steps"
    assert 0 <= next_lrs[1.02] <= 1e-3 * 9.484e-4
    assert (results[1.02].stopped_by, results[1.02].step) == ("max_minutes", 4)


def test_a_resumed_run_continues_the_budget_from_the_seconds_trained(tiny_train_data, tmp_path):
    """Budget 1.2 CPU-seconds: 3 steps (s seconds, recorded in last.pt); a resume with the same budget
    trains its first step at the LR of s seconds done, 1e-3 x 0.5 (1 + cos(pi s / 1.2)) (one that
    restarted the clock would train at the peak, 1e-3), and stops once the total reaches 1.2 s, not
    1.2 s after the resume; resuming that run again trains no step."""
    budget, flags = 0.02 * 60, (*BUDGET_RUN, "--max-minutes", "0.02")
    train_in_process(tiny_argv(tiny_train_data, tmp_path, *flags, "--max-steps", "3"))
    seconds = load_checkpoint(tmp_path / "last.pt")["train_seconds"]
    assert 0 < seconds < budget / 2
    resume = ("--max-steps", "200", "--resume", "latest")
    resumed = train_in_process(tiny_argv(tiny_train_data, tmp_path, *flags, *resume))
    expected_lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * seconds / budget))
    assert logged(tmp_path, "lr")[3] == pytest.approx(expected_lr, rel=1e-3)
    assert resumed.stopped_by == "max_minutes"
    assert budget <= resumed.train_seconds < budget + 2 * longest_step_seconds(tmp_path)
    again = train_in_process(tiny_argv(tiny_train_data, tmp_path, *flags, *resume))
    assert (again.stopped_by, again.step) == ("max_minutes", resumed.step)


# ----- what each training flag changes --------------------------------------------------------------


def test_a_short_run_lowers_the_loss(tiny_train_data, tmp_path):
    run(
        tiny_train_data, tmp_path, "--epochs", "8", "--lr", "3e-3", "--warmup-steps", "0", "--prediction", "v"
    )
    losses = logged(tmp_path, "loss")
    assert len(losses) == 24 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


# LR / 1e-3 at steps 1..9 of 3 epochs x 3 steps with 2 warm-up steps: (k + 1) / 2 for k = 0, 1 steps
# done, then 1 (constant) or 0.5 (1 + cos(pi j / 7)) for j = k - 2 = 0..6 of the 9 - 2 = 7 cosine steps:
# cos(pi/7) = 0.900969, cos(2pi/7) = 0.623490, cos(3pi/7) = 0.222521, and cos(pi - x) = -cos(x).
LR_FACTORS = {
    "constant": [0.5, 1, 1, 1, 1, 1, 1, 1, 1],
    "cosine": [0.5, 1, 1, 0.950484, 0.811745, 0.611260, 0.388740, 0.188255, 0.049516],
}


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_logged_learning_rate_follows_the_schedule(tiny_train_data, tmp_path, schedule):
    """A linear warm-up over 2 steps, then 1 or a cosine that would reach 0 at step 10 (--epochs x 3
    steps done); the log keeps 5 significant digits, the factors 6 decimals."""
    flags = ["--epochs", "3", "--warmup-steps", "2", "--lr", "1e-3", "--lr-schedule", schedule]
    run(tiny_train_data, tmp_path, *flags)
    np.testing.assert_allclose(logged(tmp_path, "lr"), 1e-3 * np.array(LR_FACTORS[schedule]), rtol=1e-4)


def test_linear_schedule_reaches_the_checkpoint(tiny_train_data, tmp_path):
    checkpoint = run(tiny_train_data, tmp_path, "--max-steps", "1", "--schedule", "linear")
    diffusion = GaussianDiffusion(**checkpoint["config"]["diffusion"])
    scale = 1000 / 20  # make_betas keeps alpha_bar_T of T = 1000 for other T
    torch.testing.assert_close(
        diffusion.betas, torch.linspace(scale * 1e-4, scale * 0.02, 20), rtol=1e-5, atol=0
    )


def test_weight_decay_is_decoupled(tiny_train_data, tmp_path):
    """AdamW's first step: p1 = p0 (1 - lr wd) - lr u with u the same Adam update in both runs (same
    weights, data and noise), so the two runs' weights differ by exactly -lr wd p0."""
    flags = ["--max-steps", "1", "--warmup-steps", "0", "--lr", "1e-2"]
    plain = run(tiny_train_data, tmp_path / "plain", *flags)["model"]
    decayed = run(tiny_train_data, tmp_path / "decayed", *flags, "--weight-decay", "0.5")["model"]
    seed_everything(0)
    initial = build_model(load_checkpoint(tmp_path / "plain" / "last.pt")["config"]).state_dict()
    for key, value in initial.items():
        torch.testing.assert_close(decayed[key] - plain[key], -1e-2 * 0.5 * value, rtol=0, atol=2e-7)


def test_min_snr_weights_lower_the_first_loss(tiny_train_data, tmp_path):
    """With the same draws, min(SNR, gamma) / SNR <= 1 weighs every example down (eps-prediction)."""
    run(tiny_train_data, tmp_path / "plain", "--max-steps", "1")
    run(tiny_train_data, tmp_path / "weighted", "--max-steps", "1", "--min-snr-gamma", "0.05")
    assert logged(tmp_path / "weighted", "loss")[0] < 0.9 * logged(tmp_path / "plain", "loss")[0]


def test_label_dropout_replaces_labels_with_the_null_label_at_its_rate():
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (200_000,))
    dropped = drop_labels(labels, 0.3)
    null = dropped == 10
    assert torch.equal(dropped[~null], labels[~null])
    assert null.float().mean().item() == pytest.approx(0.3, abs=5 * math.sqrt(0.3 * 0.7 / len(labels)))


def test_channels_last_trains_nhwc_weights(tiny_train_data, tmp_path):
    """One step at LR 2e-7 (Adam moves each weight by about the LR, whatever the rounding of its
    gradient): NHWC weights, equal to the NCHW run's within float error."""
    flags = ["--max-steps", "1", "--lr", "2e-7", "--warmup-steps", "0"]
    nhwc = run(tiny_train_data, tmp_path / "nhwc", *flags, "--channels-last", "on")
    plain = run(tiny_train_data, tmp_path / "plain", *flags, "--channels-last", "off")
    key = "down_levels.0.blocks.0.in_layers.2.weight"  # 8 input channels: the two layouts differ
    assert nhwc["model"][key].is_contiguous(memory_format=torch.channels_last)
    assert not plain["model"][key].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc["model"][key], plain["model"][key], rtol=1e-4, atol=1e-6)


def test_fp16_autocast_keeps_the_grad_scaler_state(tiny_train_data, tmp_path):
    checkpoint = run(tiny_train_data, tmp_path, "--max-steps", "2", "--amp", "fp16")
    assert checkpoint["scaler"]["scale"] > 0 and checkpoint["config"]["train"]["runtime"]["amp"] == "fp16"
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())


def test_ranks_get_disjoint_shares_of_each_step():
    """100 images, batch 8 on each of 3 ranks: 100 // 24 = 4 steps, 4 images dropped."""
    images, labels = torch.zeros(100, 1, 2, 2, dtype=torch.uint8), torch.zeros(100, dtype=torch.int64)
    ranks = [Processes(rank=rank, world_size=3, device=torch.device("cpu")) for rank in range(3)]
    data = TrainingData.in_steps(images, labels, batch_size=8, processes=ranks[0])
    assert data.steps_per_epoch == 4
    shares = [data.epoch_batches(seed=3, processes=processes) for processes in ranks]
    assert all(share.shape == (4, 8) for share in shares)
    for step in range(4):
        images = torch.cat([share[step] for share in shares])
        assert len(set(images.tolist())) == 24
    assert len(set(torch.cat(shares).flatten().tolist())) == 96


# ----- gradient accumulation (--grad-accum) ---------------------------------------------------------

# No dropout (its masks are drawn per forward pass) and no clipping (it would hide a wrong scale):
# the steps of K micro-batches then equal those of one batch, within float error. Class labels (with
# label dropout) and min-SNR weights go through the micro-batches too.
ROUNDING_NOISE = 1e-8  # |Adam's m| below it: a gradient that is 0 but for rounding
# Weights: Adam's m / sqrt(v) amplifies the rounding of a gradient that nearly cancels (seen: 1.3e-6 on
# 1 of 2,304 weights, AVX2 CPU); 5e-6 is 2.5% of one step at LR 2e-4, and wrong images or a wrong
# micro-batch weighting move the scale-sensitive moments, which are compared tightly.
WEIGHT_ATOL = 5e-6
ACCUMULATED_RUN = ("--dropout", "0", "--grad-clip", "1e6", "--class-cond", "--min-snr-gamma", "5")


def assert_same_optimizer_steps(first: dict, second: dict) -> None:
    """The same Adam moments within float error (m = 0.1 g after one step: scale-sensitive, unlike
    Adam's update), and the same weights and EMA, except where the gradient is 0 in exact arithmetic:
    the biases just before a GroupNorm, which removes them, get gradients of 1e-10 whose sign is
    rounding noise, and Adam scales those up to a whole step of the LR."""
    noise = set()
    for index, moments in first["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                second["optimizer"]["state"][index][name], moments[name], rtol=1e-4, atol=1e-9
            )
        if moments["exp_avg"].abs().max() < ROUNDING_NOISE:
            noise.add(index)
    for key in ("model", "ema"):
        for index, (name, weights) in enumerate(first[key].items()):  # no buffers: state-dict order
            if index not in noise:
                torch.testing.assert_close(second[key][name], weights, rtol=1e-4, atol=WEIGHT_ATOL)


def test_grad_accum_steps_equal_one_batch_of_the_same_images(tiny_train_data, tmp_path):
    """2 optimizer steps of 16 images, in 1 or 4 micro-batches of 4: the same logged loss and gradient
    norm, Adam moments, weights and EMA; the step counts optimizer steps."""
    flags = [*ACCUMULATED_RUN, "--max-steps", "2"]
    whole = run(tiny_train_data, tmp_path / "whole", *flags)
    parts = run(tiny_train_data, tmp_path / "parts", *flags, "--grad-accum", "4")
    assert whole["step"] == parts["step"] == 2 and parts["config"]["train"]["training"]["grad_accum"] == 4
    for column in ("loss", "grad_norm"):
        np.testing.assert_allclose(
            logged(tmp_path / "parts", column), logged(tmp_path / "whole", column), 1e-4
        )
    assert_same_optimizer_steps(whole, parts)


def test_grad_accum_unscales_and_clips_once_per_optimizer_step(tiny_train_data, tmp_path, monkeypatch):
    """fp16 with a grad scaler, 4 micro-batches: 2 optimizer steps clip twice and update the scaler
    twice (its growth tracker counts the updates since the last back-off)."""
    clip, calls = torch.nn.utils.clip_grad_norm_, []
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda *args, **kw: calls.append(1) or clip(*args, **kw)
    )
    checkpoint = run(tiny_train_data, tmp_path, "--max-steps", "2", "--amp", "fp16", "--grad-accum", "4")
    assert len(calls) == 2 and checkpoint["step"] == 2
    assert checkpoint["scaler"]["_growth_tracker"] == checkpoint["optimizer_steps"] == 2


def test_grad_accum_resume_is_bit_exact(tiny_train_data, tmp_path):
    """4 steps of 2 micro-batches straight == 2 + resume + 2 (checkpoints fall between optimizer
    steps), with dropout on."""
    flags = ["--grad-accum", "2", "--dropout", "0.1"]
    main(tiny_argv(tiny_train_data, tmp_path / "straight", *flags, "--max-steps", "4"))
    main(tiny_argv(tiny_train_data, tmp_path / "split", *flags, "--max-steps", "2"))
    main(tiny_argv(tiny_train_data, tmp_path / "split", *flags, "--max-steps", "4", "--resume", "latest"))
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    assert_same_training_state(straight, load_checkpoint(tmp_path / "split" / "last.pt"))
    assert straight["step"] == 4


def test_torchrun_grad_accum_equals_one_batch_per_rank(tmp_path):
    """torchrun, gloo, 2 processes: 2 optimizer steps of 16 images per rank, in 1 or 2 micro-batches,
    end with the same Adam moments and weights within float error, and identical replicas."""
    checkpoints = []
    for parts in ("1", "2"):
        result = subprocess.run(
            torchrun_command(tmp_path / parts, *ACCUMULATED_RUN, "--max-steps", "2", "--grad-accum", parts),
            cwd=REPO, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert "the 2 processes end with identical weights" in result.stdout
        checkpoints.append(load_checkpoint(tmp_path / parts / "last.pt"))
    whole, parts = checkpoints
    assert_same_optimizer_steps(whole, parts)


def test_grad_accum_all_reduces_once_per_step_under_ddp(tmp_path):
    """Run.accumulate_gradients on a DDP-wrapped U-Net (gloo, one process): 4 micro-batches all-reduce
    each gradient bucket once, as one batch does (no_sync for the first 3), and give its gradients."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        seed_everything(0)
        network = DistributedDataParallel(build_model(tiny_config()))
        all_reduces = []

        def counting_hook(state, bucket):
            all_reduces.append(bucket.index())
            return default_hooks.allreduce_hook(None, bucket)

        network.register_comm_hook(None, counting_hook)
        x0 = torch.rand(8, 1, 28, 28) * 2 - 1
        gradients, counts = {}, {}
        for parts in (1, 4):
            job = training_job_from_flags(
                ["--batch-size", "8", "--grad-accum", str(parts), "--device", "cpu"]
            )
            run_state = SimpleNamespace(
                job=job,
                diffusion=GaussianDiffusion(**tiny_config()["diffusion"]),
                plan=SpeedPlan(amp="none", compile=False, compile_mode="default", channels_last=False),
                processes=Processes(rank=0, world_size=1, device=torch.device("cpu")),
                network=network,
                state=SimpleNamespace(
                    scaler=torch.amp.GradScaler("cpu", enabled=False), timestep_sampler=UniformSampler(100)
                ),
            )
            network.zero_grad(set_to_none=True)
            all_reduces.clear()
            torch.manual_seed(1)
            Run.accumulate_gradients(run_state, x0, None)  # type: ignore[arg-type]
            gradients[parts] = [parameter.grad.clone() for parameter in network.parameters()]
            counts[parts] = sorted(all_reduces)
        assert counts[4] == counts[1] and len(counts[1]) == len(set(counts[1])) >= 1
        for accumulated, whole in zip(gradients[4], gradients[1], strict=True):
            torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-7)
    finally:
        dist.destroy_process_group()


# ----- checkpoint names -----------------------------------------------------------------------------


def test_epoch_checkpoints_are_named_after_the_data():
    """mnist and mnist-5k are both MNIST: mnist_epoch_XX.pt as before; other data sets by their name;
    --data-dir by its folder's name, characters other than letters, digits, . _ - replaced by -."""
    assert data_name("mnist", None) == data_name("mnist-5k", None) == "mnist"
    assert [data_name(data, None) for data in ("fashion-mnist", "cifar10", "celeba")] == [
        "fashion-mnist", "cifar10", "celeba"
    ]  # fmt: skip
    assert data_name("mnist", "runs/cifar-10-batches-py/") == "cifar-10-batches-py"
    assert data_name("cifar10", "/data/my pngs*") == "my-pngs-"


def test_old_and_new_epoch_checkpoint_names_resume_and_resolve(tiny_train_data, tmp_path):
    """A --data-dir run names its epoch checkpoints after the folder. A folder holding an older run's
    mnist_epoch_01.pt (and no last.pt) resumes from it with --resume latest, then also holds
    <folder>_epoch_02.pt: the newest by epoch is the latest whatever its name, and eval's --checkpoint
    resolution (default and glob) finds both names."""
    new_name = f"{tiny_train_data.name}_epoch_01.pt"
    run(tiny_train_data, tmp_path, "--epochs", "1", "--save-every", "1")
    assert sorted(path.name for path in tmp_path.glob("*.pt")) == sorted(["last.pt", new_name])
    (tmp_path / "last.pt").unlink()
    (tmp_path / new_name).rename(tmp_path / "mnist_epoch_01.pt")  # as runs were named before
    resumed = run(tiny_train_data, tmp_path, "--epochs", "2", "--save-every", "1", "--resume", "latest")
    assert (resumed["step"], resumed["epoch"]) == (6, 2) and logged_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    (tmp_path / "last.pt").unlink()
    newest = tmp_path / f"{tiny_train_data.name}_epoch_02.pt"
    assert latest_checkpoint(tmp_path) == resolve_checkpoint(None, tmp_path) == newest
    matches = resolve_checkpoints(str(tmp_path / "*_epoch_*.pt"))
    assert sorted(matches) == sorted([tmp_path / "mnist_epoch_01.pt", newest])


# ----- readers, metrics and checkpoint errors ------------------------------------------------------


def test_mnist_reader_reads_torchvision_raw_files(tmp_path):
    """torchvision's MNIST reads data/MNIST/raw/*-ubyte and downloads nothing when they are there."""
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    pixels = {
        "train": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
    }
    for prefix, array in pixels.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", array)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(len(array), dtype=np.uint8))
    images, labels = load_images("mnist", "test", root=tmp_path)
    assert labels.tolist() == [0, 1, 2]
    assert torch.equal(image_metrics.to_uint8(images)[:, 0], torch.from_numpy(pixels["t10k"]))


def test_reconstruction_metrics_equal_hand_computed_values():
    """Black (-1) against mid-grey (0): MSE (0.5)^2 = 0.25 on [0, 1]; PSNR 10 log10(4) = 6.0206 dB;
    SSIM of two constant images is the luminance term alone, (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    with C1 = (0.01 x data_range)^2 = 1e-4: 1e-4 / 0.2501. Identical images: 0, 120 dB (the cap), 1."""
    black, grey = torch.full((2, 1, 8, 8), -1.0), torch.zeros(2, 1, 8, 8)
    scores = image_metrics.reconstruction_metrics(black, grey)
    np.testing.assert_allclose(scores["mse"], 0.25)
    np.testing.assert_allclose(scores["psnr"], 10 * math.log10(4))
    np.testing.assert_allclose(scores["ssim"], 1e-4 / 0.2501, rtol=1e-6)
    same = image_metrics.reconstruction_metrics(grey, grey)
    assert (
        same["mse"].tolist() == [0, 0]
        and same["psnr"].tolist() == [120, 120]
        and same["ssim"].tolist() == [1, 1]
    )


def test_checkpoint_error_paths_are_one_line(tmp_path, tiny_checkpoint):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this repo"):
        load_checkpoint(tmp_path / "list.pt")
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["config"]["model"]["model_channels"] = 24
    save_checkpoint(checkpoint, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not match this code's model: Error") as error:
        load_for_inference(tmp_path / "other.pt", torch.device("cpu"))
    assert len(str(error.value).splitlines()) == 1


def test_latest_checkpoint_falls_back_to_the_highest_epoch_whatever_the_data_name(tmp_path):
    names = ("mnist_epoch_05.pt", "cifar10_epoch_20.pt", "mnist_epoch_100.pt", "my-pngs_epoch_99.pt")
    for name in (*names, "notes.pt", "epoch_200.pt"):
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "mnist_epoch_100.pt"
    (tmp_path / "celeba_epoch_101.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "celeba_epoch_101.pt"
    (tmp_path / "last.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "last.pt"
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        latest_checkpoint(tmp_path / "empty")
