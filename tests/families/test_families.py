"""SD1.x, SD2.x-v and SDXL families on their tiny models: detection, conditioning, training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import training_config
from safetensors import safe_open

from stylelora.adapters.inject import inject_adapters
from stylelora.config import AdapterConfig
from stylelora.errors import UserError
from stylelora.families import load_family
from stylelora.families.ldm import original_unet_path
from stylelora.families.skeletons import skeleton_dir
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import render
from stylelora.train.trainer import train

EXPECTED = {
    # tiny: (family, prediction type, ss_base_model_version, ss_v2, modelspec architecture)
    "sd15": ("sd15", "epsilon", "sd_v1", "False", "stable-diffusion-v1"),
    "sd2": ("sd2", "v_prediction", "sd_v2_v", "True", "stable-diffusion-v2-768-v"),
    "sdxl": ("sdxl", "epsilon", "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base"),
}
PROMPT = SamplePrompt("a fish", width=64, height=64, seed=3, steps=2, guidance_scale=5.0)


@pytest.mark.parametrize("tiny", sorted(EXPECTED))
def test_family_is_detected_with_its_metadata(tiny):
    family = load_family(f"tiny:{tiny}")
    name, prediction, version, v2, arch = EXPECTED[tiny]
    assert (family.name, family.prediction_type) == (name, prediction)
    assert family.metadata() == {
        "ss_base_model_version": version,
        "ss_v2": v2,
        "ss_clip_skip": "None",
        "ss_zero_terminal_snr": "False",
    }
    assert family.modelspec_architecture == arch
    assert version in family.base_versions


def test_prediction_type_override_changes_the_sd2_version():
    family = load_family("tiny:sd2", settings={"prediction_type": "epsilon"})
    assert family.prediction_type == "epsilon"
    assert family.base_version == "sd_v2"
    assert family.modelspec_architecture == "stable-diffusion-v2-512"


def test_zero_terminal_snr_rescales_training_and_preview_schedules():
    family = load_family("tiny:sd2", settings={"train.zero_terminal_snr": True})
    training = family.training_objective().scheduler
    assert training.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-6)
    assert family.pipe.scheduler.config.timestep_spacing == "trailing"
    assert family.pipe.scheduler.config.rescale_betas_zero_snr is True
    assert np.isfinite(render(family.pipe, PROMPT, output_type="np")).all()


def test_zero_terminal_snr_needs_v_prediction():
    with pytest.raises(UserError, match="zero_terminal_snr needs a v-prediction model"):
        load_family("tiny:sd15", settings={"train.zero_terminal_snr": True})


def test_sdxl_time_ids_are_built_per_image():
    family = load_family("tiny:sdxl")
    batch = {
        "captions": ["a", "b"],
        "original_sizes": [(100, 80), (640, 480)],
        "crop_top_lefts": [(0, 4), (12, 0)],
        "target_sizes": [(64, 48), (64, 48)],
    }
    text = family.encode_prompts(batch["captions"])
    inputs = family.unet_inputs(text, batch)
    time_ids = inputs["added_cond_kwargs"]["time_ids"]
    assert time_ids.tolist() == [[100, 80, 0, 4, 64, 48], [640, 480, 12, 0, 64, 48]]
    assert inputs["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    assert inputs["encoder_hidden_states"].shape[-1] == family.unet.config.cross_attention_dim


def real_sdxl_unet_config() -> dict:
    return json.loads((skeleton_dir("sdxl") / "unet" / "config.json").read_text())


@pytest.mark.parametrize(
    ("path", "sgm"),
    [
        ("down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in"),
        (
            "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
            "input_blocks.8.1.transformer_blocks.9.attn2.to_k",
        ),
        ("up_blocks.0.attentions.2.proj_out", "output_blocks.2.1.proj_out"),
        (
            "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q",
            "output_blocks.4.1.transformer_blocks.0.attn1.to_q",
        ),
        (
            "mid_block.attentions.0.transformer_blocks.3.ff.net.2",
            "middle_block.1.transformer_blocks.3.ff.net.2",
        ),
        # Outside the transformer blocks (LoCon), as the keys of the released SDXL checkpoint.
        ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
        ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("up_blocks.2.resnets.2.conv2", "output_blocks.8.0.out_layers.3"),
        ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("conv_in", "input_blocks.0.0"),
    ],
)
def test_sgm_names_of_the_real_sdxl(path, sgm):
    """layers_per_block = 2: input_blocks.{3i+j+1}, output_blocks.{3i+j}, middle_block.{0,1,2}."""
    assert original_unet_path(path, real_sdxl_unet_config()) == sgm


def test_a_path_outside_the_unet_layout_has_no_sgm_name():
    with pytest.raises(ValueError, match="no original"):
        original_unet_path("down_blocks.9.resnets.0.conv1", real_sdxl_unet_config())


@pytest.mark.parametrize("tiny", ["sd2", "sdxl"])
def test_openclip_layers_get_q_k_v_and_out_together(tiny):
    """AUTOMATIC1111 skips an OpenCLIP attention layer unless all four projections are there."""
    family = load_family(f"tiny:{tiny}")
    adapted = inject_adapters(family, AdapterConfig(rank=2, text_encoder=True))
    for prefix, encoder in adapted.items():
        if prefix == "lora_unet":
            continue
        layers: dict[str, set[str]] = {}
        for name, module in encoder.named_modules():
            if hasattr(module, "lora_A") and ".self_attn." in name:
                layer, _, proj = name.rpartition(".")
                layers.setdefault(layer, set()).add(proj)
        assert len(layers) == encoder.config.num_hidden_layers, prefix
        assert all(p == {"q_proj", "k_proj", "v_proj", "out_proj"} for p in layers.values())


def test_sdxl_vae_stays_fp32_under_fp16_and_previews_render():
    family = load_family("tiny:sdxl", dtype=torch.float16)
    family.cast_vae(torch.float16)
    assert family.vae.dtype == torch.float32 and family.unet.dtype == torch.float16
    latents = family.encode_images(torch.zeros(1, 3, 64, 64), torch.Generator().manual_seed(0))
    assert latents.dtype == torch.float32
    assert np.isfinite(render(family.pipe, PROMPT, output_type="np")).all()


@pytest.mark.parametrize("tiny", ["sd2", "sdxl"])
def test_family_trains_previews_and_exports(tiny, demo_subset, tmp_path):
    cfg = training_config(
        tmp_path,
        f"tiny:{tiny}",
        demo_subset(4),
        "train.max_steps=2",
        "train.batch_size=2",
        "adapter.text_encoder=true",
        "clip_skip=2",
        "sample.every_n_steps=2",
        "sample.num_inference_steps=2",
    )
    cfg.sample.prompts = ["zqxstyle, a fish"]
    result = train(cfg)
    assert result.steps == 2 and all(math.isfinite(loss) for loss in result.losses)
    assert [p.name for p in result.previews] == ["demo-style_000002.png"]
    with safe_open(str(result.adapter_path), "pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
    _, _, version, v2, arch = EXPECTED[tiny]
    assert metadata["ss_base_model_version"] == version and metadata["ss_v2"] == v2
    assert metadata["modelspec.architecture"] == f"{arch}/lora"
    assert metadata["ss_clip_skip"] == "2"
    assert any(k.startswith("lora_unet_") for k in keys)


@pytest.mark.parametrize("tiny", ["sd15", "sd2"])
def test_clip_skip_takes_an_earlier_layer_through_the_final_norm(tiny):
    family = load_family(f"tiny:{tiny}")
    captions = ["a fish", "a house"]
    with torch.no_grad():
        last = family.encode_prompts(captions)["encoder_hidden_states"]
        family.clip_skip = 0  # the last layer by the same route: must equal the pipeline's
        assert torch.allclose(family.skipped_embeds(captions), last, atol=1e-6)
        family.clip_skip = 1
        penultimate = family.encode_prompts(captions)["encoder_hidden_states"]
    assert penultimate.shape == last.shape
    assert not torch.allclose(penultimate, last, atol=1e-3)
