"""Helpers shared by the adapter-tool tests: tiny pipelines, adapters with non-zero weights."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline

from stylelora.adapters.inject import inject_adapters
from stylelora.config import AdapterConfig
from stylelora.families import load_family
from stylelora.families.tiny import tiny_model_path
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import render

PROMPT = SamplePrompt("zqxstyle, a fish", width=64, height=64, seed=3, steps=3, guidance_scale=5.0)


def rendered(pipe) -> np.ndarray:
    return render(pipe, PROMPT, output_type="np")


def fresh_pipe(tiny: str) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(tiny_model_path(tiny))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randomise(modules, seed: int = 0, scale: float = 0.5) -> None:
    """Trained adapters have non-zero up weights (and DoRA magnitudes that moved)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, param in module.named_parameters():
                noise = torch.randn(param.shape, generator=generator)
                if "lora_B" in name:
                    param.copy_(noise * scale)
                elif "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.2 * noise)


def adapted_family(tiny: str, seed: int = 0, **options):
    """A tiny family with adapters injected as `options` say, their weights randomised."""
    family = load_family(str(tiny_model_path(tiny)))
    torch.manual_seed(seed)  # PEFT draws the down weights from the global RNG
    adapted = inject_adapters(family, AdapterConfig(**options))
    randomise(adapted.values(), seed)
    return family, adapted


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())
