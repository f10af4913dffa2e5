"""eval_MNIST.py --save-samples and the sampling noise behind it, and eval under torchrun.

Sample i's noise depends on (seed, i) alone: its x_T is row i of one tensor drawn from the seed, its
fresh noise at each step (DDPM) comes from its own generator; so two batch sizes draw the same noise,
and torchrun, which deals whole batches over the ranks, gives one process's report and samples bit for
bit (gloo, 2 CPU processes). The tiny checkpoint (T = 100) draws 12 samples in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_eval
from PIL import Image

import eval_MNIST
import vizu_MNIST
from ddpm.evaluation import sample_sets
from ddpm.evaluation.saved_samples import png_name, save_samples
from ddpm.plumbing.cli import run_cli
from ddpm.sampling import batch_starts, in_sample_order, sample_generators, starting_noise
from diffusion import _randn

REPO = Path(__file__).resolve().parents[1]
NUM_SAMPLES = 12
ONE_THREAD_ENV = dict(os.environ, OMP_NUM_THREADS="1")


def eval_argv(checkpoint: Path, folder: Path, save: str, *extra: str) -> list[str]:
    """A quick evaluation: 12 DDPM samples (fresh noise at each of the 100 steps), classifier metrics."""
    return ["--checkpoint", str(checkpoint), "--num-samples", str(NUM_SAMPLES), "--sampler", "ddpm",
            "--metrics", "classifier", "--json", str(folder / "report.json"), "--save-samples", save,
            "--cache-dir", str(folder / "cache"), "--device", "cpu", *extra]  # fmt: skip


def read_png_folder(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path)) for path in sorted(folder.iterdir())])


def test_noise_of_a_sample_depends_on_the_seed_and_its_index_alone():
    """x_T: rows of one seeded tensor (the CPU stream drawn batch by batch gives the same rows, so the
    shipped demo's samples are unchanged); step noise: each sample's own generator, whatever its batch."""
    noise = starting_noise(NUM_SAMPLES, (1, 28, 28), seed=3)
    generator = torch.Generator().manual_seed(3)
    in_batches = torch.cat([torch.randn((5, 1, 28, 28), generator=generator) for _ in range(3)])
    assert torch.equal(noise, in_batches[:NUM_SAMPLES])
    cpu = torch.device("cpu")
    whole = _randn(
        (NUM_SAMPLES, 1, 28, 28), sample_generators(3, range(NUM_SAMPLES), cpu), cpu, torch.float32
    )
    part = _randn((5, 1, 28, 28), sample_generators(3, range(5, 10), cpu), cpu, torch.float32)
    assert torch.equal(whole[5:10], part)
    other_seed = _randn((5, 1, 28, 28), sample_generators(4, range(5, 10), cpu), cpu, torch.float32)
    assert not torch.equal(part, other_seed)


def test_the_ranks_batches_come_back_in_sample_order():
    starts = [list(batch_starts(12, 5, rank, 2)) for rank in range(2)]
    assert starts == [[0, 10], [5]]
    samples = torch.arange(12.0)
    parts = [torch.cat([samples[start : start + 5] for start in rank_starts]) for rank_starts in starts]
    assert torch.equal(in_sample_order(parts, 5), samples)


def test_png_folder_and_npz_hold_the_scored_images_for_two_batch_sizes(tiny_checkpoint, tmp_path):
    """The PNG folder (000000.png ...) and the .npz (uint8 NHWC arr_0) hold the same images; another
    --batch-size draws the same noise, so the same images up to the batch-size dependence of the CPU
    kernels (float differences of 1e-6, at most one 8-bit level)."""
    run_eval(eval_argv(tiny_checkpoint, tmp_path, str(tmp_path / "pngs"), "--batch-size", "5"))
    run_eval(eval_argv(tiny_checkpoint, tmp_path, str(tmp_path / "samples.npz"), "--batch-size", "12"))
    names = sorted(path.name for path in (tmp_path / "pngs").iterdir())
    assert names == [f"{index:06d}.png" for index in range(NUM_SAMPLES)]
    pngs = read_png_folder(tmp_path / "pngs")
    with np.load(tmp_path / "samples.npz") as saved:
        assert saved.files == ["arr_0"]  # unconditional: no labels
        npz = saved["arr_0"]
    assert npz.dtype == np.uint8 and npz.shape == (NUM_SAMPLES, 28, 28, 1)
    assert np.abs(pngs.astype(int) - npz[..., 0].astype(int)).max() <= 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["outputs"]["saved_samples"] == str(tmp_path / "samples.npz")


def test_labels_go_into_the_names_and_arr_1_and_an_earlier_folder_is_replaced_whole(tmp_path):
    images = torch.linspace(-1, 1, 4 * 28 * 28).reshape(4, 1, 28, 28)
    labels = torch.tensor([0, 1, 2, 3])
    save_samples(images, labels, tmp_path / "pngs")
    assert sorted(path.name for path in (tmp_path / "pngs").iterdir()) == [
        png_name(index, index) for index in range(4)
    ]
    assert png_name(123, 7) == "000123_label7.png"
    save_samples(images[:2], None, tmp_path / "pngs")  # fewer samples: nothing of the first run left
    assert sorted(path.name for path in (tmp_path / "pngs").iterdir()) == ["000000.png", "000001.png"]
    assert [path.name for path in tmp_path.iterdir()] == ["pngs"]  # no temp folder left behind
    save_samples(images, labels, tmp_path / "labelled.npz")
    with np.load(tmp_path / "labelled.npz") as saved:
        assert saved["arr_1"].tolist() == [0, 1, 2, 3]


def test_torch_fidelity_reads_the_png_folder(tmp_path):
    """torch-fidelity's input1=folder reads the grey PNGs back as the same pixels (as RGB)."""
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.utils import prepare_input_from_id

    images = torch.rand(3, 1, 28, 28) * 2 - 1
    save_samples(images, None, tmp_path / "pngs")
    dataset = prepare_input_from_id(1, **{**DEFAULTS, "input1": str(tmp_path / "pngs"), "verbose": False})
    read = torch.stack([dataset[index] for index in range(len(dataset))])
    assert read.shape == (3, 3, 28, 28) and read.dtype == torch.uint8
    assert torch.equal(read[:, 0], torch.from_numpy(read_png_folder(tmp_path / "pngs")))


BAD_SAVE_PATHS = {
    "folder of other files": ("{tmp}/mine", "holds other files (notes.txt"),
    "a file": ("{tmp}/mine/notes.txt", "is a file"),
    "under a file": ("{tmp}/mine/notes.txt/samples", "cannot create output folder"),
    "npz that is a folder": ("{tmp}/folder.npz", "is a folder"),
    "npz beyond memory": ("{tmp}/huge.npz", "in memory, this machine has"),
}


@pytest.mark.parametrize("case", BAD_SAVE_PATHS)
def test_bad_save_path_is_one_line_before_any_sampling(case, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "folder.npz").mkdir()
    path, message = BAD_SAVE_PATHS[case]
    count = "1000000000000" if case == "npz beyond memory" else "4"

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking --save-samples")

    monkeypatch.setattr(sample_sets, "generate_samples", no_sampling)
    argv = ["--checkpoint", str(tiny_checkpoint), "--num-samples", count, "--save-samples",
            path.format(tmp=tmp_path), "--out-dir", str(tmp_path / "out"), "--device", "cpu"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: eval_MNIST.main(argv))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0], errors
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_torchrun_two_processes_give_one_process_s_report_and_samples(tiny_checkpoint, tmp_path):
    """torchrun, gloo, 2 CPU processes: rank 0 gathers the samples (3 batches of 5: ranks 0, 1, 0) and
    writes the same report (every metric) and the same saved samples as one process, bit for bit."""
    single, double = tmp_path / "single", tmp_path / "double"
    run_eval(eval_argv(tiny_checkpoint, single, str(single / "samples.npz"), "--batch-size", "5"))
    argv = eval_argv(tiny_checkpoint, double, str(double / "samples.npz"), "--batch-size", "5")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "eval_MNIST.py"), *argv]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # rank 0 alone prints
    reports = [json.loads((folder / "report.json").read_text()) for folder in (single, double)]
    assert reports[0]["metrics"] == reports[1]["metrics"]
    assert reports[0]["provenance"]["sampling"] == reports[1]["provenance"]["sampling"]
    with np.load(single / "samples.npz") as one, np.load(double / "samples.npz") as two:
        assert np.array_equal(one["arr_0"], two["arr_0"])
    assert (single / "report_samples.png").read_bytes() == (double / "report_samples.png").read_bytes()


def test_vizu_refuses_several_processes(monkeypatch, capsys):
    """vizu's modes but --generate hold a few images: under torchrun with 2 processes they stop in one
    line naming the mode."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: vizu_MNIST.main(["--t-sweep", "--device", "cpu"]))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and errors == [
        "error: only --generate splits over torchrun processes: run --t-sweep with python, "
        "not torchrun --nproc_per_node N"
    ]
