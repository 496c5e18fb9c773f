"""Render images from a pipeline with fixed seeds, and lay them out in grids."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from PIL import Image

from stylelora.families.base import ModelFamily
from stylelora.sample.prompts import SamplePrompt

SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}


def preview_pipeline(pipe: DiffusionPipeline, scheduler: str = "default") -> DiffusionPipeline:
    """A pipeline sharing `pipe`'s modules (adapters included), with the chosen scheduler."""
    if scheduler == "default":
        return pipe
    sampler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    preview = type(pipe).from_pipe(pipe, scheduler=sampler)
    preview.set_progress_bar_config(disable=True)
    return preview


def render(
    pipe: DiffusionPipeline,
    prompt: SamplePrompt,
    output_type: str = "pil",
    family: ModelFamily | None = None,
    on_step: Callable[[int, int], None] | None = None,
):
    """One image for `prompt`; the seed fixes it whatever the device.

    With `family`, the prompt is encoded as that family trains (clip skip included), and the
    guidance goes to the pipeline argument the family's models take. `on_step(n, total)` is
    called after the n-th of the scheduler's `total` denoising steps.
    """
    if family is None:
        text = {"prompt": prompt.prompt, "negative_prompt": prompt.negative_prompt or None}
        guidance = {"guidance_scale": prompt.guidance_scale}
    else:
        size = (prompt.width, prompt.height)
        text = family.pipeline_text_kwargs(prompt.prompt, prompt.negative_prompt, size)
        guidance = family.pipeline_guidance_kwargs(prompt.guidance_scale)
    generator = torch.Generator().manual_seed(prompt.seed)
    callback = {}
    if on_step is not None:
        callback["callback_on_step_end"] = lambda called, index, _t, values: (
            on_step(index + 1, getattr(called, "num_timesteps", None) or prompt.steps) or values
        )
    result = pipe(
        **callback,
        **text,
        **guidance,
        width=prompt.width,
        height=prompt.height,
        num_inference_steps=prompt.steps,
        generator=generator,
        output_type=output_type,
    )
    return result.images[0]


def render_all(
    pipe: DiffusionPipeline,
    prompts: list[SamplePrompt],
    family: ModelFamily | None = None,
    rendered: Callable[[int], None] | None = None,
) -> list[Image.Image]:
    """Each prompt's image; `rendered(1)` after each."""
    was_training = {
        name: module.training
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }
    for name in was_training:
        pipe.components[name].eval()
    try:
        images = []
        for prompt in prompts:
            images.append(render(pipe, prompt, family=family))
            if rendered:
                rendered(1)
        return images
    finally:
        for name, training in was_training.items():
            pipe.components[name].train(training)


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Images left to right, top to bottom, each cell the size of the largest image."""
    columns = columns or min(len(images), 4)
    rows = math.ceil(len(images) / columns)
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * cell_w, (i // columns) * cell_h))
    return sheet
