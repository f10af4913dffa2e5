"""train_MNIST.py on a tiny U-Net (8 channels, T = 20) and tiny data, on one CPU thread.

Most runs call `main(argv)` in-process; SIGTERM, exit codes and torchrun need a subprocess.
The tiny data set is the first 48 MNIST-5k digits as IDX files: with --batch-size 16 an epoch is 3
steps, so a few steps cross epoch ends (checkpoints, sample grids, a new shuffle).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_UNET_FLAGS

from ddpm.plumbing.checkpointing import CHECKPOINT_VERSION, load_checkpoint, load_for_inference, save_checkpoint
from ddpm.plumbing.cli import run_cli
from diffusion import GaussianDiffusion
from train_MNIST import main

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = [*TINY_UNET_FLAGS, "--T", "20", "--batch-size", "16", "--warmup-steps", "2", "--log-every", "1"]
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN_STEPS = 24  # the torchrun runs' length: room for a SIGTERM after step 2 to land before the end


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: fast on a busy 2-core box, and the same kernels in-process and in subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_argv(data: Path, out_dir: Path, *extra: str) -> list[str]:
    return [*TINY_RUN, "--data-dir", str(data), "--device", "cpu", "--out-dir", str(out_dir), *extra]


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


def logged_steps(out_dir: Path) -> list[int]:
    with (out_dir / "train_log.csv").open(newline="") as log_file:
        return [int(row["step"]) for row in csv.DictReader(log_file)]


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
    for name in ("mnist_epoch_02.pt", "samples_epoch_02.png", "loss.png"):  # the last epoch always
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
    flags = [*TINY_RUN, "--data", "mnist-5k", "--device", "cpu", "--epochs", "2"]
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
    original_loss, calls = GaussianDiffusion.training_loss, []

    def loss_that_turns_nan(self, *args, **kwargs):
        calls.append(1)
        loss = original_loss(self, *args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(GaussianDiffusion, "training_loss", loss_that_turns_nan)
    argv = tiny_argv(tiny_train_data, tmp_path, "--epochs", "3", "--log-every", "3", "--save-every", "1")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: loss became nan at step 4: training stopped")
    assert sorted(path.name for path in tmp_path.glob("*.pt")) == ["last.pt", "mnist_epoch_01.pt"]
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert checkpoint["step"] == 3 and all(
        torch.isfinite(value).all() for value in checkpoint["model"].values()
    )
    assert logged_steps(tmp_path) == [3]


def torchrun_command(out_dir: Path, *extra: str) -> list[str]:
    """2 CPU processes (gloo) of the tiny run on MNIST-5k (156 steps per epoch)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO / "train_MNIST.py"), *TINY_RUN, "--data", "mnist-5k", "--device", "cpu",
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
    the trainer's SHA-256 comparison), rank 0 alone writes one checkpoint, and it loads for inference."""
    result, out_dir = torchrun_straight
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the 2 processes end with identical weights" in result.stdout
    assert sorted(path.name for path in out_dir.iterdir()) == [
        "last.pt", "loss.png", f"samples_step_{TORCHRUN_STEPS:06d}.png", "train_log.csv"
    ]  # fmt: skip
    with (out_dir / "train_log.csv").open(newline="") as log_file:
        losses = [float(row["loss"]) for row in csv.DictReader(log_file)]
    assert len(losses) == TORCHRUN_STEPS and np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3])
    model, _, checkpoint = load_for_inference(out_dir / "last.pt", torch.device("cpu"))
    assert checkpoint["step"] == TORCHRUN_STEPS and not any(
        key.startswith("module.") for key in checkpoint["model"]
    )
    assert len(checkpoint["rng"]) == 2  # each rank's own random stream
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])


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
    assert sorted(path.name for path in out_dir.iterdir()) == ["last.pt", "loss.png", "train_log.csv"]

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
    return {
        "zero epochs": ([*fresh, "--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
        "negative batch": ([*fresh, "--batch-size", "-8"], "argument --batch-size: must be a positive"),
        "zero lr": ([*fresh, "--lr", "0"], "argument --lr: must be a positive number, got 0"),
        "T below 2": ([*fresh, "--T", "1"], "argument --T: must be an integer in [2, 100000], got 1"),
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
            "is another setup (model_channels 8 there, 16 here): resume it with its own flags",
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
    "zero epochs", "negative batch", "zero lr", "T below 2", "unknown data", "compile mode alone",
    "unwritable out-dir", "missing resume", "corrupt resume", "other architecture", "no training state",
    "run already there", "resume into another run",
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
