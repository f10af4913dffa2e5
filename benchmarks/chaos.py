"""Chaos: kill a tiny CPU training run with SIGKILL at N random moments, resume it each time, and check
that it ends bit for bit where an uninterrupted run does, with every checkpoint along the way loadable.

The run is `train_MNIST.py` itself (a subprocess, as a user starts it) on a tiny U-Net (8 channels,
T = 20, class-conditional, dropout) and the first --images MNIST-5k training digits, one thread,
`--save-every 1`. Each kill waits until the launch has logged a step drawn at random from those
still to come (or the checkpoint's own step: then at a random moment of the start-up), then up to
0.2 s more, so kills land in training steps, epoch-end saves and start-ups alike. After each kill
every checkpoint in the folder must load; then `--resume latest` continues (a new run if no
checkpoint was saved yet), taking over the killed run's lock (recorded). The last resume runs to
the end; its last.pt must equal, tensor for tensor, the last.pt of the same flags trained without
interruption (in this process, through trainer.train). Exit status 1 if anything differs.

Example:
    python -m benchmarks.chaos --kills 5 --json runs/chaos/result.json
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ddpm.datasets.idx import write_idx
from ddpm.datasets.sources import load_images
from ddpm.evaluation.image_metrics import to_uint8
from ddpm.plumbing.checkpointing import LAST_NAME, load_checkpoint
from ddpm.plumbing.cli import OneLineErrorParser, non_negative_int, positive_int, run_cli
from ddpm.plumbing.messages import UserError
from ddpm.plumbing.output_files import TEMP_SUFFIX, write_json
from ddpm.plumbing.presets import training_job_from_flags
from ddpm.plumbing.provenance import hardware
from ddpm.training.trainer import train
from ddpm.training.training_log import LOG_NAME

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "--model-channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--attn-resolutions", "",
    "--T", "20", "--batch-size", "16", "--warmup-steps", "2", "--dropout", "0.1", "--class-cond",
    "--log-every", "1", "--save-every", "1", "--sample-every", "1000", "--eval-every", "0", "--device", "cpu",
]  # fmt: skip
BATCH_SIZE = 16
POLL_SECONDS = 0.02
START_UP_KILL_SECONDS = 3.0  # a kill during the start-up lands this long after the launch, at most
RUN_TIMEOUT_SECONDS = 600
COMPARED = ("model", "ema")  # tensor by tensor; plus the optimizer moments and the position


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="python -m benchmarks.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=non_negative_int, default=5, help="SIGKILLs at random moments")
    parser.add_argument("--images", type=positive_int, default=96, help="training digits (16 per step)")
    parser.add_argument("--epochs", type=positive_int, default=8, help="epochs of the run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--out-dir", default="runs/chaos", help="data, the reference run and the killed run")
    parser.add_argument("--json", default=None, help="also write the result here")
    return parser.parse_args(argv)


def write_tiny_data(images: int, folder: Path) -> None:
    """The first `images` MNIST-5k training digits and labels as IDX files."""
    pixels, labels = load_images("mnist-5k", "train")
    if images < BATCH_SIZE:
        raise UserError(f"--images must be at least {BATCH_SIZE} (one batch), got {images}")
    write_idx(folder / "train-images-idx3-ubyte", to_uint8(pixels[:images])[:, 0].numpy())
    write_idx(folder / "train-labels-idx1-ubyte", labels[:images].numpy().astype(np.uint8))


def logged_step(out_dir: Path) -> int:
    """The last step in train_log.csv (0 before the first row)."""
    try:
        rows = (out_dir / LOG_NAME).read_text().splitlines()[1:]
        return int(rows[-1].split(",")[0]) if rows else 0
    except (OSError, ValueError, IndexError):
        return 0


def checkpoint_steps(out_dir: Path) -> dict[str, int]:
    """Every checkpoint in the folder, loaded: name -> step (a CheckpointError if one does not load)."""
    return {path.name: load_checkpoint(path)["step"] for path in sorted(out_dir.glob("*.pt"))}


def launch(flags: list[str], stderr_path: Path) -> subprocess.Popen:
    """train_MNIST.py flags on one thread; its stderr (progress bar, notes) goes to stderr_path."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "train_MNIST.py"), *flags]
    with stderr_path.open("w") as stderr:
        return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=stderr)


def log_identity(out_dir: Path) -> int | None:
    """The inode of train_log.csv: a (resumed) run writes it anew, atomically, before its first step."""
    try:
        return (out_dir / LOG_NAME).stat().st_ino
    except FileNotFoundError:
        return None


def kill_at(process: subprocess.Popen, out_dir: Path, target: int | None, rng: random.Random) -> bool:
    """SIGKILL once this launch has logged step `target`, plus a random part of a step (None: at a
    random moment of the start-up); False if the run finished first."""
    start, old_log = time.monotonic(), log_identity(out_dir)
    if target is None:
        time.sleep(rng.uniform(0, START_UP_KILL_SECONDS))
    else:
        while process.poll() is None and time.monotonic() - start < RUN_TIMEOUT_SECONDS:
            if log_identity(out_dir) not in (None, old_log) and logged_step(out_dir) >= target:
                break
            time.sleep(POLL_SECONDS)
        time.sleep(rng.uniform(0, POLL_SECONDS * 10))
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def killed_run(flags: list[str], out_dir: Path, kills: int, total_steps: int, seed: int) -> list[dict]:
    """Launch, kill, check, resume, `kills` times; then resume to the end. One record per launch."""
    rng, records = random.Random(seed), []
    for attempt in range(kills + 1):
        before = checkpoint_steps(out_dir) if out_dir.is_dir() else {}
        stderr_path = out_dir.parent / f"launch_{attempt + 1}.stderr"
        process = launch([*flags, "--out-dir", str(out_dir), "--resume", "latest"], stderr_path)
        resumed_from = max(before.values(), default=0)
        moment, killed = "end", False
        if attempt < kills and resumed_from < total_steps:
            target = rng.randint(resumed_from, total_steps - 1)  # resumed_from: during the start-up
            moment = f"step {target}" if target > resumed_from else "start-up"
            killed = kill_at(process, out_dir, target if target > resumed_from else None, rng)
        process.wait(timeout=RUN_TIMEOUT_SECONDS)
        stderr = stderr_path.read_text()
        record = {
            "kill_after": moment,
            "killed": killed,
            "exit_status": process.returncode,
            "took_over_lock": "took over" in stderr,
            "temp_files_left": len(list(out_dir.glob(f".*{TEMP_SUFFIX}"))),
            "checkpoints": checkpoint_steps(out_dir),  # every one must load
        }
        records.append(record)
        if not killed and process.returncode != 0:
            raise UserError(f"the run exited with {process.returncode}: {stderr.strip().splitlines()[-1:]}")
    return records


def differences(reference: dict, final: dict) -> list[str]:
    """What differs between two checkpoints: position, weights, EMA, optimizer moments, RNG."""
    positions = ("step", "epoch", "batch_in_epoch", "ema_n_averaged")
    found = [key for key in positions if reference[key] != final[key]]
    for part in COMPARED:
        found += [
            f"{part}.{key}"
            for key, value in reference[part].items()
            if not torch.equal(value, final[part][key])
        ]
    for index, moments in reference["optimizer"]["state"].items():
        final_moments = final["optimizer"]["state"][index]
        found += [
            f"optimizer.{index}.{key}" for key in moments if not torch.equal(moments[key], final_moments[key])
        ]
    if not torch.equal(reference["rng"][0]["torch"], final["rng"][0]["torch"]):
        found.append("rng")
    return found


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the same kernels as the one-thread subprocesses: bit-identical sums
    out_dir = Path(args.out_dir)
    if (out_dir / "killed").exists() or (out_dir / "reference").exists():
        raise UserError(f"{out_dir}/ holds an earlier chaos run: give this one another --out-dir")
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    write_tiny_data(args.images, out_dir / "data")
    flags = [*TINY_RUN, "--data-dir", str(out_dir / "data"), "--epochs", str(args.epochs)]
    total_steps = args.epochs * (args.images // BATCH_SIZE)

    start = time.perf_counter()
    train(training_job_from_flags([*flags, "--out-dir", str(out_dir / "reference")]))
    reference_seconds = time.perf_counter() - start
    records = killed_run(flags, out_dir / "killed", args.kills, total_steps, args.seed)
    reference, final = (load_checkpoint(out_dir / name / LAST_NAME) for name in ("reference", "killed"))
    found = differences(reference, final)
    result = {
        "kills": sum(record["killed"] for record in records),
        "total_steps": total_steps,
        "identical": not found,
        "differences": found[:10],
        "checkpoints_loaded": sum(len(record["checkpoints"]) for record in records),
        "launches": records,
        "reference_seconds": round(reference_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "hardware": hardware(torch.device("cpu")),
        "torch": torch.__version__,
    }
    report(result)
    if args.json:
        write_json(result | {"args": vars(args)}, args.json)
    if found:
        raise SystemExit(1)


def report(result: dict) -> None:
    for index, record in enumerate(result["launches"]):
        what = f"exit {record['exit_status']}"
        if record["killed"]:
            what = f"SIGKILL after {record['kill_after']}"
        steps = ", ".join(f"{name} @ {step}" for name, step in record["checkpoints"].items()) or "none"
        print(f"launch {index + 1}: {what}; took over the lock: {record['took_over_lock']}; "
              f"temp files left: {record['temp_files_left']}; checkpoints (all load): {steps}")  # fmt: skip
    verdict = "bit-identical to"
    if not result["identical"]:
        verdict = f"DIFFERENT from ({', '.join(result['differences'])})"
    print(f"{result['kills']} SIGKILLs over {result['total_steps']} steps: the final last.pt (weights, EMA, "
          f"optimizer, RNG) is {verdict} the uninterrupted run's; {result['checkpoints_loaded']} checkpoint "
          f"loads, {result['seconds']} s on {result['hardware']}, torch {result['torch']}")  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
