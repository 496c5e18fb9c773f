"""Flux.1 from the files users hold: BFL's transformer file (bf16, fp8, ComfyUI's scaled fp8 and
whole-model prefix), the VAE, CLIP-L and T5 from their own files, and `merge` writing BFL's
layout back; the tiny model's files stand in for the real ones, the real architecture's layout
is checked on the meta device against diffusers' own converter."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from stylelora.adapters.inject import inject_adapters
from stylelora.config import AdapterConfig
from stylelora.errors import UserError
from stylelora.export.lora_file import save_lora_file
from stylelora.export.tools import run_merge
from stylelora.families import load_family
from stylelora.families.flux.bfl import from_bfl, to_bfl
from stylelora.families.ldm import clip_state, vae_state
from stylelora.families.skeletons import skeleton_dir
from stylelora.families.tiny import tiny_model_path
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import render

PROMPT = SamplePrompt("a red fish", width=64, height=64, seed=3, steps=3, guidance_scale=3.5)


def rendered(family) -> np.ndarray:
    return render(family.pipe, PROMPT, output_type="np")


def save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def tiny() -> dict:
    family = load_family("tiny:flux")
    return {"family": family, "image": rendered(family), "folder": tiny_model_path("flux")}


@pytest.fixture
def configs_only(tmp_path: Path, tiny) -> Path:
    """The tiny model's folder without its weights: what `single_file_config` holds."""
    folder = tmp_path / "configs"
    shutil.copytree(tiny["folder"], folder)
    for weights in folder.glob("*/*.safetensors"):
        weights.unlink()
    return folder


def test_bfl_layout_is_the_one_diffusers_converter_reads_on_the_real_model():
    with torch.device("meta"):
        config = FluxTransformer2DModel.load_config(skeleton_dir("flux") / "transformer")
        state = FluxTransformer2DModel.from_config(config).state_dict()
    bfl = to_bfl(state)
    # flux1-dev.safetensors holds 780 tensors: 19 double blocks, 38 single blocks
    assert len(bfl) == 780
    assert bfl["double_blocks.18.img_attn.qkv.weight"].shape == (3 * 3072, 3072)
    assert bfl["single_blocks.37.linear1.weight"].shape == (3 * 3072 + 12288, 3072)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in state.items()}
    ours, wrong = from_bfl(bfl, {k: v.shape for k, v in state.items()})
    assert not wrong and set(ours) == set(state)


def test_bfl_file_loads_back_and_renders_its_folders_image(tmp_path, tiny):
    family = tiny["family"]
    path = save(family.single_file_state(), tmp_path / "flux.safetensors")
    assert "double_blocks.0.img_attn.qkv.weight" in load_file(path)

    loaded = load_family(str(path), config=str(tiny["folder"]))
    assert loaded.name == "flux" and loaded.unet.config.guidance_embeds
    assert np.abs(rendered(loaded) - tiny["image"]).max() < 1e-5

    # ComfyUI's whole-model files put the transformer under model.diffusion_model.
    comfy = {f"model.diffusion_model.{k}": v for k, v in family.single_file_state().items()}
    comfy["vae.encoder.conv_in.weight"] = family.vae.encoder.conv_in.weight
    loaded = load_family(
        str(save(comfy, tmp_path / "comfy.safetensors")), config=str(tiny["folder"])
    )
    assert np.abs(rendered(loaded) - tiny["image"]).max() < 1e-5


def test_vae_clip_and_t5_load_from_their_own_files(tmp_path, tiny, configs_only):
    """ae.safetensors in BFL's (ldm) layout, clip_l with transformers' `text_model.` names, T5
    without its tied embedding copy, as ComfyUI's files are; configs only in the folder."""
    family = tiny["family"]
    transformer = save(family.single_file_state(), tmp_path / "flux.safetensors")
    t5 = family.pipe.text_encoder_2.state_dict()
    parts = {
        "ae": save(vae_state(family.vae), tmp_path / "ae.safetensors"),
        "clip_l": save(clip_state(family.pipe.text_encoder), tmp_path / "clip_l.safetensors"),
        "t5xxl": save(
            {k: v for k, v in t5.items() if k != "encoder.embed_tokens.weight"},
            tmp_path / "t5xxl.safetensors",
        ),
    }
    assert "text_model.final_layer_norm.weight" in load_file(parts["clip_l"])
    loaded = load_family(str(transformer), config=str(configs_only), parts=parts)
    assert np.abs(rendered(loaded) - tiny["image"]).max() < 1e-5

    # a diffusers folder stands for a file, too
    folders = {"ae": tiny["folder"] / "vae", "clip_l": tiny["folder"], "t5xxl": tiny["folder"]}
    loaded = load_family(str(transformer), config=str(configs_only), parts=folders)
    assert np.abs(rendered(loaded) - tiny["image"]).max() < 1e-5

    with pytest.raises(UserError, match="holds Flux.1's transformer only; set ae to your ae"):
        load_family(str(transformer), config=str(configs_only))
    with pytest.raises(
        UserError, match=r"clip_l = .*t5xxl.safetensors: could not load it \(not a CLIPTextModel"
    ):
        load_family(
            str(transformer),
            config=str(configs_only),
            parts={**parts, "clip_l": parts["t5xxl"]},
        )


def test_fp8_and_scaled_fp8_files_load_in_the_asked_dtype(tmp_path, tiny):
    state = tiny["family"].single_file_state()
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}
    key = "double_blocks.0.img_attn.qkv.weight"
    loaded = load_family(str(save(fp8, tmp_path / "fp8.safetensors")), config=str(tiny["folder"]))
    q = loaded.unet.transformer_blocks[0].attn.to_q.weight
    assert q.dtype == torch.float32
    assert torch.equal(q, fp8[key][: q.shape[0]].to(torch.float32))

    # ComfyUI's scaled fp8: each weight divided by its scale_weight, stored in fp8
    scales = {k: v.abs().max() / 448 for k, v in state.items() if k.endswith(".weight")}
    scaled = {
        k: (v / scales[k] if k in scales else v).to(torch.float8_e4m3fn) for k, v in state.items()
    }
    scaled |= {k.removesuffix(".weight") + ".scale_weight": s for k, s in scales.items()}
    scaled["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    loaded = load_family(
        str(save(scaled, tmp_path / "scaled.safetensors")), config=str(tiny["folder"])
    )
    q = loaded.unet.transformer_blocks[0].attn.to_q.weight
    expected = scaled[key][: q.shape[0]].to(torch.float32) * scales[key]
    assert torch.equal(q, expected)
    assert torch.allclose(q, state[key][: q.shape[0]], rtol=0.07, atol=1e-3)


def test_merge_writes_a_bfl_file_that_renders_the_adapted_image(tmp_path, tiny):
    family = load_family("tiny:flux")
    adapted = inject_adapters(family, AdapterConfig(rank=4, alpha=2.0, unet_targets="attn-mlp"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in adapted.values():
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator))
    ours = rendered(family)
    adapter = save_lora_file(tmp_path / "a.safetensors", family, adapted, {"ss_output_name": "a"})

    out = tmp_path / "merged.safetensors"
    run_merge(str(tiny["folder"]), [f"{adapter}:1.0"], out, "fp32")
    assert any(k.startswith("single_blocks.0.linear1") for k in load_file(out))
    merged = load_family(str(out), config=str(tiny["folder"]))
    assert np.abs(ours - tiny["image"]).max() > 1e-2
    assert np.abs(rendered(merged) - ours).max() < 1e-4


def test_a_broken_or_foreign_transformer_file_gets_one_line(tmp_path, tiny):
    state = tiny["family"].single_file_state()
    del state["single_blocks.0.linear2.weight"]
    path = save(state, tmp_path / "partial.safetensors")
    with pytest.raises(UserError, match=r"partial.safetensors: not a complete Flux.1 transformer"):
        load_family(str(path), config=str(tiny["folder"]))
    # the real Flux.1's configs do not fit the tiny model's head width
    whole = save(tiny["family"].single_file_state(), tmp_path / "flux.safetensors")
    with pytest.raises(UserError, match="set single_file_config to a diffusers folder"):
        load_family(str(whole), parts={"ae": tmp_path})
    with pytest.raises(
        UserError,
        match="ae: names a file of a Flux.1 model kept apart .*; tiny:flux is not a single file",
    ):
        load_family("tiny:flux", parts={"ae": whole})


def test_the_bundled_flux_configs_have_the_real_sizes():
    folder = skeleton_dir("flux")
    with torch.device("meta"):
        parts = {
            "transformer": FluxTransformer2DModel.from_config(
                FluxTransformer2DModel.load_config(folder / "transformer")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "clip": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            "t5": T5EncoderModel(T5Config.from_pretrained(folder / "text_encoder_2")),
        }
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    # Flux.1 dev 11.9 B, its 16-channel VAE, CLIP-L, T5-XXL's encoder (4.7 B)
    assert counts == {
        "transformer": 11_901_408_320,
        "vae": 83_819_683,
        "clip": 123_060_480,
        "t5": 4_762_310_656,
    }
    assert parts["vae"].config.scaling_factor == 0.3611
    assert parts["vae"].config.shift_factor == 0.1159
