"""`stylelora pick RUN_DIR`: measure every adapter a run folder holds (each checkpoint's and each
measured step's) on the run's held-out prompts, pick one by the rule of `sample/pick.py` and
write it as `NAME-best.safetensors`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from pydantic import ValidationError

from stylelora.config import Config
from stylelora.errors import UserError, first_line
from stylelora.export.atomic import atomic_path
from stylelora.families.base import ModelFamily
from stylelora.sample.adapter import (
    ADAPTER_NAME,
    attach_adapter,
    restore_weights,
    weigh_adapter,
)
from stylelora.sample.measures import measure, reference
from stylelora.sample.pick import best_path, no_measures, pick, write_best
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import render_all

STEP_FILE = re.compile(r"-step-(\d+)\.safetensors$")


def run_config(run_dir: Path) -> Config:
    """The resolved config a run wrote (`config.json`)."""
    path = Path(run_dir) / "config.json"
    try:
        return Config.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise UserError(f"{path}: not found; give the folder a training run wrote") from None
    except (OSError, ValueError, ValidationError) as exc:
        raise UserError(f"{path}: not a run's config ({first_line(exc)})") from None


def step_adapters(run_dir: Path, name: str) -> dict[int, Path]:
    """Step -> adapter file, from `checkpoints/step-N/` and `measures/`."""
    found = {}
    for pattern in (f"checkpoints/step-*/{name}-step-*.safetensors", f"measures/{name}-step-*"):
        for path in sorted(Path(run_dir).glob(pattern)):
            if match := STEP_FILE.search(path.name):
                found.setdefault(int(match.group(1)), path)
    return dict(sorted(found.items()))


def adapter_renders(
    family: ModelFamily, path: Path, prompts: list[SamplePrompt], scale: float = 1.0
) -> list[Image.Image]:
    """`prompts` rendered with the adapter file at strength `scale`; the model as it was after."""
    saved: dict = {}
    loaded = attach_adapter(family, path, scale, ADAPTER_NAME, None, saved)
    try:
        if loaded:
            weigh_adapter(family, path, scale)
        return render_all(family.pipe, prompts, family)
    finally:
        if loaded:
            family.pipe.delete_adapters(ADAPTER_NAME)
        else:
            restore_weights(saved)


def measure_adapters(
    family: ModelFamily,
    adapters: dict[int, Path],
    prompts: list[SamplePrompt],
    training: list[Image.Image],
    say: Callable[[str], None] = print,
) -> list[dict]:
    """A `measure` record (step, style, content, copying, base_copying) for each adapter."""
    base = render_all(family.pipe, prompts, family)
    ref = reference(family, training, base)
    records = []
    for step, path in adapters.items():
        values = measure(family, ref, adapter_renders(family, path, prompts)).as_dict()
        records.append({"step": step, **values})
        say(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
    return records


def pick_run(run_dir: Path, say: Callable[[str], None] = print) -> Path:
    """Measure, pick and write `NAME-best.safetensors` in `run_dir`; its path."""
    from stylelora.data.report import scan_dataset
    from stylelora.train.measuring import held_out_prompts, training_images
    from stylelora.train.run import fitted_prompts, load_model, read_sample_prompts

    cfg = run_config(run_dir)
    adapters = step_adapters(run_dir, cfg.name)
    if not adapters:
        raise no_measures(Path(run_dir))
    records = scan_dataset(cfg.data).records
    family = load_model(cfg)
    family.pipe.set_progress_bar_config(disable=True)
    sample_prompts, _ = fitted_prompts(read_sample_prompts(cfg), family.size_step)
    prompts = held_out_prompts(sample_prompts, [r.caption for r in records], cfg)
    training = training_images(records, cfg.data.largest_resolution)
    measured = measure_adapters(family, adapters, prompts, training, say)
    record, reason = pick(measured)
    out = write_best(adapters[record["step"]], best_path(run_dir, cfg.name), record, reason)
    with atomic_path(Path(run_dir) / "measures" / "pick.json") as tmp:
        tmp.write_text(json.dumps({"measures": measured, "step": record["step"], "reason": reason}))
    say(f"picked step {record['step']}: {reason}\nsaved {out}")
    return out
