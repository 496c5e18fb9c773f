"""An exported adapter, loaded by diffusers' own `load_lora_weights`, renders our image."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open

from stylelora.adapters.inject import inject_adapters
from stylelora.config import AdapterConfig
from stylelora.export.lora_file import save_lora_file
from stylelora.families import load_family
from stylelora.families.tiny import tiny_model_path
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import render

PROMPT = SamplePrompt("zqxstyle, a fish", width=64, height=64, seed=3, steps=4, guidance_scale=5.0)


def randomise_up_weights(modules, seed=0):
    """Trained adapters have non-zero up weights; a fresh one would change nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def rendered(pipe):
    return render(pipe, PROMPT, output_type="np")


# tiny family -> the text-encoder prefixes its files carry
TE_PREFIXES = {"sd15": {"lora_te"}, "sd2": {"lora_te"}, "sdxl": {"lora_te1", "lora_te2"}}
CASES = [("sd15", False), ("sd15", True), ("sd2", True), ("sdxl", False), ("sdxl", True)]


@pytest.mark.parametrize(
    ("tiny", "text_encoder"), CASES, ids=[f"{f}-{'te' if t else 'unet'}" for f, t in CASES]
)
def test_exported_file_renders_the_same_image_in_diffusers(tmp_path, tiny, text_encoder):
    tiny_dir = tiny_model_path(tiny)
    family = load_family(str(tiny_dir))
    cfg = AdapterConfig(rank=4, alpha=1.5, text_encoder=text_encoder, text_encoder_alpha=6.0)
    adapted = inject_adapters(family, cfg)
    randomise_up_weights(adapted.values())
    ours = rendered(family.pipe)
    path = save_lora_file(tmp_path / "a.safetensors", family, adapted, {"ss_output_name": "a"})

    fresh = DiffusionPipeline.from_pretrained(tiny_dir)
    fresh.set_progress_bar_config(disable=True)
    base = rendered(fresh)
    fresh.load_lora_weights(str(path))
    theirs = rendered(fresh)

    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(ours - base).max() > 1e-2

    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
        alphas = {k: handle.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    te_keys = {k for k in keys if not k.startswith("lora_unet_")}
    assert {k.split("_text_model_")[0] for k in te_keys} == (
        TE_PREFIXES[tiny] if text_encoder else set()
    )
    assert all("_text_model_encoder_layers_" in k for k in te_keys)
    assert {v for k, v in alphas.items() if k.startswith("lora_unet_")} == {1.5}
    if text_encoder:
        assert {v for k, v in alphas.items() if k.startswith("lora_te")} == {6.0}


@pytest.mark.parametrize(
    ("tiny", "prefix"), [("sd15", "lora_te"), ("sdxl", "lora_te1"), ("sdxl", "lora_te2")]
)
def test_text_encoder_adapter_changes_the_image_on_its_own(tmp_path, tiny, prefix):
    """The text-encoder half of a file is applied by diffusers too, not silently dropped."""
    tiny_dir = tiny_model_path(tiny)
    family = load_family(str(tiny_dir))
    adapted = inject_adapters(family, AdapterConfig(rank=4, alpha=4, text_encoder=True))
    randomise_up_weights([adapted[prefix]])
    ours = rendered(family.pipe)
    path = save_lora_file(tmp_path / "te.safetensors", family, adapted, {})

    fresh = DiffusionPipeline.from_pretrained(tiny_dir)
    fresh.set_progress_bar_config(disable=True)
    base = rendered(fresh)
    fresh.load_lora_weights(str(path))
    assert np.abs(rendered(fresh) - ours).max() < 1e-4
    assert np.abs(ours - base).max() > 1e-2
