"""Smoke tests of every benchmark: seconds-long runs with tiny settings, checking their output's fields,
so that a refactor cannot silently break them. The competitor packages are not installed in CI, so
throughput.py runs ours and the trainer's step only."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
from pathlib import Path

import pytest
from helpers import TINY_UNET_FLAGS

from benchmarks import (
    chaos,
    colour_training,
    editing_quality,
    sampling_speed,
    steps_vs_quality,
    throughput,
    time_to_digits,
)
from ddpm.plumbing.messages import UserError

REPO = Path(__file__).resolve().parents[1]


def run_quietly(main, argv: list[str]) -> str:
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(io.StringIO()):
        main(argv)
    return output.getvalue()


def test_throughput_times_ours_and_the_trainer_step(tmp_path):
    argv = [*TINY_UNET_FLAGS, "--networks", "ours,trainer", "--batch-size", "4", "--repeats", "2",
            "--iters", "1", "--warmup", "1", "--device", "cpu",
            "--json", str(tmp_path / "t.json")]  # fmt: skip
    run_quietly(throughput.main, argv)
    results = json.loads((tmp_path / "t.json").read_text())["results"]
    assert set(results) == {"ours", "trainer"}
    assert results["ours"]["ours_train_speedup"] == 1.0 and results["ours"]["sample_img_per_s"] > 0
    assert results["trainer"]["parameters"] == results["ours"]["parameters"]
    assert results["trainer"]["train_img_per_s"] > 0 and results["trainer"]["sample_img_per_s"] is None


def test_throughput_cifar10_preset_times_colour_images(tmp_path):
    argv = [*TINY_UNET_FLAGS, "--preset", "cifar10", "--networks", "ours", "--batch-size", "2",
            "--repeats", "1", "--iters", "1", "--warmup", "1", "--device", "cpu",
            "--json", str(tmp_path / "c.json")]  # fmt: skip
    run_quietly(throughput.main, argv)
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["environment"]["images"] == "3x32x32" and set(report["results"]) == {"ours"}
    assert report["results"]["ours"]["train_img_per_s"] > 0
    with pytest.raises(UserError, match="ours and diffusers only"):
        throughput.main(["--preset", "cifar10", "--networks", "ours,trainer"])


def test_colour_training_writes_pngs_trains_and_summarises_the_loss(tmp_path):
    argv = ["--steps", "4", "--images-per-class", "4", "--image-size", "16", "--batch-size", "4",
            "--log-every", "1", "--window", "2", "--out-dir", str(tmp_path / "c"),
            "--json", str(tmp_path / "c.json"), *TINY_UNET_FLAGS, "--T", "10"]  # fmt: skip
    printed = run_quietly(colour_training.main, argv)
    results = json.loads((tmp_path / "c.json").read_text())["results"]
    assert results["steps"] == 4 and results["first_steps"] == [1, 2] and results["last_steps"] == [3, 4]
    assert math.isfinite(results["first_loss"]) and math.isfinite(results["last_loss"])
    assert len(list((tmp_path / "c" / "pngs" / "squares").glob("*.png"))) == 4
    assert "--channels 3 --image-size 16" in printed and (tmp_path / "c" / "run" / "last.pt").is_file()


def test_sampling_speed_times_each_batch_size(tiny_checkpoint, tmp_path):
    argv = ["--checkpoint", str(tiny_checkpoint), "--num-samples", "4", "--batch-sizes", "2,4",
            "--sampler", "ddim", "--steps", "2", "--repeats", "1", "--warmup-steps", "1", "--device", "cpu",
            "--json", str(tmp_path / "s.json")]  # fmt: skip
    run_quietly(sampling_speed.main, argv)
    report = json.loads((tmp_path / "s.json").read_text())
    assert [row["batch_size"] for row in report["results"]] == [2, 4]
    assert all(row["images_per_s"] > 0 for row in report["results"])
    assert report["environment"]["steps"] == 2 and report["environment"]["speed"] == "amp none, eager"


def test_steps_vs_quality_scores_each_sampler(tiny_checkpoint, tmp_path):
    argv = ["--checkpoint", str(tiny_checkpoint), "--steps", "2,3", "--no-ddpm", "--num-samples", "12",
            "--device", "cpu", "--json", str(tmp_path / "q.json")]  # fmt: skip
    run_quietly(steps_vs_quality.main, argv)
    report = json.loads((tmp_path / "q.json").read_text())
    assert [(row["sampler"], row["steps"]) for row in report["rows"]] == [
        ("ddim", 2), ("ddim", 3), ("dpm++2m", 2), ("dpm++2m", 3)
    ]  # fmt: skip
    for row in [*report["rows"], report["real_train_images"]]:
        assert math.isfinite(row["fid"]) and 0 <= row["precision"] <= 1 and len(row["class_fractions"]) == 10
    assert report["real_train_images"]["fid"] < min(row["fid"] for row in report["rows"])


def test_editing_quality_scores_the_round_trip_and_the_inpainted_holes(tiny_checkpoint, tmp_path):
    argv = ["--checkpoint", str(tiny_checkpoint), "--num-images", "4", "--inversion-steps", "3",
            "--levels", "4", "--jump-length", "2", "--resamples", "2", "--sample-steps", "2",
            "--batch-size", "3", "--device", "cpu", "--json", str(tmp_path / "e.json")]  # fmt: skip
    printed = run_quietly(editing_quality.main, argv)
    report = json.loads((tmp_path / "e.json").read_text())
    inversion, inpainting = report["inversion"], report["inpainting"]
    assert report["num_images"] == 4 and inversion["steps"] == 3 and 0 < inversion["mse"]["mean"] < 1
    assert inpainting["evaluations"] == 4 + 1 * 2 * 1 and inpainting["known_mse_max"] == 0.0
    assert inpainting["hole_pixels"] == 28 * 14 and math.isfinite(
        inpainting["hole_mse_unconditional"]["mean"]
    )
    assert set(inpainting["classifier_agreement"]) == {
        "originals",
        "masked_inputs",
        "repaint",
        "unconditional_samples",
    }
    assert "DDIM inversion round trip" in printed


def test_time_to_digits_trains_through_the_trainer_and_evaluates(tmp_path):
    out_dir = tmp_path / "ttd"
    argv = ["--minutes", "0.02", "--clock", "cpu", "--num-samples", "10", "--device", "cpu",
            "--out-dir", str(out_dir), "--json", str(tmp_path / "d.json")]  # fmt: skip
    printed = run_quietly(time_to_digits.main, argv)
    results = json.loads((tmp_path / "d.json").read_text())["results"]
    assert set(results) == {"real train digits", "ours"}
    ours = results["ours"]
    assert ours["train_command"].startswith("train_MNIST.py --preset cpu --data mnist-5k --max-minutes 0.02")
    assert ours["steps"] >= 1 and ours["parameters"] == 1_129_281 and (out_dir / "ours" / "last.pt").is_file()
    assert math.isfinite(ours["fid"]) and "predicted-class histogram" in printed


def test_gpu_report_script_parses():
    result = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_report.sh")], capture_output=True)
    assert result.returncode == 0, result.stderr


def test_chaos_kills_once_and_the_resumed_run_is_bit_identical(tmp_path):
    """benchmarks.chaos reduced: one SIGKILL in a 2-step run, then the resume; bit-identical."""
    run_quietly(chaos.main, ["--kills", "1", "--epochs", "2", "--images", "16", "--out-dir", str(tmp_path),
                             "--json", str(tmp_path / "chaos.json")])  # fmt: skip
    result = json.loads((tmp_path / "chaos.json").read_text())
    assert result["identical"] and result["differences"] == [] and len(result["launches"]) == 2
    assert result["launches"][-1]["exit_status"] == 0 and result["checkpoints_loaded"] >= 1
