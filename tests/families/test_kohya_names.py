"""On the real SD1.5, SD2.1 and SDXL architectures (built on the meta device, no weights), the
exported file names every adapted module as kohya sd-scripts would, and diffusers' loader turns
every key into a module of the model.

The expected names in data/kohya_names_*.txt (and kohya_locon_names_*.txt for the `full`
preset) come from data/make_kohya_names.py, which derives
them from the JSON configs by kohya's rule, independently of stylelora's naming code.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from stylelora.adapters.inject import UNET_TARGETS, inject_adapters
from stylelora.adapters.targets import UNET_PRESETS
from stylelora.config import AdapterConfig
from stylelora.export.lora_file import kohya_state_dict
from stylelora.families.sd2 import SD2
from stylelora.families.sd15 import SD15
from stylelora.families.sdxl import SDXL
from stylelora.families.skeletons import skeleton_dir

DATA = Path(__file__).parent / "data"
FAMILIES = {"sd15": SD15, "sd2": SD2, "sdxl": SDXL}
ENCODER_CLASSES = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


@pytest.fixture(params=sorted(FAMILIES))
def meta_model(request) -> tuple[str, SimpleNamespace]:
    """The skeleton's UNet, VAE and text encoders, full size, on the meta device (fresh per
    test: adapters are injected in place)."""
    name = request.param
    folder = skeleton_dir(name)
    parts = {}
    with torch.device("meta"):
        parts["unet"] = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(folder / "unet")
        )
        parts["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        for attr, cls in ENCODER_CLASSES.items():
            if (folder / attr).is_dir():
                parts[attr] = cls(CLIPTextConfig.from_pretrained(folder / attr))
    return name, SimpleNamespace(**parts)


def module_names(keys) -> set[str]:
    names = set()
    for key in keys:
        suffix = next(s for s in SUFFIXES if key.endswith(s))
        names.add(key.removesuffix(suffix))
    return names


def expected_names(name: str, unet_targets: str) -> set[str]:
    """kohya's names, narrowed to what the preset adapts: kohya's default (attn-mlp: everything
    in the transformer blocks and the text encoders' attention and MLP), plus LoCon's ResNet and
    sampler modules (full), or only the preset's attention projections and the text encoders'
    q/k/v/out_proj."""
    lines = (DATA / f"kohya_names_{name}.txt").read_text().split()
    if unet_targets == "full":
        lines += (DATA / f"kohya_locon_names_{name}.txt").read_text().split()
    if unet_targets in ("attn-mlp", "full"):
        return set(lines)
    unet = "|".join(re.escape(t.replace(".", "_")) for t in UNET_TARGETS[unet_targets])
    wanted = re.compile(rf"^lora_unet_.*_({unet})$|^lora_te\d?_.*_self_attn_(q|k|v|out)_proj$")
    return {line for line in lines if wanted.match(line)}


@pytest.mark.parametrize("unet_targets", UNET_PRESETS)
def test_exported_names_are_kohyas(meta_model, unet_targets):
    name, pipe = meta_model
    family = FAMILIES[name](pipe)
    te_targets = "attention" if unet_targets in UNET_TARGETS else "attn-mlp"
    cfg = AdapterConfig(
        rank=4,
        alpha=2,
        unet_targets=unet_targets,
        text_encoder=True,
        text_encoder_targets=te_targets,
    )
    tensors = kohya_state_dict(family, inject_adapters(family, cfg))
    expected = expected_names(name, unet_targets)
    assert module_names(tensors) == expected
    assert len(tensors) == 3 * len(expected)


def test_diffusers_converts_every_key_to_a_module(meta_model):
    """diffusers' kohya conversion (the path `load_lora_weights` takes) leaves no key behind,
    and each converted key names a module of the diffusers model."""
    name, pipe = meta_model
    lines = (DATA / f"kohya_names_{name}.txt").read_text().split()
    lines += (DATA / f"kohya_locon_names_{name}.txt").read_text().split()
    state = {}
    for line in lines:
        state[f"{line}.lora_down.weight"] = torch.zeros(1, 1)
        state[f"{line}.lora_up.weight"] = torch.zeros(1, 1)
        state[f"{line}.alpha"] = torch.tensor(1.0)
    if name == "sdxl":  # as StableDiffusionXLLoraLoaderMixin does
        state = _maybe_map_sgm_blocks_to_diffusers(state, pipe.unet.config)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(state)
    assert not state  # every key was consumed
    assert len(alphas) == len(lines)
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if name == "sdxl":
        components["text_encoder_2"] = pipe.text_encoder_2
    modules = {c: {n for n, _ in m.named_modules()} for c, m in components.items()}
    # The PEFT names diffusers' loaders go on to inject.
    unet = {k.removeprefix("unet."): v for k, v in converted.items() if k.startswith("unet.")}
    peft_keys = [f"unet.{k}" for k in convert_unet_state_dict_to_peft(unet)]
    peft_keys += convert_state_dict_to_peft({k: v for k, v in converted.items() if "text" in k})
    assert len(peft_keys) == len(converted) == 2 * len(lines)
    for key in peft_keys:
        component, _, path = key.partition(".")
        path = re.sub(r"\.lora_[AB]\.weight$", "", path)
        if path not in modules[component]:
            path = path.removeprefix("text_model.")  # transformers 5's CLIPTextModel
        assert path in modules[component], key
