"""Style, content and copying measured while a run trains (sample/measures.py), on a fixed set
of held-out prompts: the run's sample prompts, then training captions with their subject
swapped for one the base knows and the training set lacks.

The renders without the adapter, and the training images' features, are made once; each
measurement renders the prompts with the adapter (same seeds) and writes them as one row,
`measures/step-NNNNNN.png` (`measures/base.png` the row without it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps

from stylelora.config import Config
from stylelora.data.images import load_rgb
from stylelora.data.scan import ImageRecord
from stylelora.export.atomic import atomic_path
from stylelora.families.base import ModelFamily
from stylelora.sample.measures import Reference, measure, reference
from stylelora.sample.pick import best_path, pick, write_best
from stylelora.sample.preview import set_aside, with_and_without
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import grid, preview_pipeline

if TYPE_CHECKING:
    from stylelora.train.session import Session

MEASURES_DIR = "measures"
BASE_ROW = f"{MEASURES_DIR}/base.png"
# Subjects every base model knows (the demo base too), put in the captions' place.
SWAP_SUBJECTS = (
    "umbrella", "ghost", "rocket", "car", "hat", "bell", "tent", "cactus", "crown", "candle",
    "snowman", "chair", "egg", "bowl", "ladder", "apple",
)  # fmt: skip
# The subject of a caption: the word after its first article ("a fish, ...", "an owl in ...").
SUBJECT = re.compile(r"^\s*(?:an?|the)\s+([a-z][\w-]*)", re.IGNORECASE)
# At most this many training images are compared with (spaced evenly over the set).
MAX_TRAINING_IMAGES = 64


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def swapped_caption(caption: str, subject: str) -> str | None:
    """`caption` with its subject (each mention) replaced by `subject`; None if it names none."""
    found = SUBJECT.match(caption)
    if not found:
        return None
    text = re.sub(rf"\b{re.escape(found.group(1))}\b", subject, caption)
    return re.sub(r"^(\s*)(?:an?)\s", rf"\g<1>{article(subject)} ", text, count=1)


def held_out_prompts(
    sample_prompts: list[SamplePrompt], captions: list[str], cfg: Config
) -> list[SamplePrompt]:
    """`validation.measure_prompts` prompts: the sample prompts first, then swapped captions,
    at the training resolution with the sample settings and seeds sample.seed, +1, ..."""
    settings = cfg.validation
    steps = settings.measure_steps
    chosen = [
        replace(p, steps=steps or p.steps) for p in sample_prompts[: settings.measure_prompts]
    ]
    words = {word.lower() for caption in captions for word in re.findall(r"[\w-]+", caption)}
    subjects = [s for s in SWAP_SUBJECTS if s not in words] or list(SWAP_SUBJECTS)
    side = cfg.data.largest_resolution
    distinct = sorted(set(captions))
    wanted = settings.measure_prompts - len(chosen)
    spaced = distinct[:: max(1, len(distinct) // max(wanted, 1))]
    for index, caption in enumerate(spaced[:wanted]):
        text = swapped_caption(caption, subjects[index % len(subjects)])
        if text is None:
            continue
        chosen.append(
            SamplePrompt(
                prompt=text,
                negative_prompt=cfg.sample.negative_prompt,
                width=cfg.sample.width or side,
                height=cfg.sample.height or side,
                seed=cfg.sample.seed + index,
                guidance_scale=cfg.sample.guidance_scale,
                steps=steps or cfg.sample.num_inference_steps,
            )
        )
    return chosen


def training_images(records: list[ImageRecord], side: int) -> list[Image.Image]:
    """Up to MAX_TRAINING_IMAGES of the training images, centre-cropped square at `side`."""
    step = max(1, len(records) // MAX_TRAINING_IMAGES)
    return [
        ImageOps.fit(load_rgb(record.path), (side, side), Image.Resampling.BICUBIC)
        for record in records[::step][:MAX_TRAINING_IMAGES]
    ]


class Measurer:
    """The fixed prompt set, its renders without the adapter and what they are compared with."""

    def __init__(
        self,
        family: ModelFamily,
        prompts: list[SamplePrompt],
        training: list[Image.Image],
        output_dir: Path,
        scheduler: str = "default",
    ) -> None:
        self.family = family
        self.prompts = prompts
        self.training = training
        self.output_dir = Path(output_dir)
        self.scheduler = scheduler
        self.base: list[Image.Image] | None = None
        self.reference: Reference | None = None

    @property
    def images_due(self) -> int:
        """How many images the next `measure` renders (the base ones only the first time)."""
        return len(self.prompts) * (1 if self.base is not None else 2)

    def measure(self, step: int, rendered: Callable[[int], None] | None = None) -> dict:
        """Render the prompts with the adapter as it is now and measure them: a `measure`
        record (step, style, content, copying, base_copying, the renders' row)."""
        family, first = self.family, self.base is None
        pipe = preview_pipeline(family.pipe, self.scheduler)
        with set_aside(family):
            self.base, adapted = with_and_without(family, pipe, self.prompts, self.base, rendered)
            if self.reference is None:
                self.reference = reference(family, self.training, self.base)
            measures = measure(family, self.reference, adapted)
        if first:
            save_row(self.output_dir, self.base, BASE_ROW)
        row = save_row(self.output_dir, adapted, step_row(step))
        return {"step": step, **measures.as_dict(), "path": row}


def step_row(step: int) -> str:
    """Where a measured step's renders go, relative to the run folder."""
    return f"{MEASURES_DIR}/step-{step:06d}.png"


def save_row(output_dir: Path, images: list[Image.Image], relative: str) -> str:
    """`images` side by side as `output_dir / relative`; returns `relative`."""
    with atomic_path(Path(output_dir) / relative) as tmp:
        grid(images, columns=len(images)).save(tmp, format="PNG")
    return relative


def build_measurer(
    family: ModelFamily,
    cfg: Config,
    sample_prompts: list[SamplePrompt],
    records: list[ImageRecord],
) -> Measurer | None:
    """The run's measurer; None when `validation.measure` is off or no prompt can be made."""
    if not cfg.validation.measure or not records:
        return None
    prompts = held_out_prompts(sample_prompts, [r.caption for r in records], cfg)
    if not prompts:
        return None
    training = training_images(records, cfg.data.largest_resolution)
    return Measurer(family, prompts, training, cfg.output_dir, cfg.sample.scheduler)


def measure_due(step: int, cfg: Config) -> bool:
    """Every `validation.measure_every_n_steps`, at each checkpoint and at the last step."""
    every = (cfg.validation.measure_every_n_steps, cfg.train.checkpoint_every_n_steps)
    return step == cfg.train.max_steps or any(n > 0 and step % n == 0 for n in every)


def measurements_left(step: int, cfg: Config) -> int:
    """How many steps after `step` are `measure_due`: counted, not visited (max_steps has no
    upper bound)."""
    last = cfg.train.max_steps
    every = {n for n in (cfg.validation.measure_every_n_steps, cfg.train.checkpoint_every_n_steps)}
    every.discard(0)

    def multiples(n: int) -> int:
        return last // n - step // n

    count = sum(multiples(n) for n in every)
    if len(every) == 2:
        count -= multiples(math.lcm(*every))  # counted once for each interval
    if last > step and not any(last % n == 0 for n in every):
        count += 1  # the last step
    return count


def was_measured(measures: list[dict], step: int) -> bool:
    """Whether `measures` (the run's records) hold one of `step`."""
    return any(record["step"] == step for record in measures)


def measured_adapter(output_dir: Path, name: str, step: int) -> Path:
    """The adapter of a measured step, as the export writes it."""
    return Path(output_dir) / MEASURES_DIR / f"{name}-step-{step:06d}.safetensors"


def take_measures(session: Session) -> None:
    """Measure the adapter as it is now, once per step: the record goes to the run's state,
    TensorBoard and progress.jsonl, the adapter beside its renders."""
    state, run = session.state, session.run
    if was_measured(state.measures, state.step):
        return
    from stylelora.train.placement import visiting
    from stylelora.train.run import full_adapter_weights

    cfg, measurer = run.cfg, session.measurer
    with full_adapter_weights(run.accelerator, run.unet):
        if session.main:
            with session.side_task(f"the measures at step {state.step}"):
                with (
                    session.events.phase("measuring", measurer.images_due) as rendered,
                    visiting(run.idle, run.accelerator.device),
                ):
                    record = measurer.measure(state.step, rendered)
                path = measured_adapter(cfg.output_dir, cfg.name, state.step)
                with_ema = bool(session.ema) and cfg.train.ema_export == "instead"
                session.write_adapter_file(path, session.file_metadata(), with_ema)
                state.measures.append(record)
                values = {f"measures/{k}": record[k] for k in ("style", "content", "copying")}
                run.accelerator.log(values, step=state.step)
                session.events.write("measure", **record)
                session.say(
                    f"step {state.step}: style {record['style']:.3f}, content "
                    f"{record['content']:.3f}, copying {record['copying']:.3f}"
                )
    run.accelerator.wait_for_everyone()


def keep_best(session: Session) -> Path:
    """Pick a measured step and write its adapter as `NAME-best.safetensors`."""
    cfg, state = session.run.cfg, session.state
    record, reason = pick(state.measures)
    source = measured_adapter(cfg.output_dir, cfg.name, record["step"])
    out = write_best(source, best_path(cfg.output_dir, cfg.name), record, reason)
    state.picked = {"step": record["step"], "reason": reason}
    session.events.write("pick", step=record["step"], reason=reason, path=out.name)
    session.say(f"picked step {record['step']}: {reason}; saved {out}")
    return out
