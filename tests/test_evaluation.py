"""The evaluation area: eval_MNIST.py, its pipeline (ddpm/evaluation), its report (JSON and table), the
classifier metrics through torch-fidelity and the classifier's trainer, on CPU, offline, with tens of
samples from the tiny checkpoint.

One evaluation run (module fixture) with a classifier trained for one epoch by train_classifier's own
entry point, baselines, two repeats, memorisation, the NLL bound on 4 test images and an Inception
weights file that does not exist, feeds the report tests; the torch-fidelity tests call
feature_metrics' functions directly on 200 real images; the table test formats hand-made records
against a golden text. The likelihood bound and the copy check have files of their own
(test_likelihood.py, test_memorisation.py): each checks its own math against closed forms or
calibrated real data, with no evaluation run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import run_eval
from PIL import Image
from torch_fidelity import feature_extractor_inceptionv3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

import eval_MNIST
from ddpm import sampling
from ddpm.datasets.idx import write_idx
from ddpm.datasets.sources import load_images
from ddpm.evaluation import classifier, feature_metrics, image_metrics, train_classifier
from ddpm.evaluation.inputs import load_judge, load_model, load_real_data, output_paths
from ddpm.evaluation.real_image_metrics import nll_of_test_split, reconstruction_scores
from ddpm.evaluation.records import (
    CasScores,
    CheckpointInfo,
    ClosestPair,
    DataInfo,
    EvaluationReport,
    FidelityScores,
    MemorisationSummary,
    Metrics,
    NllBound,
    Outputs,
    Provenance,
    Reconstruction,
    ReconstructionAtT,
    SamplingInfo,
    SetScores,
    SpaceSummary,
)
from ddpm.evaluation.repeats import Spread, summarise_repeats
from ddpm.evaluation.report import as_json, format_report
from ddpm.evaluation.sample_sets import score_sample_sets
from ddpm.evaluation.scoring import compare_with_test_split
from ddpm.plumbing.checkpointing import CHECKPOINT_VERSION, build_model, load_for_inference, save_checkpoint
from ddpm.plumbing.cli import run_cli
from ddpm.plumbing.inference_settings import EvaluationSettings
from ddpm.plumbing.processes import Processes
from ddpm.plumbing.provenance import sha256_of_file
from ddpm.plumbing.runtime import plan_speed
from ddpm.plumbing.settings import SamplingSettings

REPO = Path(__file__).resolve().parents[1]
NUM_SAMPLES = 40
REPEATS = 2
NUM_NLL = 4
NUM_REAL = 200  # real images per set in the direct torch-fidelity tests
RECON_T = (5, 99)  # small t, and T-1 of the tiny checkpoint (T = 100)
SELF_FID_TOLERANCE = 1e-3  # FID(X, X) is 0 up to the float error of sqrtm-by-eigenvalues


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No test may download: torch.hub looks in an empty folder and every download raises."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        patch.setattr(torch.hub, "download_url_to_file", refuse)
        patch.setattr(torch.hub, "load_state_dict_from_url", refuse)
        patch.setattr(feature_extractor_inceptionv3, "load_state_dict_from_url", refuse)
        yield


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory) -> Path:
    """A classifier trained for one epoch on MNIST-5k by train_classifier's main (python -m ...)."""
    path = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        train_classifier.main(["--data", "mnist-5k", "--epochs", "1", "--out", str(path), "--device", "cpu"])
    assert "test accuracy" in output.getvalue()
    return path


@pytest.fixture(scope="module")
def evaluation(tiny_checkpoint, classifier_path, tmp_path_factory) -> dict:
    """One full evaluation of the tiny checkpoint, Inception weights missing; its report and output."""
    folder = tmp_path_factory.mktemp("eval")
    missing = folder / "weights-inception-missing.pth"
    argv = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--num-samples",
        str(NUM_SAMPLES),
        "--sampler",
        "ddim",
        "--steps",
        "4",
        "--classifier",
        str(classifier_path),
        "--inception-weights",
        str(missing),
        "--baselines",
        "--repeats",
        str(REPEATS),
        "--nll",
        "--num-nll",
        str(NUM_NLL),
        "--recon-t",
        ",".join(map(str, RECON_T)),
        "--num-recon",
        "8",
        "--json",
        str(folder / "report.json"),
        "--cache-dir",
        str(folder / "cache"),
        "--device",
        "cpu",
    ]
    stdout, stderr = run_eval(argv)
    report = json.loads((folder / "report.json").read_text())
    return {"report": report, "stdout": stdout, "stderr": stderr, "folder": folder, "missing": missing}


@pytest.fixture(scope="module")
def real_images() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    test_images, _ = load_images("mnist-5k", "test")
    train_images, _ = load_images("mnist-5k", "train")
    return {
        "test": test_images[torch.randperm(len(test_images), generator=generator)[:NUM_REAL]],
        "train": train_images,
    }


def classifier_comparison(classifier_path: Path, reference: torch.Tensor, cache_dir: Path):
    loaded = classifier.LoadedClassifier.read(classifier_path)
    extractor, _ = feature_metrics.classifier_extractor(loaded, "mnist-5k")
    reference_set = feature_metrics.real_set(reference, "mnist-5k", "test")
    comparison = feature_metrics.Comparison(
        reference_set,
        [extractor],
        batch_size=250,
        seed=0,
        device=torch.device("cpu"),
        cache_dir=str(cache_dir),
    )
    return extractor, comparison


# ----- torch-fidelity with the classifier --------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero(classifier_path, real_images, tmp_path):
    extractor, comparison = classifier_comparison(classifier_path, real_images["test"], tmp_path)
    same = feature_metrics.ImageSet(image_metrics.to_uint8(real_images["test"]))
    metrics = feature_metrics.fidelity_metrics(same, extractor, comparison)
    assert abs(metrics.fid) < SELF_FID_TOLERANCE


def test_fid_of_train_images_is_far_below_noise(classifier_path, real_images, tmp_path):
    extractor, comparison = classifier_comparison(classifier_path, real_images["test"], tmp_path)
    floor_set = feature_metrics.floor_set(real_images["train"], NUM_REAL, "mnist-5k", seed=0)
    noise_set = feature_metrics.noise_set(NUM_REAL, (1, 28, 28), seed=0)
    floor = feature_metrics.fidelity_metrics(floor_set, extractor, comparison)
    ceiling = feature_metrics.fidelity_metrics(noise_set, extractor, comparison)
    assert 0 < floor.fid < ceiling.fid / 4
    assert floor.kid_mean < ceiling.kid_mean
    assert floor.is_mean > ceiling.is_mean  # real digits are confidently classified, noise is not


def test_classifier_is_registered_and_the_reference_features_come_from_the_cache(
    classifier_path, real_images, tmp_path
):
    """torch-fidelity builds the registered extractor; a second run reads the reference from its cache:
    the reference images swapped for noise under the same cache name give the very same numbers, and
    under a new name (no cache entry) other ones."""
    extractor, comparison = classifier_comparison(classifier_path, real_images["test"], tmp_path)
    assert FEATURE_EXTRACTORS_REGISTRY[extractor.name] is classifier.ClassifierFeatureExtractor
    candidate = feature_metrics.ImageSet(image_metrics.to_uint8(real_images["train"][:50]))
    first = feature_metrics.fidelity_metrics(candidate, extractor, comparison)
    assert any(tmp_path.rglob("*mnist-5k-test-200-*"))  # the reference's entry, named after its content

    noise = feature_metrics.noise_set(NUM_REAL, (1, 28, 28), seed=0).images
    cached = replace(comparison, reference=replace(comparison.reference, images=noise))
    assert feature_metrics.fidelity_metrics(candidate, extractor, cached) == first
    uncached = replace(comparison, reference=feature_metrics.ImageSet(noise, "noise-reference"))
    assert feature_metrics.fidelity_metrics(candidate, extractor, uncached).fid != first.fid


# ----- the full run ------------------------------------------------------------------------------


def test_report_has_every_key(evaluation):
    report = evaluation["report"]
    provenance = report["provenance"]
    assert set(report) == {"provenance", "metrics", "outputs"}
    assert set(provenance["checkpoint"]) == {"path", "sha256", "epoch", "step", "weights", "config"}
    assert len(provenance["checkpoint"]["sha256"]) == 64 and provenance["checkpoint"]["weights"] == "ema"
    assert (provenance["checkpoint"]["epoch"], provenance["checkpoint"]["step"]) == (1, 200)
    assert provenance["sampling"] == {
        "sampler": "ddim",
        "steps": 4,
        "eta": 0.0,
        "guidance": 1.0,
        "num_samples": NUM_SAMPLES,
        "seeds": [0, 1],
        "batch_size": 250,
        "amp": "none",  # --amp auto on a CPU
        "compiled": None,
        "channels_last": False,
    }
    assert provenance["seed"] == 0
    assert set(provenance["data"]) == {"name", "split", "num_reference", "reference_sha256"}
    assert provenance["data"]["num_reference"] == 1000
    classifier = provenance["feature_extractors"]["classifier"]
    assert (
        classifier["used"]
        and classifier["name"] == "mnist-classifier"
        and len(classifier["weights_sha256"]) == 64
    )
    assert set(provenance["versions"]) == {
        "python",
        "torch",
        "torchvision",
        "torch_fidelity",
        "numpy",
        "scikit_image",
    }
    assert {"device", "command"} <= set(provenance)
    assert provenance["repeats"] == REPEATS
    metrics = report["metrics"]
    assert set(metrics) == {"generated", "floor", "ceiling", "cas", "memorisation", "reconstruction", "nll"}
    assert metrics["cas"] is None  # the tiny model is unconditional
    per_set = {
        "fid", "is_mean", "is_std", "kid_mean", "kid_std", "kid_subset_size", "precision", "recall",
        "num_images", "num_reference", "mean_confidence", "class_fractions",
    }  # fmt: skip
    for name in ("generated", "floor", "ceiling"):
        values = metrics[name]
        assert set(values) == {"classifier"}
        repeated = name != "ceiling"  # the noise ceiling is drawn once
        assert set(values["classifier"]) == per_set | ({"over_repeats"} if repeated else set())
        fractions = values["classifier"]["class_fractions"]
        assert len(fractions) == 10 and sum(fractions) == pytest.approx(1.0)
        numbers = [
            value for key, value in values["classifier"].items() if key in per_set - {"class_fractions"}
        ]
        assert all(math.isfinite(value) for value in numbers)
    assert set(metrics["reconstruction"]) == {"num_images", "scale", "per_t"}
    assert set(metrics["reconstruction"]["scale"]) == {"mse", "psnr", "ssim"}


@pytest.mark.parametrize("name", ["generated", "floor"])
def test_repeats_give_the_mean_spread_and_values_of_every_number(evaluation, name):
    """--repeats 2: two sample sets (and two floor subsets) with seeds 0 and 1; each number is the mean
    of its two values, and over_repeats keeps them with their sample standard deviation."""
    values = evaluation["report"]["metrics"][name]["classifier"]
    spreads = values["over_repeats"]
    counts = {"num_images", "num_reference", "kid_subset_size"}  # the same in both repeats: kept as they are
    assert set(spreads) == set(values) - {"class_fractions", "over_repeats"} - counts
    for key, spread in spreads.items():
        assert len(spread["values"]) == REPEATS
        assert spread["mean"] == pytest.approx(sum(spread["values"]) / REPEATS) == values[key]
        assert spread["std"] == pytest.approx(abs(spread["values"][0] - spread["values"][1]) / math.sqrt(2))
    fid = spreads["fid"]["values"]
    assert fid[0] != fid[1]  # different seeds draw different sets
    assert values["num_images"] == NUM_SAMPLES


def test_summary_of_repeats_averages_numbers_and_lists_and_keeps_counts_and_text():
    """Two repeats of hand-made records: numbers averaged with their spread (std with ddof = 1 of
    40 and 44: 2 sqrt(2)), lists averaged element-wise, counts and text kept from the first."""
    first = MemorisationSummary(
        pixels=SpaceSummary(0.0, 1.5, 5.0, 5.5, 0.01),
        classifier=SpaceSummary(0.5, 3.0, 14.0, 12.0, 0.01),
        percentile=1.0,
        num_samples=10,
        num_held_out=1000,
        closest=[ClosestPair(3, 7, 1.25)],
    )
    second = replace(first, pixels=SpaceSummary(0.25, 1.5, 7.0, 5.5, 0.01), closest=[ClosestPair(4, 8, 2.5)])
    summary = summarise_repeats([first, second])
    assert summary.pixels.copy_rate == 0.125 and summary.pixels.median_distance == 6.0
    assert summary.pixels.over_repeats["median_distance"] == Spread(
        6.0, pytest.approx(math.sqrt(2)), [5.0, 7.0]
    )
    assert summary.classifier.over_repeats["copy_rate"] == Spread(0.5, 0.0, [0.5, 0.5])
    assert summary.num_samples == 10 and summary.closest == [ClosestPair(3, 7, 1.25)]
    assert set(summary.over_repeats) == {"percentile"}  # a number, though the same in both repeats
    scores = [FidelityScores(40.0, 8.0, 0.2, 10.0, 1.0, 0.7, 0.8, 5, 10, 20, 0.9, [0.5, 0.5]),
              FidelityScores(44.0, 8.0, 0.2, 10.0, 1.0, 0.7, 0.8, 5, 10, 20, 0.9, [0.25, 0.75])]  # fmt: skip
    averaged = summarise_repeats(scores)
    assert averaged.fid == 42.0 and averaged.class_fractions == [0.375, 0.625]
    assert averaged.over_repeats["fid"] == Spread(42.0, pytest.approx(2 * math.sqrt(2)), [40.0, 44.0])
    assert "kid_subset_size" not in averaged.over_repeats and averaged.kid_subset_size == 5
    assert summarise_repeats([first]) is first


def hand_made_report() -> EvaluationReport:
    """A report of two repeats with every section, its numbers chosen by hand (binary fractions, so
    that each prints exactly)."""
    spread = {
        "fid": Spread(30.5, 1.25, [29.5, 31.5]),
        "is_mean": Spread(8.5, 0.125, [8.375, 8.625]),
        "kid_mean": Spread(12.0, 3.5, [9.5, 14.5]),
        "precision": Spread(0.75, 0.0625, [0.6875, 0.8125]),
        "recall": Spread(0.875, 0.025, [0.85, 0.9]),
        "mean_confidence": Spread(0.9375, 0.0, [0.9375, 0.9375]),
    }
    generated = FidelityScores(
        30.5, 8.5, 0.25, 12.0, 20.0, 0.75, 0.875, 20, 40, 1000, 0.9375, [0.1] * 10, spread
    )
    floor = replace(generated, fid=20.25, over_repeats={**spread, "fid": Spread(20.25, 0.5, [19.75, 20.75])})
    ceiling = FidelityScores(2267.5, 1.25, 0.0625, 2412.0, 108.5, 0.25, 0.0, 20, 40, 1000, 0.625, [0.1] * 10)
    space = SpaceSummary(0.025, 1.75, 5.5, 5.25, 0.01, {"copy_rate": Spread(0.025, 0.0125, [0.0125, 0.0375])})
    recon = ReconstructionAtT(4, 0.0005, 0.0001, 33.5, 1.25, 0.953125, 0.015625)
    return EvaluationReport(
        Provenance(
            checkpoint=CheckpointInfo("runs/x/last.pt", "0" * 64, 3, 120, "ema", {}),
            data=DataInfo("mnist-5k", "test", 1000, "1" * 64),
            sampling=SamplingInfo("ddim", 4, 0.0, 1.0, 40, [0, 1], 250, "none", None, False),
            seed=0,
            repeats=2,
            feature_extractors={},
            versions={},
            device="cpu",
            command="eval_MNIST.py",
        ),  # fmt: skip
        Metrics(
            generated=SetScores(classifier=generated),
            floor=SetScores(classifier=floor),
            ceiling=SetScores(classifier=ceiling),
            cas=CasScores(0.5, 1, 40, 1000, {"cas_accuracy": Spread(0.5, 0.125, [0.375, 0.625])}),
            memorisation=MemorisationSummary(space, space, 1.0, 40, 1000, []),
            reconstruction=Reconstruction(8, {"5": recon, "99": recon}, {}),
            nll=NllBound(3.5, 0.25, 0.125, 0.0005, 1.5, 2.0, [0.0] * 100, 4, "beta_tilde", True),
        ),
        Outputs("r.json", "r_samples.png", "r_closest.png", "r_nearest.csv"),
    )


GOLDEN_TABLE = "\n".join(  # printed by the table code before the records, from hand_made_report's JSON
    [
        "",
        "runs/x/last.pt (ema weights, epoch 3, step 120): 40 samples, ddim 4 steps, eta "
        "0.0, guidance 1.0, seed 0",
        "reference: mnist-5k test split, 1000 images",
        "metric                             generated         train (floor)       noise (ceiling)",
        "classifier FID                   30.5 ± 1.25           20.25 ± 0.5                  2268",
        "classifier IS                    8.5 ± 0.125           8.5 ± 0.125         1.25 ± 0.0625",
        "classifier KID                      12 ± 3.5              12 ± 3.5            2412 ± 108",
        "classifier precision           0.75 ± 0.0625         0.75 ± 0.0625                  0.25",
        "classifier recall              0.875 ± 0.025         0.875 ± 0.025                     0",
        "classifier confidence             0.9375 ± 0            0.9375 ± 0                 0.625",
        "±: standard deviation over 2 sample sets (seeds) and 2 floor subsets; the noise "
        "ceiling's: IS over splits, KID over random subsets of 20 images",
        "memorisation (nearest training image; a copy is nearer than percentile 1 of the "
        "same distance of 1000 held-out test images):",
        "  pixels, L2 on [0, 1]       copy rate 0.025 ± 0.0125, median distance 5.5 "
        "(held-out test images: 5.25)",
        "  classifier features, L2    copy rate 0.025 ± 0.0125, median distance 5.5 "
        "(held-out test images: 5.25)",
        "CAS (classifier trained on the samples, tested on real test images): accuracy 0.5 ± 0.125",
        "NLL bound (Ho et al. eq. 5) on 4 test images: 3.5000 ± 0.1250 bits/dim (± "
        "standard error; prior 0.0005, KL terms 2.0000, decoder L_0 1.5000)",
        "reconstruction, mean ± std (MSE on [0, 1] pixels, PSNR in dB with peak 1, SSIM data_range=1):",
        "  t=   5 (   4 steps)  MSE 0.0005 ± 0.0001  PSNR 33.5000 ± 1.2500  SSIM 0.9531 ± 0.0156",
        "  t=  99 (   4 steps)  MSE 0.0005 ± 0.0001  PSNR 33.5000 ± 1.2500  SSIM 0.9531 ± 0.0156",
    ]
)


def test_table_of_hand_made_records_is_the_golden_text():
    """The golden text is what the table code printed before the records, given the same numbers as JSON."""
    assert format_report(hand_made_report()) == GOLDEN_TABLE


def test_json_of_records_keeps_field_order_and_leaves_out_what_was_not_measured():
    report = as_json(hand_made_report())
    assert list(report) == ["provenance", "metrics", "outputs"]
    generated = report["metrics"]["generated"]
    assert list(generated) == ["classifier"]  # no Inception scores: no key
    assert list(generated["classifier"])[:3] == ["fid", "is_mean", "is_std"]
    assert list(generated["classifier"])[-1] == "over_repeats"
    assert generated["classifier"]["over_repeats"]["fid"] == {
        "mean": 30.5,
        "std": 1.25,
        "values": [29.5, 31.5],
    }
    assert "over_repeats" not in report["metrics"]["ceiling"]["classifier"]  # drawn once
    assert report["metrics"]["cas"] == {
        "cas_accuracy": 0.5, "epochs": 1, "num_train": 40, "num_test": 1000,
        "over_repeats": {"cas_accuracy": {"mean": 0.5, "std": 0.125, "values": [0.375, 0.625]}},
    }  # fmt: skip
    assert as_json(SetScores()) == {}  # CAS alone: no feature metrics, an empty object as before


def key_paths(value, prefix: str = "") -> list[str]:
    """Every key of a JSON document as a dotted path, in document order (a list by its first item, the
    reconstruction's timesteps as "t", each path once)."""
    if isinstance(value, list):
        return key_paths(value[0], prefix + "[]") if value and isinstance(value[0], dict) else []
    if not isinstance(value, dict):
        return []
    paths = []
    for key, item in value.items():
        name = prefix + ("t" if prefix.endswith("per_t.") else key)
        paths += [name, *key_paths(item, name + ".")]
    return list(dict.fromkeys(paths))


def test_json_layout_is_the_shipped_demo_reports(evaluation):
    """The run's JSON has the shipped weights/demo_mnist5k_eval.json's keys, in its order, plus only
    what that run did not ask for: the spreads of --repeats 2, the NLL bound."""
    demo = json.loads((REPO / "weights" / "demo_mnist5k_eval.json").read_text())
    config = "provenance.checkpoint.config."  # the checkpoint's own, not the report's layout
    ours = [path for path in key_paths(evaluation["report"]) if not path.startswith(config)]
    added = [path for path in ours if "over_repeats" in path or path.startswith("metrics.nll.")]
    shipped = [path for path in key_paths(demo) if not path.startswith(config)]
    assert [path for path in ours if path not in added] == shipped


def test_the_run_s_table_says_what_its_spreads_are(evaluation):
    lines = evaluation["stdout"].splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert header.split() == ["metric", "generated", "train", "(floor)", "noise", "(ceiling)"]
    assert sum(line.startswith("classifier ") for line in lines) == 6  # FID, IS, KID, P, R, confidence
    assert f"standard deviation over {REPEATS} sample sets" in evaluation["stdout"]


def test_memorisation_is_in_the_report_with_its_pairs_and_nearest_table(evaluation):
    report = evaluation["report"]
    memorisation = report["metrics"]["memorisation"]
    for space in ("pixels", "classifier"):
        assert 0 <= memorisation[space]["copy_rate"] <= 1 and memorisation[space]["threshold"] > 0
        assert len(memorisation[space]["over_repeats"]["copy_rate"]["values"]) == REPEATS
    assert memorisation["num_held_out"] == 1000 and len(memorisation["closest"]) == 16
    distances = [pair["distance"] for pair in memorisation["closest"]]
    assert distances == sorted(distances)
    with open(report["outputs"]["nearest_csv"]) as table:
        rows = list(csv.reader(table))
    assert (
        rows[0][:3] == ["repeat", "sample", "pixels_train_index"] and len(rows) == 1 + REPEATS * NUM_SAMPLES
    )
    assert Image.open(report["outputs"]["closest_png"]).size == (2 * (16 * 30 + 2), 2 * (2 * 30 + 2))
    assert "copy rate" in evaluation["stdout"]


def test_nll_bound_is_in_the_report_with_every_term(evaluation):
    nll = evaluation["report"]["metrics"]["nll"]
    assert nll["num_images"] == NUM_NLL and len(nll["terms_per_t"]) == 100  # T of the tiny checkpoint
    assert nll["bits_per_dim"] == pytest.approx(nll["prior_bpd"] + nll["decoder_bpd"] + nll["kl_terms_bpd"])
    assert 0 < nll["bits_per_dim"] < 8  # a model that has learnt anything beats 8 bits per 8-bit pixel
    assert f"{nll['bits_per_dim']:.4f} ± {nll['bits_per_dim_sem']:.4f} bits/dim" in evaluation["stdout"]


def test_kid_subsets_are_smaller_than_the_sets(evaluation):
    """With 40 samples, KID's subsets hold half of them, so its spread is over subsets that differ."""
    generated = evaluation["report"]["metrics"]["generated"]["classifier"]
    assert generated["kid_subset_size"] == NUM_SAMPLES // 2 < 1000  # torch-fidelity's default size
    assert min(generated["over_repeats"]["kid_std"]["values"]) > 0


def test_baselines_bracket_the_generated_samples(evaluation):
    """The tiny model's blurry digits lie between real training digits (floor) and uniform noise."""
    metrics = evaluation["report"]["metrics"]
    floor = metrics["floor"]["classifier"]["fid"]
    ceiling = metrics["ceiling"]["classifier"]["fid"]
    assert floor < metrics["generated"]["classifier"]["fid"] < ceiling
    assert metrics["floor"]["classifier"]["num_images"] == NUM_SAMPLES


def test_reconstruction_from_small_t_beats_the_pure_noise_end(evaluation):
    per_t = evaluation["report"]["metrics"]["reconstruction"]["per_t"]
    small, last = per_t[str(RECON_T[0])], per_t[str(RECON_T[1])]
    assert small["ssim_mean"] > last["ssim_mean"] + 0.3
    assert small["mse_mean"] < last["mse_mean"] and small["psnr_mean"] > last["psnr_mean"]
    assert small["steps"] == 4 and last["steps"] == 4  # min(--steps, t + 1)


def test_missing_inception_weights_say_one_line_and_classifier_metrics_still_run(evaluation):
    lines = [line for line in evaluation["stderr"].splitlines() if "Inception" in line]
    assert len(lines) == 1
    assert str(evaluation["missing"]) in lines[0] and "--inception-weights PATH" in lines[0]
    inception = evaluation["report"]["provenance"]["feature_extractors"]["inception"]
    assert inception == {"used": False, "reason": lines[0].removeprefix("note: ")}
    assert math.isfinite(evaluation["report"]["metrics"]["generated"]["classifier"]["fid"])
    assert "classifier FID" in evaluation["stdout"]


def test_sample_grid_is_written_beside_the_json(evaluation):
    grid = evaluation["folder"] / "report_samples.png"
    assert evaluation["report"]["outputs"]["samples_png"] == str(grid)
    rows = NUM_SAMPLES // 10  # rows of 10
    assert Image.open(grid).size == (2 * (10 * 30 + 2), 2 * (rows * 30 + 2))  # 28 px + 2 px padding, x2


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", 100), ("dpm++2m", 50)])
def test_ddpm_and_dpm_solver_evaluate_and_reconstruct(sampler, steps, tiny_checkpoint, tmp_path):
    """Both samplers run through eval: the report records each one's model evaluations (DDPM: all
    T = 100; DPM-Solver++: the default 50), and from t = 5 they keep the digit, from T-1 they cannot."""
    json_path = tmp_path / "report.json"
    run_eval(["--checkpoint", str(tiny_checkpoint), "--metrics", "recon", "--sampler", sampler,
              "--num-samples", "10", "--recon-t", "5,99", "--num-recon", "8", "--json", str(json_path),
              "--device", "cpu"])  # fmt: skip
    report = json.loads(json_path.read_text())
    assert (report["provenance"]["sampling"]["sampler"], report["provenance"]["sampling"]["steps"]) == (
        sampler,
        steps,
    )
    per_t = report["metrics"]["reconstruction"]["per_t"]
    assert per_t["5"]["ssim_mean"] > per_t["99"]["ssim_mean"] + 0.3


def test_sampling_is_reproducible_with_the_seed(tiny_checkpoint):
    model, diffusion, _ = load_for_inference(tiny_checkpoint, torch.device("cpu"))
    options = {"sampling": SamplingSettings(sampler="ddim", steps=2), "image_shape": (1, 28, 28), "seed": 0,
               "device": torch.device("cpu"), "batch_size": 2}  # fmt: skip
    first, labels = sampling.generate_samples(model, diffusion, 3, **options)
    second, _ = sampling.generate_samples(model, diffusion, 3, **options)
    assert first.shape == (3, 1, 28, 28) and labels is None
    assert torch.equal(first, second)


@pytest.mark.parametrize(("amp", "network_dtype"), [("none", torch.float32), ("bf16", torch.bfloat16)])
def test_amp_flag_sets_the_unet_dtype_and_the_chain_stays_float32(tiny_checkpoint, amp, network_dtype):
    """--amp reaches the U-Net (its outputs are bfloat16 under bf16); the sampler's own arithmetic
    stays float32 and the samples stay finite and in [-1, 1]."""
    model, diffusion, _ = load_for_inference(tiny_checkpoint, torch.device("cpu"))
    output_dtypes = set()
    model.register_forward_hook(lambda module, inputs, output: output_dtypes.add(output.dtype))
    samples, _ = sampling.generate_samples(
        model, diffusion, 4, sampling=SamplingSettings(sampler="ddim", steps=3), image_shape=(1, 28, 28),
        seed=0, device=torch.device("cpu"), amp=amp, batch_size=4,
    )  # fmt: skip
    assert output_dtypes == {network_dtype}
    assert samples.dtype == torch.float32 and torch.isfinite(samples).all()
    assert samples.abs().max() <= 1


class LikeCompiled(torch.nn.Module):
    """Stands in for torch.compile's wrapper, which has no len() and so no truth value."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.num_classes = model, model.num_classes

    def __len__(self) -> int:
        raise TypeError("a compiled U-Net does not support len()")

    def forward(self, *inputs):
        return self.model(*inputs)


def test_evaluation_runs_with_a_compiled_unet(tiny_checkpoint, classifier_path, tmp_path):
    """--compile hands the evaluation a wrapper without a truth value: it must never be tested with
    `if model` (that raised TypeError once). The loaded model's network is swapped for torch.compile's
    stand-in (compiling itself takes a minute on a CPU) and goes through the sample sets, the
    reconstruction and the NLL bound."""
    device = torch.device("cpu")
    settings = EvaluationSettings(checkpoint=str(tiny_checkpoint), num_samples=4, metrics=("classifier",),
                                  classifier=str(classifier_path), json=str(tmp_path / "r.json"),
                                  recon_t=(5,), num_recon=2, num_nll=2)  # fmt: skip
    sampling_settings = SamplingSettings(sampler="ddim", steps=2)
    plan = plan_speed("none", "off", "auto", "off", device)
    loaded = load_model(settings, sampling_settings, plan, device)
    compiled = replace(loaded, network=LikeCompiled(loaded.network))
    real = load_real_data("mnist-5k", None, compiled.image_shape)
    comparison, _ = compare_with_test_split(settings, real, load_judge(settings, real, True, device), device)
    paths = output_paths(settings, "compiled")
    alone = Processes(rank=0, world_size=1, device=device)
    scores = score_sample_sets(
        compiled, settings, sampling_settings, plan, real, paths, comparison, None, alone
    )
    assert scores.generated.classifier is not None and paths.samples_png.is_file()
    assert reconstruction_scores(compiled, settings, sampling_settings, plan, real, device).num_images == 2
    assert nll_of_test_split(compiled, settings, real, device).num_images == 2


def test_conditional_model_gets_cas_and_a_grid_row_per_class(tmp_path, tiny_checkpoint):
    """An untrained class-conditional model: CAS runs (near chance) and the grid has 10 rows."""
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["config"]["model"]["num_classes"] = 10
    weights = build_model(checkpoint["config"]).state_dict()
    save_checkpoint(
        checkpoint | {"version": CHECKPOINT_VERSION, "model": weights, "ema": weights}, tmp_path / "c.pt"
    )
    run_eval(
        [
            "--checkpoint",
            str(tmp_path / "c.pt"),
            "--num-samples",
            "20",
            "--sampler",
            "ddim",
            "--steps",
            "2",
            "--guidance",
            "2",
            "--metrics",
            "cas",
            "--cas-epochs",
            "1",
            "--json",
            str(tmp_path / "c.json"),
            "--device",
            "cpu",
        ]
    )
    report = json.loads((tmp_path / "c.json").read_text())
    assert 0 <= report["metrics"]["cas"]["cas_accuracy"] <= 1 and report["metrics"]["cas"]["num_train"] == 20
    assert report["metrics"]["generated"] == {} and report["metrics"]["reconstruction"] is None
    assert Image.open(tmp_path / "c_samples.png").size == (2 * (2 * 30 + 2), 2 * (10 * 30 + 2))


def test_a_glob_of_epoch_checkpoints_gives_the_curve_csv_and_png(tiny_checkpoint, tmp_path):
    """Two epoch checkpoints (the tiny one as epoch 1, a copy as epoch 2): two reports, one CSV row
    each in epoch order with the samples' and the floor's metrics, and the PNG."""
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    save_checkpoint(checkpoint | {"epoch": 2, "step": 400}, tmp_path / "mnist_epoch_02.pt")
    save_checkpoint(checkpoint, tmp_path / "mnist_epoch_01.pt")
    out = tmp_path / "out"
    stdout, _ = run_eval(
        ["--checkpoint", str(tmp_path / "mnist_epoch_*.pt"), "--num-samples", "10",
         "--sampler", "ddim", "--steps", "2", "--metrics", "classifier", "--out-dir", str(out),
         "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    )  # fmt: skip
    with open(out / "training_curve.csv") as table:
        rows = list(csv.DictReader(table))
    assert [(row["epoch"], row["step"]) for row in rows] == [("1", "200"), ("2", "400")]
    for row in rows:
        for key in ("fid", "is_mean", "precision", "recall"):
            assert math.isfinite(float(row[f"classifier_{key}"])) and math.isfinite(
                float(row[f"floor_classifier_{key}"])
            )
        assert row["classifier_fid_std"] == ""  # one repeat: no spread over repeats
    assert rows[0]["floor_classifier_fid"] == rows[1]["floor_classifier_fid"]  # the same floor for both
    assert Image.open(out / "training_curve.png").size[0] > 500
    assert {path.name for path in out.glob("*.json")} == {
        "eval_mnist_epoch_01.json",
        "eval_mnist_epoch_02.json",
    }
    assert "training_curve.csv" in stdout


# ----- input checks ------------------------------------------------------------------------------


def test_default_reconstruction_timesteps_follow_T():
    assert sampling.sweep_timesteps(None, 1000) == [50, 100, 250, 500, 750, 999]
    assert sampling.sweep_timesteps(None, 100) == [50, 99]
    assert sampling.sweep_timesteps((0, 7), 100) == [0, 7]


BAD_INPUTS = {  # case: (arguments, what the one error line must say)
    "missing checkpoint": (["--checkpoint", "{tmp}/missing.pt"], "no checkpoint file at"),
    "corrupt checkpoint": (["--checkpoint", "{tmp}/corrupt.pt"], "not a readable checkpoint"),
    "truncated checkpoint": (["--checkpoint", "{tmp}/truncated.pt"], "not a readable checkpoint"),
    "steps 0": (["--checkpoint", "{tiny}", "--steps", "0"], "argument --steps: must be a positive integer"),
    "steps above T": (["--checkpoint", "{tiny}", "--steps", "101"], "--steps must be in [1, 100]"),
    "t above T-1": (["--checkpoint", "{tiny}", "--recon-t", "5,100"], "--recon-t must be in [0, 99]"),
    "negative t": (["--checkpoint", "{tiny}", "--recon-t=-1"], "--recon-t must be in [0, 99]"),
    "unwritable output": (
        ["--checkpoint", "{tiny}", "--json", "{tmp}/a_file/r.json"],
        "cannot create output",
    ),
    "glob matches nothing": (["--checkpoint", "{tmp}/mnist_epoch_*.pt"], "no checkpoint file matches"),
    "json with several": (
        ["--checkpoint", "{tiny},demo", "--json", "{tmp}/r.json"],
        "--json names one report",
    ),
    "guidance, unconditional": (["--checkpoint", "{tiny}", "--guidance", "3"], "needs a class-conditional"),
    "corrupt classifier": (
        ["--checkpoint", "{tiny}", "--classifier", "{tmp}/corrupt.pt", "--json", "{tmp}/r.json"],
        "corrupt.pt is not a readable classifier file",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, tiny_checkpoint, monkeypatch, capsys):
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "truncated.pt").write_bytes(tiny_checkpoint.read_bytes()[:2000])
    (tmp_path / "a_file").write_text("")
    arguments, message = BAD_INPUTS[case]
    argv = [argument.format(tmp=tmp_path, tiny=tiny_checkpoint) for argument in arguments]
    monkeypatch.chdir(tmp_path)  # no checkpoints/ folder for the default --checkpoint
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: eval_MNIST.main([*argv, "--num-samples", "4", "--device", "cpu"]))
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]


@pytest.mark.parametrize(
    ("num_samples", "metrics", "minimum"),
    [("3", "classifier,memorisation,recon", "4"), ("1", "memorisation,recon", "2")],
)
def test_too_few_samples_fail_in_one_line_before_any_sampling(
    num_samples, metrics, minimum, tiny_checkpoint, tmp_path, capsys
):
    """Precision/recall need more than k = 3 images per set, FID two: --num-samples below that stops
    at once (the tiny model draws 40 samples in seconds; this takes well under that), with no grid."""
    argv = ["--checkpoint", str(tiny_checkpoint), "--num-samples", num_samples, "--metrics", metrics,
            "--sampler", "ddim", "--steps", "50", "--out-dir", str(tmp_path), "--device", "cpu"]  # fmt: skip
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: eval_MNIST.main(argv))
    seconds = time.perf_counter() - start
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: --num-samples must be at least {minimum} (")
    assert errors[0].endswith(f"got {num_samples}")
    assert list(tmp_path.iterdir()) == [] and seconds < 10  # no sample grid, no report


def test_command_line_error_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "eval_MNIST.py"), "--checkpoint", str(tmp_path / "none.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: no checkpoint file at {tmp_path / 'none.pt'}"]


# ----- train_classifier --------------------------------------------------------------------------


def test_classifier_file_round_trips_and_default_paths_do_not_collide(classifier_path, real_images):
    model, info = classifier.load_classifier(classifier_path)
    assert info["format"] == "mnist-classifier" and info["data"] == "mnist-5k" and info["epochs"] == 1
    assert 0.1 < info["test_accuracy"] <= 1
    logits = model(real_images["test"][:4])
    features = model.features(real_images["test"][:4])
    assert logits.shape == (4, 10) and features.shape == (4, classifier.FEATURE_DIM)
    for name in ("mnist", "mnist-5k"):  # the shipped one, so that everyone's classifier-FID agrees
        assert classifier.default_classifier_path(name, None).resolve() == classifier.SHIPPED_CLASSIFIER
    others = {
        classifier.default_classifier_path("fashion-mnist", None),
        classifier.default_classifier_path("mnist", "data/a"),
        classifier.default_classifier_path("mnist", "data/b"),
    }
    assert len(others) == 3 and classifier.SHIPPED_CLASSIFIER not in {path.resolve() for path in others}


def test_the_shipped_classifier_file_loads_as_the_small_cnn():
    """Old files keep loading: the shipped one (sha256 pinned, format "mnist-classifier", version 1 or
    2) is read unchanged into SmallCNNClassifier."""
    assert sha256_of_file(classifier.SHIPPED_CLASSIFIER) == classifier.SHIPPED_CLASSIFIER_SHA256
    loaded = classifier.LoadedClassifier.read(classifier.SHIPPED_CLASSIFIER)
    assert isinstance(loaded.model, classifier.SmallCNNClassifier) and loaded.model.image_shape == (1, 28, 28)
    assert loaded.info["format"] == "mnist-classifier" and loaded.info["data"] == "mnist-5k"
    assert not loaded.model.training


def test_corrupt_classifier_file_is_a_user_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(classifier.ClassifierError, match="not a readable classifier file"):
        classifier.load_classifier(tmp_path / "bad.pt")


# ----- Inception, with stand-in weights ----------------------------------------------------------


@pytest.fixture
def random_inception_weights(tmp_path, monkeypatch) -> Path:
    """InceptionV3 weights of the right shapes and random values: for the plumbing, not the numbers."""
    inception = feature_extractor_inceptionv3.FeatureExtractorInceptionV3
    monkeypatch.setattr(feature_extractor_inceptionv3, "load_state_dict_from_url", lambda *args, **kwargs: {})
    monkeypatch.setattr(inception, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    path = tmp_path / "inception.pth"
    torch.save(inception("inception-v3-compat", ["2048"]).state_dict(), path)
    monkeypatch.undo()
    return path


@pytest.fixture
def small_idx_dir(tmp_path) -> Path:
    """A --data-dir of 20 MNIST-5k test digits as both splits, so InceptionV3 runs in seconds on CPU."""
    images, labels = load_images("mnist-5k", "test")
    pick = torch.arange(0, len(images), len(images) // 20)
    pixels = image_metrics.to_uint8(images[pick])[:, 0].numpy()
    folder = tmp_path / "idx"
    folder.mkdir()
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", pixels)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels[pick].numpy().astype("uint8"))
    return folder


def test_inception_metrics_go_through_torch_fidelity_with_local_weights(
    tiny_checkpoint, random_inception_weights, small_idx_dir, tmp_path
):
    stdout, stderr = run_eval(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--num-samples",
            "10",
            "--sampler",
            "ddim",
            "--steps",
            "2",
            "--metrics",
            "inception",
            "--inception-weights",
            str(random_inception_weights),
            "--data-dir",
            str(small_idx_dir),
            "--json",
            str(tmp_path / "r.json"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
        ]
    )
    report = json.loads((tmp_path / "r.json").read_text())
    inception = report["provenance"]["feature_extractors"]["inception"]
    assert inception["used"] and inception["weights_sha256"] == sha256_of_file(random_inception_weights)
    assert report["provenance"]["data"] == report["provenance"]["data"] | {
        "name": "idx-idx",
        "num_reference": 20,
    }
    assert all(math.isfinite(value) for value in report["metrics"]["generated"]["inception"].values())
    assert any((tmp_path / "cache").iterdir())  # the reference statistics went to --cache-dir
    assert "inception FID" in stdout and "Inception" not in stderr


def test_no_ema_evaluates_the_raw_weights(tiny_checkpoint, tmp_path):
    """The tiny checkpoint's raw weights are a broken copy of its EMA ones: --no-ema must use them
    (and say so in the report), and their reconstructions from t = 5 are far worse."""
    ssim = {}
    for flag in ("--ema", "--no-ema"):
        json_path = tmp_path / f"{flag}.json"
        argv = ["--checkpoint", str(tiny_checkpoint), "--metrics", "recon", "--recon-t", "5", "--num-recon",
                "8", "--sampler", "ddim", "--steps", "4", "--num-samples", "10", "--json", str(json_path),
                "--device", "cpu", flag]  # fmt: skip
        run_eval(argv)
        report = json.loads(json_path.read_text())
        weights = report["provenance"]["checkpoint"]["weights"]
        ssim[weights] = report["metrics"]["reconstruction"]["per_t"]["5"]["ssim_mean"]
    assert set(ssim) == {"ema", "model"}
    assert ssim["ema"] > ssim["model"] + 0.2
