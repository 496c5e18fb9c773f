"""The demo models: small models that stylelora pretrained itself and ships, each in its
family's folder (`families/<name>/demo/`, loaded as `demo:<name>`).

`demo:sd15` is an SD1.5-layout pipeline (AutoencoderKL, CLIPTextModel with the real CLIP BPE
tokenizer, UNet2DConditionModel with cross-attention, SD1.5's scheduler) trained from scratch
by `datasets/pretrain_demo_base.py` on flat pictures of 56 subjects in 12 colours at 64 px.
`demo:flux` is its Flux.1-layout twin (`datasets/pretrain_demo_flux.py`): a FluxTransformer2DModel
and a T5 encoder trained on the same pictures by rectified flow, around the SD1.5 base's VAE and
CLIP text encoder, which the package holds once (the family's `demo_shares`).

A folder in the package lacks the tokenizer's BPE files, which the package ships once, gzipped
(and a twin lacks the parts it shares); the complete folder is assembled once in the
stylelora cache and loaded from there through `from_pretrained`, like a user's model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from stylelora.errors import UserError
from stylelora.families.skeletons import cache_root, materialise


def packaged_demo(name: str) -> Path:
    """The folder the package holds for the demo model of the family `name` (incomplete)."""
    from stylelora.families.registry import family_named

    family = family_named(name)
    if family is None or not (family.folder() / "demo").is_dir():
        from stylelora.families.registry import FAMILIES

        shipped = [f.name for f in FAMILIES if (f.folder() / "demo").is_dir()]
        raise UserError(f"demo model {name!r}: choose one of {', '.join(shipped)}")
    return family.folder() / "demo"


def demo_model_path(name: str) -> Path:
    """The complete diffusers folder of the shipped demo model of the family `name`."""
    from stylelora.families.registry import family_named

    source = packaged_demo(name)
    family = family_named(name)
    if not (source / "model_index.json").is_file():
        raise UserError(f"demo:{name}: {source} is missing from this installation")
    folder = materialise(source, cache_root() / "demo" / name)
    if family.demo_shares:
        base, parts = family.demo_shares
        base_folder = demo_model_path(base)
        for part in parts:
            with contextlib.suppress(FileExistsError):  # another process linked it first
                (folder / part).symlink_to(base_folder / part, target_is_directory=True)
    return folder
