"""The demo base models: small SD-layout models that stylelora pretrained itself and ships.

`demo:sd15` is an SD1.5-layout pipeline (AutoencoderKL, CLIPTextModel with the real CLIP BPE
tokenizer, UNet2DConditionModel with cross-attention, SD1.5's scheduler) trained from scratch
by `datasets/pretrain_demo_base.py` on flat pictures of 56 subjects in 12 colours at 64 px.
Its folder in the package lacks only the tokenizer's BPE files, which the package ships once,
gzipped; the complete folder is assembled once in the stylelora cache and loaded from there
through `from_pretrained`, like a user's model.
"""

from __future__ import annotations

from pathlib import Path

from stylelora.errors import UserError
from stylelora.families.skeletons import cache_root, materialise

PACKAGED = {"sd15": Path(__file__).resolve().parent / "demo_base"}


def demo_model_path(name: str) -> Path:
    """The complete diffusers folder of the shipped demo base `name` (`sd15`)."""
    if name not in PACKAGED:
        raise UserError(f"demo model {name!r}: choose one of {', '.join(PACKAGED)}")
    source = PACKAGED[name]
    if not (source / "model_index.json").is_file():
        raise UserError(f"demo:{name}: {source} is missing from this installation")
    return materialise(source, cache_root() / "demo" / name)
