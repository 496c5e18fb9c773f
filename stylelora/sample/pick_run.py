"""`stylelora pick RUN_DIR`: measure every adapter a run folder holds (each checkpoint's and each
measured step's) on the run's held-out prompts, pick one by the rule of `sample/pick.py`, write
it as `NAME-best.safetensors` and show the new measures and pick in `report.html`."""

from __future__ import annotations

import json
import re
import time
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
from stylelora.sample.render import preview_pipeline, render_all
from stylelora.sample.report import read_report_data, write_report

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
    family: ModelFamily,
    path: Path,
    prompts: list[SamplePrompt],
    scale: float = 1.0,
    scheduler: str = "default",
) -> list[Image.Image]:
    """`prompts` rendered with the adapter file at strength `scale` (with the sample
    `scheduler`); the model as it was after."""
    saved: dict = {}
    loaded = attach_adapter(family, path, scale, ADAPTER_NAME, None, saved)
    try:
        if loaded:
            weigh_adapter(family, path, scale)
        return render_all(preview_pipeline(family.pipe, scheduler), prompts, family)
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
    rows_in: Path | None = None,
    scheduler: str = "default",
    say: Callable[[str], None] = print,
) -> list[dict]:
    """A `measure` record (step, style, content, copying, base_copying, and the renders' row
    where `rows_in`, a run folder, is given) for each adapter, rendered with the sample
    `scheduler` as the run measured."""
    from stylelora.train.measuring import BASE_ROW, save_row, step_row

    base = render_all(preview_pipeline(family.pipe, scheduler), prompts, family)
    ref = reference(family, training, base)
    if rows_in:
        save_row(rows_in, base, BASE_ROW)
    records = []
    for step, path in adapters.items():
        images = adapter_renders(family, path, prompts, scheduler=scheduler)
        values = measure(family, ref, images).as_dict()
        records.append({"step": step, **values})
        if rows_in:
            records[-1]["path"] = save_row(rows_in, images, step_row(step))
        say(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
    return records


def show_in_report(run_dir: Path, measured: list[dict], picked: dict) -> bool:
    """Write `report.html` again with these measures and this pick; False where the run left
    no record of its report (a run of an older version)."""
    data = read_report_data(run_dir)
    if data is None:
        return False
    data.measures, data.picked = measured, picked
    data.timings["picked again by `stylelora pick`"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_report(run_dir, data)
    return True


def pick_run(
    run_dir: Path,
    say: Callable[[str], None] = print,
    prompts: int | None = None,
    steps: int | None = None,
) -> Path:
    """Measure, pick and write `NAME-best.safetensors` in `run_dir`; its path. `prompts` and
    `steps` replace the run's `validation.measure_prompts` and `measure_steps`."""
    from stylelora.data.report import scan_dataset
    from stylelora.train.measuring import held_out_prompts, training_images
    from stylelora.train.run import fitted_prompts, load_model, read_sample_prompts

    cfg = run_config(run_dir)
    asked = {"measure_prompts": prompts, "measure_steps": steps}
    cfg.validation = cfg.validation.model_copy(
        update={key: value for key, value in asked.items() if value is not None}
    )
    adapters = step_adapters(run_dir, cfg.name)
    if not adapters:
        raise no_measures(Path(run_dir))
    records = scan_dataset(cfg.data).records
    family = load_model(cfg)
    family.pipe.set_progress_bar_config(disable=True)
    sample_prompts, _ = fitted_prompts(read_sample_prompts(cfg), family.size_step)
    held_out = held_out_prompts(sample_prompts, [r.caption for r in records], cfg)
    training = training_images(records, cfg.data.largest_resolution)
    measured = measure_adapters(
        family, adapters, held_out, training, Path(run_dir), cfg.sample.scheduler, say
    )
    record, reason = pick(measured)
    out = write_best(adapters[record["step"]], best_path(run_dir, cfg.name), record, reason)
    with atomic_path(Path(run_dir) / "measures" / "pick.json") as tmp:
        tmp.write_text(json.dumps({"measures": measured, "step": record["step"], "reason": reason}))
    say(f"picked step {record['step']}: {reason}\nsaved {out}")
    if show_in_report(run_dir, measured, {"step": record["step"], "reason": reason}):
        say(f"updated {Path(run_dir) / 'report.html'}")
    else:
        say(f"{Path(run_dir) / 'report.html'} not updated: the run left no report/data.json")
    return out
