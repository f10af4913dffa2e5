"""Config files (--config FILE.toml on every script, a run's config.toml) and the choice of --device.

A run's config.toml reads back into the same TrainingJob and repeats the run to the bit in a new
folder; a preset, a config file and the command line stack in that order; a config file that does
not parse, names an unknown flag or gives a wrong type is one `error:` line and status 2 in every
script. `--device auto` takes CUDA, then MPS, then the CPU (`choose_device`, with the machine's
accelerators as arguments); an absent device is one line.
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import tiny_train_argv

import eval_MNIST
import train_MNIST
import vizu_MNIST
from ddpm.evaluation import train_classifier
from ddpm.plumbing import runtime
from ddpm.plumbing.checkpointing import load_checkpoint
from ddpm.plumbing.cli import run_cli
from ddpm.plumbing.config_file import CONFIG_NAME
from ddpm.plumbing.messages import UserError
from ddpm.plumbing.presets import training_job_from_flags, write_run_config
from ddpm.plumbing.runtime import choose_device, plan_speed

ODD_PATH = 'runs/a "quoted" \\ back-slashed, tabbed\tfolder ü 🙂'  # TOML escapes and non-ASCII text


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ----- a run's config.toml ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--preset", "cpu", "--lr", "1e-3", "--channel-mult", "1,2", "--attn-resolutions", "", "--hflip"],
        ["--preset", "cifar10", "--data-dir", ODD_PATH, "--max-minutes", "2.5", "--grad-accum", "4"],
        ["--class-cond", "--min-snr-gamma", "5", "--no-scale-shift-norm", "--T", "50", "--seed", "7"],
    ],
)
def test_the_written_config_reads_back_the_same_job(argv, tmp_path):
    """Every resolved flag (tuples, empty tuples, booleans, None left out, escaped text) comes back."""
    job = training_job_from_flags([*argv, "--out-dir", str(tmp_path)])
    path = write_run_config(job, tmp_path)
    assert path == tmp_path / CONFIG_NAME
    assert training_job_from_flags(["--config", str(path)]) == job


def test_resume_is_not_recorded(tmp_path):
    """config.toml says what is trained, not how the run was started: --config CONFIG repeats it,
    --config CONFIG --resume latest continues it."""
    job = training_job_from_flags(["--resume", "latest", "--out-dir", str(tmp_path)])
    path = write_run_config(job, tmp_path)
    assert "resume" not in tomllib.loads(path.read_text())
    assert training_job_from_flags(["--config", str(path)]) == replace(job, run=replace(job.run, resume=None))


def test_a_run_writes_its_config_and_the_config_repeats_it(tiny_train_data, tmp_path, capsys):
    """A tiny run writes config.toml beside last.pt; --config into the same folder is refused (no
    overwrite); with another --out-dir it trains the same weights to the bit."""
    argv = tiny_train_argv(tiny_train_data, tmp_path / "first", "--max-steps", "2")
    train_MNIST.main(argv)
    config = tmp_path / "first" / CONFIG_NAME
    assert training_job_from_flags(["--config", str(config)]) == training_job_from_flags(argv)
    before = config.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train_MNIST.main(["--config", str(config)]))
    assert exit_info.value.code == 2 and "continue that run with --resume" in capsys.readouterr().err
    assert config.read_bytes() == before
    train_MNIST.main(["--config", str(config), "--out-dir", str(tmp_path / "again")])
    first, again = (load_checkpoint(tmp_path / name / "last.pt") for name in ("first", "again"))
    for key, weights in first["model"].items():
        assert torch.equal(again["model"][key], weights), key


# ----- precedence: preset < config file < command line -------------------------------------------------


def test_preset_then_config_file_then_command_line(tmp_path):
    config = write(
        tmp_path / "run.toml", 'preset = "cpu"\nlr = 1e-3\nbatch-size = 64\nchannel-mult = [1, 2]\n'
    )
    job = training_job_from_flags(["--config", str(config), "--batch-size", "32"])
    assert job.preset == "cpu" and job.model.model_channels == 16  # the file's preset
    assert job.training.lr == 1e-3 and job.model.channel_mult == (1, 2)  # the file over the preset
    assert job.training.batch_size == 32  # the command line over the file
    assert job.training.min_snr_gamma == 5.0  # the preset where neither says
    gpu = training_job_from_flags(["--config", str(config), "--preset", "gpu"])
    assert gpu.preset == "gpu" and gpu.model.model_channels == 64 and gpu.training.lr == 1e-3


def test_every_script_reads_a_config_file(tmp_path):
    eval_settings, sampling, _, _ = eval_MNIST.parse_args(
        ["--config", str(write(tmp_path / "eval.toml", 'num-samples = 20\nsampler = "dpm++2m"\n'))]
    )
    assert (eval_settings.num_samples, sampling.sampler) == (20, "dpm++2m")
    vizu_settings, guided, _, editing = vizu_MNIST.parse_args(
        [
            "--config",
            str(write(tmp_path / "vizu.toml", "t = 300\nguidance = [1, 2]\ngenerate = true\nframes = 5\n")),
        ]
    )
    assert (vizu_settings.t, guided.guidance, vizu_settings.generate) == (300, (1.0, 2.0), True)
    assert editing.frames == 5
    classifier_args = train_classifier.parse_args(
        [
            "--config",
            str(write(tmp_path / "classifier.toml", 'data = "mnist-5k"\nepochs = 2\n')),
            "--epochs",
            "3",
        ]
    )
    assert (classifier_args.data, classifier_args.epochs) == ("mnist-5k", 3)


# ----- bad config files: one line, status 2, nothing written -------------------------------------------

SCRIPTS = {
    "train_MNIST.py": train_MNIST.main,
    "eval_MNIST.py": eval_MNIST.main,
    "vizu_MNIST.py": vizu_MNIST.main,
    "train_classifier": train_classifier.main,
}
ALL_SCRIPTS = tuple(SCRIPTS)
BAD_CONFIGS = {  # case: (file, what its error line says, the scripts that have its key)
    "not TOML": ("seed = = 3\n", "is not valid TOML", ALL_SCRIPTS),
    "not UTF-8": (b"seed = \xff\n", "is not UTF-8 text", ALL_SCRIPTS),
    "unknown key": ("sed = 1\n", "unknown key 'sed'", ALL_SCRIPTS),
    "text for a number": ('seed = "abc"\n', "seed = 'abc': invalid", ALL_SCRIPTS),
    "float for an integer": ("seed = 2.5\n", "seed = 2.5: invalid", ALL_SCRIPTS),
    "number for text": ("device = 5\n", "device = 5: expected a string in quotes", ALL_SCRIPTS),
    "a table": ("[seed]\nvalue = 1\n", "expected a number, a string or a list", ALL_SCRIPTS),
    "not a choice": ('data = "imagenet"\n', "data = 'imagenet': choose from", ALL_SCRIPTS),
    "set twice": ('data_dir = "a"\ndata-dir = "b"\n', "data-dir is set twice", ALL_SCRIPTS),
    "text for a switch": (
        'ema = "yes"\n',
        "ema = 'yes': expected true or false",
        ("eval_MNIST.py", "vizu_MNIST.py"),
    ),
}


@pytest.mark.parametrize(
    ("case", "script"), [(case, script) for case, (*_, scripts) in BAD_CONFIGS.items() for script in scripts]
)
def test_a_bad_config_file_is_one_line_and_status_2(case, script, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a script that ran by mistake would write here
    text, message, _ = BAD_CONFIGS[case]
    config = tmp_path / "bad.toml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: SCRIPTS[script](["--config", str(config)]))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: config file {config}") and message in lines[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.toml"]


@pytest.mark.parametrize("config", ["missing.toml", "."])
def test_a_config_file_that_cannot_be_read_is_one_line(config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run_cli(lambda: train_MNIST.main(["--config", config]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read config file {config}")


# ----- --device ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cuda_count", "mps", "expected"),
    [
        ("auto", 2, True, "cuda"),
        ("auto", 0, True, "mps"),
        ("auto", 0, False, "cpu"),
        ("cpu", 1, True, "cpu"),
        ("mps", 1, True, "mps"),
        ("cuda:1", 2, False, "cuda:1"),
    ],
)
def test_auto_takes_cuda_then_mps_then_the_cpu(name, cuda_count, mps, expected):
    assert choose_device(name, cuda_count=cuda_count, mps=mps) == torch.device(expected)


@pytest.mark.parametrize(
    ("name", "cuda_count", "mps", "message"),
    [
        ("mps", 1, False, "--device mps was asked for, but no Apple-silicon GPU (MPS) is available"),
        ("cuda", 0, True, "--device cuda was asked for, but no CUDA GPU is available"),
        ("cuda:2", 2, False, "--device cuda:2: this machine has 2 CUDA GPU(s)"),
        ("metal", 0, True, "--device must be auto, cpu, cuda[:N] or mps, got 'metal'"),
    ],
)
def test_an_absent_device_is_one_line(name, cuda_count, mps, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        choose_device(name, cuda_count=cuda_count, mps=mps)


def test_auto_on_mps_is_eager_fp32():
    """MPS's autocast and Inductor backend are opt-in (--amp fp16|bf16, --compile on): auto is fp32,
    eager, NCHW there."""
    plan = plan_speed("auto", "auto", "auto", "auto", torch.device("mps"))
    assert (plan.amp, plan.compile, plan.channels_last) == ("none", False, False)
    assert plan_speed("fp16", "on", "auto", "auto", torch.device("mps")).compile_mode == "default"


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_says_it_is_emulated(native, monkeypatch, capsys):
    """--amp bf16 is honoured on any CPU, with one line where the CPU has no bfloat16 of its own
    (AVX512-BF16 or AMX), since emulated bf16 is many times slower than fp32."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert plan_speed("bf16", "off", "auto", "off", torch.device("cpu")).amp == "bf16"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == (0 if native else 1) and all("autocast emulates it" in line for line in lines)


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("train_MNIST.py", []),
        ("eval_MNIST.py", ["--checkpoint", "demo"]),  # demo: no note on the checkpoint it chose
        ("vizu_MNIST.py", ["--checkpoint", "demo"]),
    ],
)
def test_device_mps_without_mps_is_one_line(script, argv, tmp_path, capsys, monkeypatch):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: SCRIPTS[script](["--device", "mps", *argv]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1
    assert lines[0].startswith(
        "error: --device mps was asked for, but no Apple-silicon GPU (MPS) is available"
    )
