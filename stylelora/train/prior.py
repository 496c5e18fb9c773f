"""Prior preservation without class images: ai-toolkit's differential output preservation.

Each caption with the trigger word replaced by `train.prior_preservation_class` is a class
prompt. On the step's own noisy latents the frozen model (every adapter off) predicts for the
class prompt, and the adapted model is trained to predict the same: the adapter learns what
the trigger word means while the class prompt keeps drawing what the base model draws. This
loss is added to the step's, times `train.prior_preservation_weight`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from stylelora.adapters.inject import adapters_disabled
from stylelora.config import TrainConfig
from stylelora.data.captions import word_pattern
from stylelora.families.objective import NoisedBatch
from stylelora.train.profile import phase

if TYPE_CHECKING:
    from stylelora.train.run import TrainingRun


def class_caption(caption: str, trigger: str, replacement: str) -> str:
    """`caption` with the whole word `trigger` replaced (an empty replacement drops it, and
    the comma that went with it)."""
    text = word_pattern(trigger).sub(replacement, caption)
    tags = [tag.strip() for tag in text.split(",")]
    return ", ".join(tag for tag in tags if tag)


def class_captions(captions: list[str], trigger: str, train: TrainConfig) -> list[str]:
    return [class_caption(c, trigger, train.prior_preservation_class) for c in captions]


def preservation_loss(run: TrainingRun, noised: NoisedBatch, batch: dict[str, Any]) -> torch.Tensor:
    """The adapted model's prediction for the class prompts against the frozen model's, on the
    same noisy latents and timesteps (mean squared error, times the weight)."""
    cfg, family = run.cfg, run.family
    prompts = class_captions(batch["captions"], cfg.data.trigger_word, cfg.train)
    noisy = run.objective.noisy(noised)
    with torch.no_grad(), adapters_disabled(list(run.adapted.values())), phase("prior"):
        base_text = encode(run, prompts)
        target = family.denoise(run.unet, noisy, noised.timesteps, base_text, batch)
    text = encode(run, prompts) if cfg.adapter.text_encoder else base_text
    with phase("prior"):
        prediction = family.denoise(run.unet, noisy, noised.timesteps, text, batch)
    loss = F.mse_loss(prediction.float(), target.float())
    return cfg.train.prior_preservation_weight * loss


def encode(run: TrainingRun, prompts: list[str]) -> dict[str, torch.Tensor]:
    if run.text_cache is not None:
        return run.text_cache.encode(prompts)
    return run.family.encode_prompts(prompts)
