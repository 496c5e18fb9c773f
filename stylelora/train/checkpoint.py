"""Checkpoints a run resumes from exactly, written so that no crash leaves a bad one behind.

A checkpoint is a folder `<output_dir>/checkpoints/step-NNNNNN/`: accelerate's state (optimizer,
gradient scaler, every process's RNG states), the adapter and EMA tensors (safetensors), and the
trainer's counters and learning-rate schedule (JSON). It is written into `.tmp-step-NNNNNN`,
every file fsynced, then `checkpoint.json` (the manifest: each file and its size) is written
last and the folder renamed into place. Only a folder whose manifest matches its files counts,
so `latest` is always the newest complete checkpoint. Older ones beyond `keep` are removed only
after the new one is in place.

The trainer state and the scheduler are JSON rather than accelerate's custom objects because
accelerate loads those with `weights_only=False`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file

from stylelora.config import Config
from stylelora.errors import UserError, first_line
from stylelora.export.atomic import save_tensors
from stylelora.train.ema import AdapterEMA
from stylelora.train.guard import inject_fault

MANIFEST = "checkpoint.json"
ADAPTER = "adapter.safetensors"
EMA = "ema.safetensors"
STATE = "trainer_state.json"
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


@dataclass
class TrainState:
    """Where the run is: everything besides tensors that a resume needs to continue exactly."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    position: int = 0  # batches of this epoch already drawn
    draws: int = 0  # noise generators drawn: micro-batches since the start
    skipped: int = 0  # steps skipped for a non-finite loss or gradients
    skipped_in_a_row: int = 0
    seconds: float = 0.0  # training time before this session
    losses: list[float] = field(default_factory=list)  # one per step
    lrs: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    previews: list[tuple[int, str]] = field(default_factory=list)  # (step, path in the run)
    measures: list[dict] = field(default_factory=list)  # train/measuring.py's records
    picked: dict | None = None  # the measured step kept as NAME-best.safetensors, and why


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a manifest whose every file is present with its size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    """`latest`: the newest complete checkpoint of the run; otherwise a checkpoint folder."""
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise UserError(
                f"--resume latest: no complete checkpoint in {checkpoints_dir(output_dir)}"
            )
        return found[-1]
    path = Path(resume)
    if not is_complete(path):
        raise UserError(f"--resume {path}: not a complete checkpoint folder (no valid {MANIFEST})")
    return path


def check_fresh_start(output_dir: Path, adapters: list[Path], overwrite: bool) -> None:
    """A new run must not mix its checkpoints with an earlier run's, nor replace the adapter
    files of an earlier run unless asked to (`overwrite`)."""
    if complete_checkpoints(output_dir):
        raise UserError(
            f"{checkpoints_dir(output_dir)} holds checkpoints of an earlier run: continue it "
            "with --resume latest, or choose another output_dir"
        )
    earlier = [path for path in adapters if path.exists()]
    if earlier and not overwrite:
        raise UserError(
            f"{earlier[0]}: an earlier run's adapter is there; add --overwrite to replace it, "
            "or choose another output_dir (--output-dir)"
        )


def check_free_space(folder: Path, needed: int) -> None:
    """Stop at the start, not at the first checkpoint, when the disk cannot hold what the run
    will write (its checkpoints and measured adapters)."""
    existing = Path(folder)
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise UserError(
            f"{folder}: {free / 2**20:.1f} MiB free, but the checkpoints and measured adapters "
            f"need about {needed / 2**20:.1f} MiB; free some space, or set "
            "train.checkpoint_every_n_steps = 0 or validation.measure = false"
        )


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Saves and loads checkpoints of one run through accelerate, plus our own tensors."""

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: Path,
        keep: int,
        params: dict[str, torch.nn.Parameter],
        ema: AdapterEMA | None,
    ):
        self.accelerator = accelerator
        self.folder = checkpoints_dir(output_dir)
        self.keep = keep
        self.params = params
        self.ema = ema
        # The models' full weights are frozen: the adapter tensors are written by us instead.
        accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, out: models.clear())
        if accelerator.is_main_process:
            self.remove_leftovers()

    def remove_leftovers(self) -> None:
        """Temporary and half-removed folders are from a run that died; never read them."""
        for stale in [*self.folder.glob(".tmp-*"), *self.folder.glob(".old-*")]:
            shutil.rmtree(stale, ignore_errors=True)

    def save(self, state: TrainState, scheduler: dict, config: dict) -> Path:
        """Write the checkpoint of `state`; every process calls this."""
        name = f"step-{state.step:06d}"
        tmp, final = self.folder / f".tmp-{name}", self.folder / name
        main = self.accelerator.is_main_process
        try:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            self.accelerator.save_state(str(tmp))
            if main:
                self.write_own_files(tmp, state, scheduler, config)
                self.seal(tmp)
                self.replace(tmp, final)
        except WRITE_ERRORS as exc:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = complete_checkpoints(self.folder.parent)
            reason = getattr(exc, "strerror", None) or first_line(exc)[:120]
            raise UserError(
                f"could not write the checkpoint of step {state.step} in {self.folder} "
                f"(is the disk full? {reason}); "
                + (f"{kept[-1]} is kept" if kept else "no earlier checkpoint exists")
            ) from None
        self.accelerator.wait_for_everyone()
        if main:
            self.prune()
        return final

    def write_own_files(self, tmp: Path, state: TrainState, scheduler: dict, config: dict) -> None:
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.params.items()}
        save_tensors(tensors, tmp / ADAPTER)
        inject_fault("kill-in-checkpoint", state.step)
        if self.ema is not None:
            save_tensors(self.ema.state_dict(), tmp / EMA)
        payload = {"state": asdict(state), "lr_scheduler": scheduler, "config": config}
        (tmp / STATE).write_text(json.dumps(payload, indent=1))

    def seal(self, tmp: Path) -> None:
        """fsync every file, then write the manifest last: it vouches for what is on disk."""
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for path in files:
            fsync(path)
        manifest = {"files": {str(p.relative_to(tmp)): p.stat().st_size for p in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        fsync(tmp / MANIFEST)
        fsync(tmp)

    def replace(self, tmp: Path, final: Path) -> None:
        old = final.with_name(f".old-{final.name}")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        fsync(self.folder)
        shutil.rmtree(old, ignore_errors=True)

    def prune(self) -> None:
        for folder in complete_checkpoints(self.folder.parent)[: -self.keep]:
            old = folder.with_name(f".old-{folder.name}")
            folder.rename(old)  # a crash mid-removal leaves a name no run reads
            shutil.rmtree(old, ignore_errors=True)

    def load(self, folder: Path) -> tuple[TrainState, dict, dict]:
        """Restore the tensors and RNG states; return the state, scheduler and config saved."""
        tensors = load_file(str(folder / ADAPTER))
        if tensors.keys() != self.params.keys():
            raise UserError(
                f"{folder}: the checkpoint's adapter does not match this config's "
                "(adapter or model settings changed since it was written)"
            )
        try:
            self.accelerator.load_state(str(folder))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(
                f"{folder}: the checkpoint does not fit this config's optimizer ({exc})"
            ) from None
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(tensors[name])
        if self.ema is not None:
            if not (folder / EMA).is_file():
                raise UserError(f"{folder}: no EMA weights saved, but train.ema_decay is set")
            self.ema.load_state_dict(load_file(str(folder / EMA)))
        payload = json.loads((folder / STATE).read_text())
        state = TrainState(**payload["state"])
        state.validation = [tuple(v) for v in state.validation]
        state.previews = [tuple(v) for v in state.previews]
        return state, payload["lr_scheduler"], payload["config"]


def flat_config(cfg: Config) -> dict[str, str | int | float | bool]:
    """The config as `section.key` scalars, what TensorBoard's hyperparameter table takes."""
    flat = {}
    for key, value in cfg.model_dump(mode="json").items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, item in items:
            name = f"{key}.{sub}" if sub else key
            scalar = isinstance(item, (str, int, float, bool))
            flat[name] = item if scalar else json.dumps(item)
    return flat


def flat_config_get(saved: dict, key: str) -> object:
    section, _, name = key.partition(".")
    value = saved.get(section)
    if name:
        value = value.get(name) if isinstance(value, dict) else None
    scalar = isinstance(value, (str, int, float, bool))
    return value if scalar else json.dumps(value)


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """The `section.key`s whose value in `cfg` differs from the checkpoint's config."""
    return [
        key
        for key, value in flat_config(cfg).items()
        if key != "output_dir" and flat_config_get(saved, key) != value
    ]
