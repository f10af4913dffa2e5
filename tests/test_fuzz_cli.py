"""A fuzzed command line: seeded random flags for train_MNIST.py, eval_MNIST.py and vizu_MNIST.py, each
run in-process; every one works or ends with exactly one `error:` line and status 2, never a traceback.

Each case starts from a tiny valid command (8-channel U-Net, T = 2, one step, 48 training digits; the
session's tiny checkpoint with 2 samples and 2 reconstructions, vizu without the commitment
classifier) and appends 1 to 3 flags drawn from every flag of the script, each with a value drawn
from: its default, its choices and a wrong one, zero, negative, tiny, huge, NaN, inf, empty, a wrong
type, lists, and paths that are missing, a file where a folder is expected and a folder where a file
is. A flag whose value is the amount of work
(samples, repeats, images, NLL images, CAS epochs, the metrics) or that compiles is not given huge,
default or compiling values: those run long on purpose, they are not faults. A train run with T = 2
draws its sample grid in 2 steps, and the data splits are read once, so that the 201 cases stay
within seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
from pathlib import Path

import torch
from helpers import tiny_train_argv

import eval_MNIST
import train_MNIST
import vizu_MNIST
from ddpm.plumbing.cli import run_cli
from ddpm.plumbing.inference_settings import EvaluationSettings, VisualisationSettings
from ddpm.plumbing.presets import TrainingJob
from ddpm.plumbing.settings import DataSettings, GuidedSamplingSettings, RuntimeSettings, SamplingSettings

CASES_PER_SCRIPT = 67
SEED = 18
GENERIC_VALUES = [
    "0",
    "-1",
    "1",
    "2",
    "0.5",
    "-0.5",
    "1e-30",
    "nan",
    "inf",
    "-inf",
    "",
    " ",
    "abc",
    "1,2",
    ",",
    "3,x",
]
HUGE_VALUES = ["999999999999", "1e308", "99999999999999999999999"]
WORK_FLAGS = {  # the amount of work (samples, images, epochs of CAS) or compiling: never huge, never "on"
    "--num-samples", "--num-recon", "--num-images", "--cas-epochs", "--compile", "--compile-mode",
    "--repeats", "--num-nll", "--metrics", "--eval-samples",
}  # fmt: skip
FLAG_VALUES = {
    "--device": ["cpu", "cuda", "cuda:1", "cpu:0", "meta", "mps"],
    "--seed": ["4294967295", "4294967296"],
}
PATH_WORDS = ("dir", "checkpoint", "resume", "json", "classifier", "weights")


def script_flags(*add_flags) -> list[argparse.Action]:
    """The argparse actions a script's parser gets from these Settings.add_flags-like functions."""
    parser = argparse.ArgumentParser(add_help=False)
    for add in add_flags:
        add(parser)
    return [action for action in parser._actions if action.option_strings]


SCRIPTS = {  # the flags each script adds (train_MNIST.py, eval_MNIST.parse_args, vizu_MNIST.parse_args)
    "train": script_flags(TrainingJob.add_flags),
    "eval": script_flags(EvaluationSettings.add_flags, SamplingSettings.add_flags,
                         DataSettings.add_checkpoint_flags, RuntimeSettings.add_flags),
    "vizu": script_flags(VisualisationSettings.add_flags, GuidedSamplingSettings.add_flags,
                         DataSettings.add_checkpoint_flags),
}  # fmt: skip
DEFAULT_SHARE = 0.3  # the part of the drawn values that are the flag's default: runs that work


def values_for(action: argparse.Action, paths: dict[str, str]) -> list[str | None]:
    """What a flag may be given (None: the flag alone, as a boolean or a missing value)."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [None, "x"]
    values = [*GENERIC_VALUES, *FLAG_VALUES.get(flag, []), None]
    if flag not in WORK_FLAGS:
        values += HUGE_VALUES
    if action.choices:
        values += [str(choice) for choice in action.choices if not (flag in WORK_FLAGS and choice == "on")]
        values.append("not-a-choice")
    if any(word in flag for word in PATH_WORDS):
        values += list(paths.values())
    return values


def draw_flags(
    rng: random.Random, case: int, actions: list[argparse.Action], paths: dict[str, str]
) -> list[str]:
    """1 to 3 flags with drawn values; the case-th flag of the script (in turn) comes first, so that
    every flag is drawn."""
    first = actions[case % len(actions)]
    others = rng.sample([action for action in actions if action is not first], rng.randint(0, 2))
    argv = []
    for action in [first, *others]:
        value = rng.choice(values_for(action, paths))
        default = action.default
        usable = (
            default is not None
            and not isinstance(default, bool)
            and action.option_strings[0] not in WORK_FLAGS
        )
        if usable and rng.random() < DEFAULT_SHARE:
            value = str(default)
        if isinstance(action, argparse.BooleanOptionalAction):
            flag = rng.choice(action.option_strings)
            argv += [flag] if value is None else [f"{flag}={value}"]
        else:
            argv += [action.option_strings[0]] + ([] if value is None else [value])
    return argv


def base_argv(script: str, case_dir: Path, tiny_data: Path, tiny_checkpoint: Path) -> list[str]:
    if script == "train":
        return tiny_train_argv(tiny_data, case_dir / "out", "--max-steps", "1", "--epochs", "1", "--T", "2")
    common = ["--checkpoint", str(tiny_checkpoint), "--steps", "2", "--sampler", "ddim", "--data", "mnist-5k"]
    if script == "eval":
        return [*common, "--num-samples", "2", "--batch-size", "2", "--metrics", "recon", "--num-recon", "2",
                "--recon-t", "5", "--num-nll", "2", "--device", "cpu",
                "--json", str(case_dir / "r.json")]  # fmt: skip
    return [*common, "--t", "5", "--num-images", "1", "--gif-frames", "2", "--strip-steps", "2",
            "--no-commitment", "--out-dir", str(case_dir / "vizu"), "--device", "cpu"]  # fmt: skip


MAINS = {"train": train_MNIST.main, "eval": eval_MNIST.main, "vizu": vizu_MNIST.main}


def outcome(script: str, argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of the script's main run as its command line runs it (run_cli)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            run_cli(lambda: MAINS[script](argv))
            status = 0
        except SystemExit as exit_info:
            status = exit_info.code if isinstance(exit_info.code, int) else 1
    return status, stderr.getvalue()


def test_fuzzed_command_lines_work_or_give_one_error_line(
    tiny_train_data, tiny_checkpoint, tmp_path, monkeypatch, read_data_once
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no InceptionV3 weights: one note
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # default outputs (checkpoints/, eval_outputs/) go there
    a_file, a_folder = tmp_path / "a_file.pt", tmp_path / "a_folder"
    a_file.write_bytes(b"not a checkpoint")
    a_folder.mkdir()
    paths = {"missing": str(tmp_path / "missing"), "file": str(a_file), "folder": str(a_folder),
             "file/below": str(a_file / "below"), "checkpoint": str(tiny_checkpoint)}  # fmt: skip
    rng = random.Random(SEED)
    failures, statuses = [], []
    threads = torch.get_num_threads()
    for index in range(CASES_PER_SCRIPT * len(SCRIPTS)):
        script = list(SCRIPTS)[index % len(SCRIPTS)]
        case_dir = tmp_path / f"case{index}"
        argv = [
            *base_argv(script, case_dir, tiny_train_data, tiny_checkpoint),
            *draw_flags(rng, index // len(SCRIPTS), SCRIPTS[script], paths),
        ]
        try:
            status, stderr = outcome(script, argv)
        except Exception as error:  # a traceback: the fault this test looks for
            failures.append(f"{script} {argv}: {type(error).__name__}: {error}")
            continue
        finally:
            torch.set_num_threads(threads)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        if status not in (0, 2) or (status == 2) != (len(errors) == 1) or len(errors) > 1:
            failures.append(f"{script} {argv}: status {status}, stderr {stderr[-500:]!r}")
        statuses.append(status)
    assert not failures, "\n".join(failures)
    assert statuses.count(0) >= 20 and statuses.count(2) >= 100  # both outcomes are exercised
