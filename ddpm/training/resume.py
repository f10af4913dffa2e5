"""Starting a training run: a new one that must not overwrite another run, or the resume of a checkpoint
that must fit the flags.

--resume latest takes the newest checkpoint of the output folder (last.pt, else the highest
<data>_epoch_XX.pt; none: a new run), --resume PATH that file. A resume is refused in one line,
naming the run's config.toml, when its model, diffusion, data or batch size differ from the flags
(`setup_differences`); also when it was written by another number of processes (its batches and LR
schedule count its own). A new run refuses a folder that already holds checkpoints. A resume
restores every RNG state, so 2 + resume + 2 steps equal 4 straight (nanoGPT's resume reseeded
instead; here each rank's streams come back bit for bit).

Example:
    resumed = checkpoint_to_resume(job, out_dir, config, processes)  # None: a new run
    start_random_streams(state, resumed, job.run.seed, processes)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddpm.plumbing.checkpointing import CheckpointError, latest_checkpoint, load_checkpoint
from ddpm.plumbing.config_file import CONFIG_NAME
from ddpm.plumbing.messages import UserError
from ddpm.plumbing.presets import TrainingJob
from ddpm.plumbing.processes import Processes
from ddpm.plumbing.runtime import seed_everything
from ddpm.training.state import TrainingState, restore_rng_states

SETUP_SECTIONS = ("model", "diffusion")  # the config sections a resume must match, key by key
DATA_KEYS = ("data", "data_dir")
SHAPE_KEYS = ("in_channels", "image_size")  # unrecorded in older checkpoints: any value fits them
UNRECORDED_DEFAULTS = {"learn_sigma": False}  # what older checkpoints without the key were trained with


@dataclass(frozen=True)
class Resumed:
    """The checkpoint a run resumes, and the file it came from."""

    checkpoint: dict[str, Any]
    path: Path

    @property
    def step(self) -> int:
        return self.checkpoint["step"]


def setup_differences(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """'key <checkpoint value> there, <flag value> here' for each model, diffusion, data or batch-size
    difference."""
    differences = []
    for section in SETUP_SECTIONS:
        saved_section, section_config = saved.get(section, {}), config[section]
        for key in sorted(set(saved_section) | set(section_config)):
            there, here = saved_section.get(key, UNRECORDED_DEFAULTS.get(key)), section_config.get(key)
            if (list(there) if isinstance(there, tuple | list) else there) != here and not (
                key in SHAPE_KEYS and there is None
            ):
                differences.append(f"{key} {there} there, {here} here")
    for key in DATA_KEYS:
        if saved.get(key) != config[key]:
            differences.append(f"{key} {saved.get(key)} there, {config[key]} here")
    there, here = recorded_batch_size(saved), recorded_batch_size(config)
    if there is not None and here is not None and there != here:  # the epoch position counts its batches
        differences.append(f"batch_size {there} there, {here} here")
    return differences


def recorded_batch_size(config: dict[str, Any]) -> int | None:
    """The --batch-size a run config records (None where it records none)."""
    return config.get("train", {}).get("training", {}).get("batch_size")


def checkpoint_to_resume(
    job: TrainingJob, out_dir: Path, config: dict[str, Any], processes: Processes
) -> Resumed | None:
    """The checkpoint --resume names (checked against the flags), or None for a new run."""
    resume = job.run.resume
    if resume is None:
        refuse_to_overwrite(out_dir)
        return None
    path = Path(resume)
    if resume == "latest":
        try:
            path = latest_checkpoint(out_dir)
        except CheckpointError:
            processes.announce(f"--resume latest: no checkpoint in {out_dir}/ yet, starting a new run")
            return None
    checkpoint = load_checkpoint(path)
    if path.resolve().parent != out_dir.resolve():
        refuse_to_overwrite(out_dir)
    differences = setup_differences(checkpoint["config"], config)
    if differences:
        run_config = path.parent / CONFIG_NAME
        own_flags = f" (--config {run_config})" if run_config.is_file() else ""
        raise CheckpointError(
            f"{path} is another setup ({'; '.join(differences[:3])}): resume it with its own flags{own_flags}"
        )
    return Resumed(checkpoint=checkpoint, path=path)


def refuse_to_overwrite(out_dir: Path) -> None:
    """A new run must not replace another run's checkpoints."""
    try:
        existing = latest_checkpoint(out_dir)
    except CheckpointError:
        return
    raise UserError(
        f"{existing} exists: continue that run with --resume latest, or give a new run another --out-dir"
    )


def start_random_streams(
    state: TrainingState, resumed: Resumed | None, seed: int, processes: Processes
) -> None:
    """Resume: restore the checkpoint and each rank's RNG states. New run: one stream per rank for
    timesteps, noise, dropout and label dropout, apart from the one that initialised the weights.

    A checkpoint of another process count is refused: its steps, epoch position and LR schedule
    count batches of its own number of processes."""
    if resumed is None:
        seed_everything(seed + 1 + processes.rank)
        return
    state.restore(resumed.checkpoint, resumed.path)
    written_by = len(resumed.checkpoint["rng"])
    if written_by != processes.world_size:
        raise CheckpointError(
            f"{resumed.path} was written by {written_by} process(es), this run has {processes.world_size}: "
            f"resume it with {written_by} (its batches and LR schedule count {written_by}), "
            "or start a new run in another --out-dir"
        )
    restore_rng_states(resumed.checkpoint["rng"][processes.rank], processes.device)
