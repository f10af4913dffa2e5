"""What a fresh clone offers before any training: the shipped classifier and demo model (pinned by
their sha256), the fast path decided per device with an eager fallback, presets, and pictures that
show every class."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from torch import nn

from ddpm.datasets.sources import spread_over_classes
from ddpm.evaluation.classifier import (
    SHIPPED_CLASSIFIER,
    SHIPPED_CLASSIFIER_SHA256,
    accuracy,
    load_classifier,
)
from ddpm.plumbing import checkpointing, runtime
from ddpm.plumbing.checkpointing import DEMO_CHECKPOINT, load_checkpoint, resolve_checkpoint
from ddpm.plumbing.presets import PRESETS, training_job_from_flags
from ddpm.plumbing.provenance import sha256_of_file

DEMO_SHA256 = checkpointing.DEMO_CHECKPOINT_SHA256
MAX_SHIPPED_BYTES = 5 * 1024 * 1024


# ----- shipped files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "digest"), [(SHIPPED_CLASSIFIER, SHIPPED_CLASSIFIER_SHA256), (DEMO_CHECKPOINT, DEMO_SHA256)]
)
def test_shipped_files_match_their_recorded_sha256_and_size(path, digest):
    assert path.is_file() and path.stat().st_size < MAX_SHIPPED_BYTES
    assert sha256_of_file(path) == digest


def test_shipped_classifier_has_its_recorded_test_accuracy(mnist_5k_test):
    """The file's recorded accuracy is what it scores on the 1,000 MNIST-5k test digits (exactly: the
    same network and images, so the count of correct digits must agree)."""
    model, info = load_classifier(SHIPPED_CLASSIFIER)
    images, labels = mnist_5k_test
    assert info["data"] == "mnist-5k" and info["epochs"] == 10 and info["seed"] == 0
    assert accuracy(model, images, labels) == pytest.approx(info["test_accuracy"], abs=0.5 / len(labels))
    assert info["test_accuracy"] > 0.95


def test_demo_model_is_ema_weights_of_the_cpu_preset():
    checkpoint = load_checkpoint(DEMO_CHECKPOINT)
    assert set(checkpoint) >= {"version", "config", "ema"} and "model" not in checkpoint
    train = checkpoint["config"]["train"]
    assert train["preset"] == "cpu" and train["data"]["data"] == "mnist-5k"
    assert checkpoint["config"]["image_shape"] == [1, 28, 28]


def run_quietly(main, argv: list[str]) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        main(argv)
    return out.getvalue(), err.getvalue()


def test_without_checkpoints_eval_and_vizu_use_the_demo_with_one_note(tmp_path, monkeypatch):
    import eval_MNIST
    import vizu_MNIST

    monkeypatch.chdir(tmp_path)  # no checkpoints/ here
    flags = [
        "--num-samples",
        "10",
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--metrics",
        "classifier",
        "--device",
        "cpu",
    ]
    _, err = run_quietly(eval_MNIST.main, flags)
    notes = [line for line in err.splitlines() if "demo model" in line]
    assert len(notes) == 1 and notes[0].startswith("note: no checkpoint in checkpoints/")
    report = json.loads((tmp_path / "eval_outputs" / "eval_demo_mnist5k.json").read_text())
    assert report["provenance"]["checkpoint"]["sha256"] == DEMO_SHA256
    assert report["metrics"]["generated"]["classifier"]["fid"] > 0
    out, _ = run_quietly(vizu_MNIST.main, ["--t", "20", "--num-images", "2", "--device", "cpu"])
    assert "reconstruction from t = 20" in out and (tmp_path / "step_outputs_mnist" / "reverse.gif").is_file()


def test_checkpoint_demo_names_the_shipped_model_and_a_checkpoint_of_ones_own_comes_first(tmp_path):
    assert resolve_checkpoint("demo").resolve() == DEMO_CHECKPOINT
    (tmp_path / "mnist_epoch_03.pt").write_bytes(b"")
    assert resolve_checkpoint(None, tmp_path) == tmp_path / "mnist_epoch_03.pt"


# ----- the fast path -------------------------------------------------------------------------------


def test_auto_speed_flags_take_the_fast_path_on_a_gpu_only():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    on_gpu = runtime.plan_speed("none", "auto", "auto", "auto", gpu)
    assert (on_gpu.compile, on_gpu.compile_mode, on_gpu.channels_last) == (True, "reduce-overhead", True)
    assert runtime.plan_speed("none", "auto", "auto", "auto", gpu, processes=2).compile_mode == "default"
    on_cpu = runtime.plan_speed("auto", "auto", "auto", "auto", cpu)
    assert (on_cpu.amp, on_cpu.compile, on_cpu.channels_last) == ("none", False, False)
    assert runtime.plan_speed("bf16", "on", "auto", "off", cpu) == runtime.SpeedPlan(
        "bf16", True, "default", False
    )
    with pytest.raises(runtime.UserError, match="needs --compile on"):
        runtime.plan_speed("auto", "auto", "max-autotune", "auto", cpu)


class Doubler(nn.Module):
    num_classes = None

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.weight * x


def test_a_compile_that_fails_runs_eager_after_one_line():
    """A stand-in compiled module that raises at its first call (as compiling does): the call is
    answered by the eager module, one line says why, and later calls go straight to it."""
    calls = []

    def failing_compiled(*inputs):
        calls.append("compiled")
        raise RuntimeError("backend exploded\nsecond line")

    said = []
    eager = Doubler()
    network = runtime.EagerFallback(eager, failing_compiled, said.append)
    x = torch.ones(3)
    assert torch.equal(network(x), 2 * x) and torch.equal(network(x), 2 * x)
    assert calls == ["compiled"]
    assert said == ["torch.compile failed (RuntimeError: backend exploded): running eager"]
    assert network.num_classes is None and list(network.parameters()) == list(eager.parameters())


def test_a_compile_that_works_is_used_and_later_errors_of_the_model_are_not_hidden():
    eager = Doubler()
    said = []
    network = runtime.EagerFallback(eager, lambda *inputs: eager(*inputs) + 1, said.append)
    assert torch.equal(network(torch.ones(2)), torch.full((2,), 3.0)) and said == []
    with pytest.raises(TypeError):  # a wrong call after a successful one is the model's error, not compile's
        network(torch.ones(2, 3), torch.ones(1))


# ----- presets -------------------------------------------------------------------------------------


def test_cpu_preset_sets_its_recipe_and_explicit_flags_win():
    job = training_job_from_flags(["--preset", "cpu"])
    assert job.model.channel_mult == (1, 2, 4, 4) and job.model.attn_resolutions == (4,)
    assert (job.diffusion.prediction, job.training.min_snr_gamma) == ("v", 5.0)
    assert job.runtime.amp == ("bf16" if runtime.cpu_has_native_bf16() else "none")  # emulated bf16 is slow
    assert (job.training.lr, job.training.ema_decay, job.model.dropout) == (2e-3, 0.999, 0.0)
    for key, value in PRESETS["cpu"].items():
        assert value in [
            getattr(part, key, None)
            for part in (job.model, job.diffusion, job.training, job.runtime, job.run)
        ]
    overridden = training_job_from_flags(["--preset", "cpu", "--lr", "1e-3", "--channel-mult", "1,2"])
    assert overridden.training.lr == 1e-3 and overridden.model.channel_mult == (1, 2)
    assert overridden.model.model_channels == 16  # the rest of the preset stays
    default = training_job_from_flags([])
    assert default.preset == "gpu" and default.model.channel_mult == (1, 2, 2) and default.training.lr == 2e-4


def test_help_lists_every_preset(capsys):
    with pytest.raises(SystemExit):
        training_job_from_flags(["--help"])
    text = capsys.readouterr().out
    assert "cpu: --model-channels 16 --channel-mult 1,2,4,4" in text and "gpu: the defaults above" in text


def test_the_checkpoint_records_the_resolved_preset(tmp_path):
    from train_MNIST import main

    run_quietly(main, ["--preset", "cpu", "--data", "mnist-5k", "--max-steps", "1", "--model-channels", "8",
                       "--device", "cpu", "--out-dir", str(tmp_path)])  # fmt: skip
    train = load_checkpoint(tmp_path / "last.pt")["config"]["train"]
    assert train["preset"] == "cpu" and train["model"]["model_channels"] == 8
    assert train["model"]["channel_mult"] == [1, 2, 4, 4] and train["diffusion"]["prediction"] == "v"


# ----- pictures that show the variety --------------------------------------------------------------


def test_default_images_are_spread_over_the_classes(mnist_5k_test):
    _, labels = mnist_5k_test  # sorted by class: the first 100 are all zeros
    picked = spread_over_classes(labels, 10, seed=0)
    assert sorted(labels[picked].tolist()) == list(range(10))
    assert spread_over_classes(labels, 10, seed=0) == picked != spread_over_classes(labels, 10, seed=1)
    assert len(set(labels[spread_over_classes(labels, 4, seed=3)].tolist())) == 4
    assert len(set(spread_over_classes(labels, 25, seed=0))) == 25  # more than classes: still distinct
