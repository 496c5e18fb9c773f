"""Flux.1 on a tiny pipeline built here (its T5 tokenizer too): the family's conditioning and
objective, a training run, and kohya's fused BFL layout read back by diffusers' own loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from stylelora.adapters.inject import inject_adapters
from stylelora.config import AdapterConfig
from stylelora.errors import UserError
from stylelora.export.lora_file import save_lora_file
from stylelora.export.tools import run_export
from stylelora.families import load_family
from stylelora.families.objective import FlowMatchObjective, NoisedBatch
from stylelora.families.tiny import tiny_model_path
from stylelora.sample.adapter import apply_adapter
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import render

PROMPT = SamplePrompt("zqxstyle, a fish", width=64, height=64, seed=3, steps=3, guidance_scale=3.5)


def rendered(pipe) -> np.ndarray:
    return render(pipe, PROMPT, output_type="np")


def randomise_up_weights(modules, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator))


def test_flux_is_told_apart_and_trains_on_rectified_flow():
    family = load_family("tiny:flux")
    assert family.name == "flux" and family.modelspec_architecture == "flux-1-dev"
    assert isinstance(family.training_objective(), FlowMatchObjective)
    with pytest.raises(UserError, match="Flux's attention is joint"):
        family.denoiser_targets(AdapterConfig(unet_targets="cross-attn"))


def test_denoise_is_what_flux_pipeline_asks_of_its_transformer():
    """Our packed call gives the same prediction as FluxPipeline's own latents, ids and call."""
    family = load_family("tiny:flux")
    pipe = family.pipe
    text = family.encode_prompts(["a cat"])
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7])
    ours = family.denoise(family.unet, latents, sigma, text, {})

    packed = FluxPipeline._pack_latents(latents, 1, 16, 8, 8)
    ids = FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
    embeds, pooled, text_ids = pipe.encode_prompt("a cat", prompt_2=None, max_sequence_length=512)
    theirs = pipe.transformer(
        hidden_states=packed,
        timestep=sigma,
        guidance=torch.tensor([1.0]),
        pooled_projections=pooled,
        encoder_hidden_states=embeds,
        txt_ids=text_ids,
        img_ids=ids,
        return_dict=False,
    )[0]
    assert torch.equal(ours, FluxPipeline._unpack_latents(theirs, 16, 16, 2))


def test_training_moves_the_prediction_toward_the_flow_target():
    """A few steps on one noised batch lower the loss against noise - latents."""
    family = load_family("tiny:flux")
    adapted = inject_adapters(family, AdapterConfig(rank=4, alpha=4, unet_targets="attn-mlp"))
    params = [p for m in adapted.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    objective = family.training_objective()
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    noise, sigmas = objective.draw(latents.shape, torch.Generator().manual_seed(2), None)
    noised = NoisedBatch(latents, noise, sigmas)
    with torch.no_grad():
        text = family.encode_prompts(["a cat", "a dog"])
    losses = []
    for _ in range(40):
        prediction = family.denoise(family.unet, objective.noisy(noised), sigmas, text, {})
        loss = torch.nn.functional.mse_loss(prediction, objective.target(noised))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# BFL's Flux modules, as its model code lays them out (flux/modules/layers.py), each with the
# diffusers modules whose outputs its output stacks: DoubleStreamBlock's qkv Linears are split
# "B L (K H D)" with K = q, k, v; SingleStreamBlock's linear1 into 3 x hidden (q, k, v) and the
# MLP's hidden width. Written from BFL's layout, not from the family's table.
BFL_DOUBLE = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn_proj": ["attn.to_out.0"],
    "txt_attn_proj": ["attn.to_add_out"],
    "img_mlp_0": ["ff.net.0.proj"],
    "img_mlp_2": ["ff.net.2"],
    "txt_mlp_0": ["ff_context.net.0.proj"],
    "txt_mlp_2": ["ff_context.net.2"],
    "img_mod_lin": ["norm1.linear"],
    "txt_mod_lin": ["norm1_context.linear"],
}
BFL_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation_lin": ["norm.linear"],
}


def diffusers_members(kohya_module: str) -> list[str]:
    kind, rest = kohya_module.removeprefix("lora_unet_").split("_blocks_", 1)
    index, module = rest.split("_", 1)
    table, block = (
        (BFL_DOUBLE, "transformer_blocks")
        if kind == "double"
        else (BFL_SINGLE, "single_transformer_blocks")
    )
    return [f"{block}.{index}.{inner}" for inner in table[module]]


def apply_as_comfyui(transformer: torch.nn.Module, path) -> None:
    """ComfyUI's (and Forge's) formula on BFL's fused weights: W += alpha / rank * up @ down,
    the fused W stacked from diffusers' modules and split back into them."""
    tensors = load_file(path)
    for key in [k for k in tensors if k.endswith(".lora_down.weight")]:
        name = key.removesuffix(".lora_down.weight")
        down, up = tensors[key], tensors[f"{name}.lora_up.weight"]
        scale = tensors[f"{name}.alpha"].item() / down.shape[0]
        members = [transformer.get_submodule(p) for p in diffusers_members(name)]
        fused = torch.cat([m.weight.data for m in members]) + scale * up @ down
        for member, part in zip(
            members, fused.split([m.out_features for m in members]), strict=True
        ):
            member.weight.data.copy_(part)


@pytest.mark.parametrize("targets", ["attention", "attn-mlp", "full"])
def test_kohya_flux_file_renders_our_image_by_comfyuis_formula_and_in_diffusers(tmp_path, targets):
    """diffusers reads kohya Flux files only at the real model's widths (its converter splits
    linear1 as 3 x 3072 + 12288), so the tiny model's file is applied by the UIs' formula; its
    diffusers-layout export is loaded by diffusers' own `load_lora_weights`."""
    family = load_family("tiny:flux")
    adapted = inject_adapters(family, AdapterConfig(rank=4, alpha=2.0, unet_targets=targets))
    randomise_up_weights(adapted.values())
    ours = rendered(family.pipe)
    path = save_lora_file(tmp_path / "a.safetensors", family, adapted, {"ss_output_name": "a"})

    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
        linear1_up = handle.get_tensor("lora_unet_single_blocks_0_linear1.lora_up.weight")
        metadata = handle.metadata()
    modules = {k.rsplit(".", 2)[0] for k in keys if k.endswith("lora_down.weight")}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in modules
    assert ("lora_unet_double_blocks_0_img_mlp_0" in modules) == (targets != "attention")
    assert ("lora_unet_double_blocks_0_img_mod_lin" in modules) == (targets == "full")
    # linear1's up covers its whole output (q, k, v and the MLP input), zero where not adapted
    assert linear1_up.shape[0] == 3 * 32 + 128
    assert (linear1_up[96:].abs().sum() == 0) == (targets == "attention")
    assert metadata["ss_base_model_version"] == "flux1"

    fresh = DiffusionPipeline.from_pretrained(tiny_model_path("flux"))
    fresh.set_progress_bar_config(disable=True)
    base = rendered(fresh)
    apply_as_comfyui(fresh.transformer, path)
    theirs = rendered(fresh)
    assert np.abs(ours - base).max() > 1e-2
    assert np.abs(ours - theirs).max() < 1e-4

    sampled = load_family("tiny:flux")  # what `stylelora sample` and `merge` do with the file
    apply_adapter(sampled, path, 1.0)
    assert np.abs(ours - rendered(sampled.pipe)).max() < 1e-4

    # `stylelora export --format diffusers` splits the fused modules; diffusers' own loader
    # reads that layout at any width.
    converted = tmp_path / "diffusers.safetensors"
    with pytest.raises(UserError, match="fused module has 96 output rows, the model's 9216"):
        run_export(path, "diffusers", converted, model=None)  # named on the real Flux.1
    run_export(path, "diffusers", converted, model=str(tiny_model_path("flux")))
    assert "transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight" in load_file(converted)
    fresh = DiffusionPipeline.from_pretrained(tiny_model_path("flux"))
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(converted))
    assert np.abs(ours - rendered(fresh)).max() < 1e-4


def real_flux_names(preset: str) -> set[str]:
    """kohya's module names for Flux.1 (19 double, 38 single blocks), from BFL's layout."""
    double = {
        "attention": ["img_attn_qkv", "txt_attn_qkv", "img_attn_proj", "txt_attn_proj"],
        "attn-mlp": [
            "img_attn_qkv",
            "txt_attn_qkv",
            "img_attn_proj",
            "txt_attn_proj",
            "img_mlp_0",
            "img_mlp_2",
            "txt_mlp_0",
            "txt_mlp_2",
        ],  # fmt: skip
    }
    double["full"] = [*double["attn-mlp"], "img_mod_lin", "txt_mod_lin"]
    single = {"attention": ["linear1"], "attn-mlp": ["linear1", "linear2"]}
    single["full"] = [*single["attn-mlp"], "modulation_lin"]
    names = {f"lora_unet_double_blocks_{i}_{m}" for i in range(19) for m in double[preset]}
    return names | {f"lora_unet_single_blocks_{i}_{m}" for i in range(38) for m in single[preset]}


def materialise_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Give a meta-device model's adapter weights real random values (the base stays meta)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for part in ("lora_A", "lora_B"):
            if hasattr(module, part) and "default" in getattr(module, part):
                layer = getattr(module, part)["default"].to_empty(device="cpu")
                with torch.no_grad():
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))


@pytest.mark.parametrize("preset", ["attention", "attn-mlp", "full"])
def test_real_flux_kohya_names_match_bfl_and_diffusers_reads_every_key(preset):
    """On Flux.1 dev's architecture (meta device, 11.9 B parameters, no memory): the exported
    names are BFL's, and diffusers' kohya-Flux converter turns every key into a LoRA of the right
    shape on a module of the model."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from stylelora.adapters.kohya import peft_to_kohya
    from stylelora.families.flux import Flux

    family = Flux.on_meta_device()
    family.pipe.vae = torch.nn.Identity()  # the names need no VAE; injection freezes one
    inject_adapters(family, AdapterConfig(rank=2, alpha=1.0, unet_targets=preset))
    materialise_adapters(family.unet)
    tensors = peft_to_kohya(family.unet, "lora_unet", family.file_module)
    assert {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")} == (
        real_flux_names(preset)
    )
    converted = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    modules = dict(family.unet.named_modules())
    assert converted and all(key.startswith("transformer.") for key in converted)
    for key, value in converted.items():
        path, _, part = key.removeprefix("transformer.").rpartition(".lora_")
        module = modules[path]
        base = getattr(module, "base_layer", module)
        expected = base.in_features if part.startswith("A") else base.out_features
        assert value.shape[1 if part.startswith("A") else 0] == expected, key
        if module is base and part.startswith("B"):  # a member of a fused module we left out
            assert not value.any(), f"{key}: rows of an unadapted module must be zero"


def test_flux_caches_park_clip_and_t5_and_train_as_without(tmp_path, demo_subset):
    """With latents and text outputs cached, the VAE, CLIP and T5 all wait off the device, and
    the adapter is the one a run without caches trains (to float rounding: T5 in a batch)."""
    from conftest import training_config
    from safetensors.torch import load_file

    from stylelora.train.run import build_run
    from stylelora.train.trainer import train

    data = demo_subset(4)
    short = ("train.max_steps=2", "sample.every_n_steps=0", "train.log_with='none'",
             "adapter.unet_targets='attn-mlp'")  # fmt: skip
    cached = ("data.cache_latents=true", "data.cache_text_encoder_outputs=true")
    cfg = training_config(tmp_path / "probe", "tiny:flux", data, *short, *cached)
    run = build_run(cfg)
    pipe = run.family.pipe
    assert all(
        any(m is i for i in run.idle) for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    )

    adapters = []
    for name, extra in (("plain", ()), ("cached", cached)):
        cfg = training_config(tmp_path / name, "tiny:flux", data, *short, *extra)
        cfg.sample.prompts = []
        adapters.append(load_file(train(cfg).adapter_path))
    plain, with_caches = adapters
    assert plain.keys() == with_caches.keys()
    assert all(torch.allclose(plain[k], with_caches[k], atol=1e-6) for k in plain)
    assert any(plain[k].abs().max() > 0 for k in plain if "lora_up" in k)


def test_t5_length_is_configurable_for_training_and_previews(tmp_path, demo_subset):
    from conftest import training_config

    from stylelora.train.run import load_model

    cfg = training_config(tmp_path, "tiny:flux", demo_subset(1), "t5_max_length=64")
    family = load_model(cfg)
    with torch.no_grad():
        text = family.encode_prompts(["a cat", "a dog"])
    assert text["encoder_hidden_states"].shape[1] == 64
    assert family.pipeline_text_kwargs("a cat", "", (64, 64))["max_sequence_length"] == 64
    assert load_family("tiny:flux").max_sequence_length == 512  # dev's, unset

    cfg = training_config(tmp_path, "tiny:sd15", demo_subset(1, start=1), "t5_max_length=64")
    with pytest.raises(UserError, match="t5_max_length: a setting of Flux.1 models; a SD1.x "):
        load_model(cfg)


def test_block_selection_chooses_which_blocks_get_adapters():
    """kohya's train_blocks and block index lists, on the real architecture's 19 + 38 blocks."""
    from stylelora.families.flux import Flux

    family = Flux.on_meta_device()

    def blocks(**options) -> set[str]:
        cfg = AdapterConfig(unet_targets="attn-mlp", **options)
        return {".".join(p.split(".")[:2]) for p in family.denoiser_targets(cfg).main}

    assert len(blocks()) == 19 + 38
    assert blocks(train_blocks="single") == {f"single_transformer_blocks.{i}" for i in range(38)}
    assert blocks(train_blocks="double", double_block_indices=[0, 7]) == {
        "transformer_blocks.0",
        "transformer_blocks.7",
    }
    assert blocks(single_block_indices=[]) == {f"transformer_blocks.{i}" for i in range(19)}
    with pytest.raises(
        UserError, match="double_block_indices: block 19 does not exist; .* 0 to 18"
    ):
        blocks(double_block_indices=[3, 19])
    with pytest.raises(
        UserError, match="adapter.train_blocks: a setting of Flux.2 and Flux.1 models; a "
    ):
        load_family("tiny:sd15", settings={"adapter.train_blocks": "single"})


def test_t5_attention_mask_hides_the_padding_in_training_and_previews():
    family = load_family("tiny:flux")
    family.configure({"t5_max_length": 32, "apply_t5_attn_mask": True})
    with torch.no_grad():
        text = family.encode_prompts(["a cat"])
    mask = text["t5_mask"][0].bool()
    assert 0 < mask.sum() < 32  # "a cat" and </s>, then padding
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.6])

    def predicted(embeds: torch.Tensor, masked: bool) -> torch.Tensor:
        conditioning = {**text, "encoder_hidden_states": embeds}
        if not masked:
            conditioning.pop("t5_mask")
        with torch.no_grad():
            return family.denoise(family.unet, latents, sigma, conditioning, {})

    embeds = text["encoder_hidden_states"]
    noisy_padding = embeds + 5 * (~mask)[None, :, None] * torch.randn(embeds.shape)
    assert torch.allclose(predicted(embeds, True), predicted(noisy_padding, True), atol=1e-5)
    assert not torch.allclose(predicted(embeds, False), predicted(noisy_padding, False), atol=1e-3)

    prompt = SamplePrompt("a cat", width=64, height=64, seed=1, steps=2, guidance_scale=3.5)
    with_mask = render(family.pipe, prompt, output_type="np", family=family)
    family.configure({"t5_max_length": 32})
    without = render(family.pipe, prompt, output_type="np", family=family)
    assert np.abs(with_mask - without).max() > 1e-3
