"""Preview grids while training: each prompt's image without the adapter beside it with it.

The images without the adapter are the same at every preview (same frozen model, same seeds),
so they are rendered once and reused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from PIL import Image

from stylelora.adapters.inject import adapters_disabled
from stylelora.families.base import ModelFamily
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import grid, preview_pipeline, render_all


@contextlib.contextmanager
def latents_in_model_dtype(family: ModelFamily) -> Iterator[None]:
    """Inside the block the UNet and the VAE take latents in their own dtype.

    Under mixed precision accelerate's wrapper returns the UNet's output in fp32, so from the
    second denoising step on the pipelines hand fp32 latents to a bf16 or fp16 UNet, and at the
    end to the VAE (diffusers casts them only on Apple's MPS). Autocast around the whole
    pipeline would instead run an fp32 VAE (SDXL's under fp16) in fp16, where it overflows.
    """
    unet, vae, name = family.unet, family.vae, family.denoiser_input
    decoder = (
        vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder
    )

    def cast(latents):  # a tensor, or a list of them (Z-Image's transformer takes a list)
        if isinstance(latents, (list, tuple)):
            return [cast(item) for item in latents]
        return latents.to(unet.dtype)

    def unet_sample(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (cast(args[0]), *args[1:]), kwargs
        return args, {**kwargs, name: cast(kwargs[name])}

    def vae_latents(module: torch.nn.Module, args: tuple) -> tuple:
        return (args[0].to(vae.dtype), *args[1:])

    handles = [
        unet.register_forward_pre_hook(unet_sample, with_kwargs=True),
        decoder.register_forward_pre_hook(vae_latents),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Previewer:
    def __init__(self, family: ModelFamily, prompts: list[SamplePrompt], scheduler: str):
        self.family = family
        self.prompts = prompts
        self.scheduler = scheduler
        self.base: list[Image.Image] | None = None

    @property
    def images_due(self) -> int:
        """How many images the next `render` draws (the left column only the first time)."""
        return len(self.prompts) * (1 if self.base is not None else 2)

    def render(self, rendered: Callable[[int], None] | None = None) -> Image.Image:
        """One row per prompt: without the adapter on the left, with it on the right;
        `rendered(1)` after each image.

        Rendering draws from its own seeded generators; the training RNG states are set aside
        so a run with previews trains exactly as one without.
        """
        pipe = preview_pipeline(self.family.pipe, self.scheduler)
        with set_aside(self.family):
            self.base, tuned = with_and_without(
                self.family, pipe, self.prompts, self.base, rendered
            )
        pairs = [image for row in zip(self.base, tuned, strict=True) for image in row]
        return grid(pairs, columns=2)


@contextlib.contextmanager
def set_aside(family: ModelFamily) -> Iterator[None]:
    """Render (or encode) between training steps without changing them: the RNG states are
    restored after, and latents are made in the model's dtype."""
    devices = [family.unet.device] if family.unet.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), latents_in_model_dtype(family):
        yield


def with_and_without(
    family: ModelFamily,
    pipe,
    prompts: list[SamplePrompt],
    base: list[Image.Image] | None,
    rendered: Callable[[int], None] | None = None,
) -> tuple[list[Image.Image], list[Image.Image]]:
    """(`prompts` rendered without the adapter: `base` where it is already made; with it)."""
    if base is None:
        with adapters_disabled([family.unet, *family.text_encoders().values()]):
            base = render_all(pipe, prompts, family, rendered)
    return base, render_all(pipe, prompts, family, rendered)
