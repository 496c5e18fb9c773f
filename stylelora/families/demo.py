"""The demo base models: small models that stylelora pretrained itself and ships.

`demo:sd15` is an SD1.5-layout pipeline (AutoencoderKL, CLIPTextModel with the real CLIP BPE
tokenizer, UNet2DConditionModel with cross-attention, SD1.5's scheduler) trained from scratch
by `datasets/pretrain_demo_base.py` on flat pictures of 56 subjects in 12 colours at 64 px.
`demo:flux` is its Flux.1-layout twin (`datasets/pretrain_demo_flux.py`): a FluxTransformer2DModel
and a T5 encoder trained on the same pictures by rectified flow, around the SD1.5 base's VAE and
CLIP text encoder, which the package holds once.

A folder in the package lacks the tokenizer's BPE files, which the package ships once, gzipped
(and the twin lacks the parts it shares); the complete folder is assembled once in the
stylelora cache and loaded from there through `from_pretrained`, like a user's model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from stylelora.errors import UserError
from stylelora.families.skeletons import cache_root, materialise

HERE = Path(__file__).resolve().parent
PACKAGED = {"sd15": HERE / "demo_base", "flux": HERE / "demo_flux"}
# The Flux twin's parts that are the SD1.5 base's: linked into its assembled folder.
SHARED = {"flux": ("sd15", ("vae", "text_encoder", "tokenizer"))}


def demo_model_path(name: str) -> Path:
    """The complete diffusers folder of the shipped demo base `name` (`sd15`, `flux`)."""
    if name not in PACKAGED:
        raise UserError(f"demo model {name!r}: choose one of {', '.join(PACKAGED)}")
    source = PACKAGED[name]
    if not (source / "model_index.json").is_file():
        raise UserError(f"demo:{name}: {source} is missing from this installation")
    folder = materialise(source, cache_root() / "demo" / name)
    if name in SHARED:
        base, parts = SHARED[name]
        base_folder = demo_model_path(base)
        for part in parts:
            with contextlib.suppress(FileExistsError):  # another process linked it first
                (folder / part).symlink_to(base_folder / part, target_is_directory=True)
    return folder
