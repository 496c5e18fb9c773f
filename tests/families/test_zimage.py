"""Z-Image on a tiny pipeline built here (its Qwen tokenizer too): the training forward is the
pipeline's own denoiser call, the objective agrees with its scheduler, a tiny model learns, the
exported file is read by diffusers' own loader with the same image, and the files users hold
(the released transformer layout, the VAE and Qwen3 files) load."""

from __future__ import annotations

import copy
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import training_config
from diffusers import DiffusionPipeline, ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stylelora.adapters.inject import inject_adapters
from stylelora.config import AdapterConfig
from stylelora.errors import UserError
from stylelora.export.lora_file import save_lora_file
from stylelora.export.tools import run_combine, run_export, run_inspect, run_resize
from stylelora.families import load_family
from stylelora.families.ldm import vae_state
from stylelora.families.objective import NoisedBatch
from stylelora.families.tiny import tiny_model_path
from stylelora.families.zimage import ZImage
from stylelora.families.zimage.files import to_original
from stylelora.sample.adapter import apply_adapter
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import render
from stylelora.train.trainer import train

PROMPT = SamplePrompt("zqxstyle, a fish", width=32, height=32, seed=3, steps=3, guidance_scale=2.0)


def rendered(pipe, family=None) -> np.ndarray:
    return render(pipe, PROMPT, output_type="np", family=family)


def fresh_pipe() -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(tiny_model_path("zimage"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base_image() -> np.ndarray:
    """A fresh pipeline's picture, without adapters: each adapter must change it."""
    return rendered(fresh_pipe(), load_family("tiny:zimage"))


def randomise_up_weights(modules, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def test_training_forward_is_the_pipelines_denoiser_call_and_its_scheduler_lands_on_x0():
    """The pipeline's own first transformer call (recorded inside its sampling loop) on the
    latents the objective noised: our conditioning and call give its prediction bitwise; one
    step of its scheduler fed the objective's target lands on the clean latents."""
    family = load_family("tiny:zimage")
    pipe, objective = family.pipe, family.training_objective()
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(sigmas=[0.6])  # shifted by the model's 3.0, then a step to 0
    sigma = scheduler.sigmas[:1]
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 1, 16, 8, 8, generator=generator)
    noised = NoisedBatch(clean, noise, sigma)
    noisy = objective.noisy(noised)

    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, out: calls.append(out[0]))
    pipe("a red fish", height=16, width=16, latents=noisy, sigmas=[0.6], num_inference_steps=1,
         guidance_scale=0.0, output_type="latent")  # fmt: skip
    hook.remove()
    theirs = -torch.stack(calls[0]).float().squeeze(2)  # the pipeline negates the model's output
    with torch.no_grad():
        ours = family.denoise(
            pipe.transformer, noisy, sigma, family.encode_prompts(["a red fish"]), {}
        )
    assert torch.equal(ours, theirs)

    landed = scheduler.step(objective.target(noised), scheduler.timesteps[0], noisy).prev_sample
    assert sigma.item() == pytest.approx(3 * 0.6 / (1 + 2 * 0.6))
    assert torch.allclose(landed, clean, atol=1e-5)


def test_a_tiny_model_overfits_a_fixed_batch():
    """60 steps of the `full` adapters take the loss on one noised batch to 0.40 of where it
    started (the tiny random model's adapters level off there; its full weights reach 0)."""
    family = load_family("tiny:zimage")
    adapted = inject_adapters(family, AdapterConfig(rank=8, alpha=8, unet_targets="full"))
    params = [p for m in adapted.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    objective = family.training_objective()
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    noise, sigmas = objective.draw(latents.shape, torch.Generator().manual_seed(2), None)
    noised = NoisedBatch(latents, noise, sigmas)
    with torch.no_grad():
        text = family.encode_prompts(["a cat", "a dog on a mat"])
    losses = []
    for _ in range(60):
        prediction = family.denoise(family.unet, objective.noisy(noised), sigmas, text, {})
        loss = torch.nn.functional.mse_loss(prediction, objective.target(noised))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize("targets", ["attention", "attn-mlp", "full"])
def test_exported_file_is_comfyuis_layout_and_diffusers_reads_every_key(
    tmp_path, targets, base_image
):
    """`diffusion_model.<module>.lora_A/lora_B` (alpha folded in): diffusers' own
    `load_lora_weights` reads it, adapting every module the file names, and renders our
    in-memory adapter's image; so does `export --format diffusers`'s file."""
    family = load_family("tiny:zimage")
    adapted = inject_adapters(family, AdapterConfig(rank=4, alpha=2.0, unet_targets=targets))
    randomise_up_weights(adapted.values())
    ours = rendered(family.pipe, family)
    path = save_lora_file(tmp_path / "a.safetensors", family, adapted, {"ss_output_name": "a"})
    with safe_open(str(path), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    modules = {k.removesuffix(".lora_A.weight") for k in keys if k.endswith(".lora_A.weight")}
    assert keys == {f"{m}.lora_{x}.weight" for m in modules for x in "AB"}  # no alpha keys
    assert "diffusion_model.layers.0.attention.to_q" in modules
    assert "diffusion_model.context_refiner.0.attention.to_k" in modules
    assert ("diffusion_model.layers.1.feed_forward.w3" in modules) == (targets != "attention")
    assert ("diffusion_model.layers.0.adaLN_modulation.0" in modules) == (targets == "full")
    assert metadata["ss_base_model_version"] == "z_image"
    assert run_inspect(path)[1:3] == ["format: comfyui", "family: zimage"]

    converted = tmp_path / "diffusers.safetensors"
    run_export(path, "diffusers", converted, model=None)  # named on the real architecture
    for source in (path, converted):
        pipe = fresh_pipe()
        pipe.load_lora_weights(str(source))
        layers = [m for m in pipe.transformer.modules() if isinstance(m, LoraLayer)]
        assert len(layers) == len(modules)
        assert np.abs(rendered(pipe, family) - ours).max() < 1e-4
    assert np.abs(base_image - ours).max() > 1e-2
    sampled = load_family("tiny:zimage")  # what `stylelora sample` and `merge` do with it
    apply_adapter(sampled, path, 1.0)
    assert np.abs(rendered(sampled.pipe, sampled) - ours).max() < 1e-4

    resized, combined = tmp_path / "resized.safetensors", tmp_path / "combined.safetensors"
    run_resize(path, 2, None, resized)
    assert all(k.startswith("diffusion_model.") for k in load_file(resized))
    run_combine([f"{path}:0.5", f"{path}:0.5"], combined, None)  # the adapter, at 1.0 in all
    summed = load_family("tiny:zimage")
    apply_adapter(summed, combined, 1.0)
    assert np.abs(rendered(summed.pipe, summed) - ours).max() < 1e-4
    with pytest.raises(UserError, match="use --format comfyui"):
        run_export(path, "kohya", tmp_path / "k.safetensors", model=None)


def test_the_files_users_hold_load_and_merge_writes_the_released_layout(tmp_path):
    """The transformer in the released layout (fused q/k/v, under ComfyUI's prefix), the VAE
    in the original layout and Qwen3 with transformers' task-model names, beside a config
    folder without weights: the same pipeline, the same image."""
    family = load_family("tiny:zimage")
    expected = rendered(family.pipe, family)
    original = to_original(family.unet.state_dict())
    assert "layers.0.attention.qkv.weight" in original and "x_embedder.weight" in original
    back = convert_z_image_transformer_checkpoint_to_diffusers(dict(original))
    assert back.keys() == family.unet.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in family.unet.state_dict().items())

    files = tmp_path / "files"
    files.mkdir()
    prefixed = {f"model.diffusion_model.{k}": v.contiguous() for k, v in original.items()}
    save_file(prefixed, files / "z_image_turbo_bf16.safetensors")
    save_file(vae_state(family.vae), files / "ae.safetensors")
    encoder = {
        f"model.{k}": v.contiguous() for k, v in family.pipe.text_encoder.state_dict().items()
    }
    save_file(encoder, files / "qwen_3_4b.safetensors")
    configs = tmp_path / "configs"
    shutil.copytree(tiny_model_path("zimage"), configs)
    for weights in configs.glob("*/*.safetensors"):
        weights.unlink()

    with pytest.raises(UserError, match="holds Z-Image's transformer only; set vae to your VAE"):
        load_family(str(files / "z_image_turbo_bf16.safetensors"), config=str(configs))
    loaded = load_family(
        str(files / "z_image_turbo_bf16.safetensors"),
        config=str(configs),
        parts={"vae": files / "ae.safetensors", "text_encoder": files / "qwen_3_4b.safetensors"},
    )
    assert isinstance(loaded, ZImage) and isinstance(loaded.unet, ZImageTransformer2DModel)
    assert np.abs(rendered(loaded.pipe, loaded) - expected).max() < 1e-5


def test_what_a_z_image_model_does_not_take_is_one_line():
    family = load_family("tiny:zimage")
    with pytest.raises(UserError, match="Z-Image's attention is joint"):
        family.denoiser_targets(AdapterConfig(unet_targets="cross-attn"))
    with pytest.raises(UserError, match="a Z-Image model's text encoder takes no adapter"):
        inject_adapters(family, AdapterConfig(text_encoder=True, unet_targets="attention"))
    with pytest.raises(UserError, match="t5_max_length: a setting of Flux.1 models; a Z-Image"):
        load_family("tiny:zimage", settings={"t5_max_length": 64})
    with pytest.raises(UserError, match="max_sequence_length = 600: Z-Image encodes .* 512"):
        load_family("tiny:zimage", settings={"max_sequence_length": 600})
    assert load_family("tiny:zimage", settings={"max_sequence_length": 64}).max_length == 64


def test_tiny_z_image_trains_with_cached_text_and_previews(demo_subset, tmp_path):
    """Two steps through the real trainer: captions of different lengths cached and batched
    with their masks, previews by the pipeline's own sampler, the file in ComfyUI's layout."""
    cfg = training_config(
        tmp_path,
        "tiny:zimage",
        demo_subset(4),
        "train.max_steps=2",
        "train.batch_size=2",
        "adapter.unet_targets='attn-mlp'",
        "sample.every_n_steps=2",
        "sample.num_inference_steps=2",
        "sample.guidance_scale=1.0",
        "max_sequence_length=64",
    )
    cfg.sample.prompts = ["zqxstyle, a fish"]
    result = train(cfg)
    assert result.steps == 2 and all(math.isfinite(loss) for loss in result.losses)
    assert [p.name for p in result.previews] == ["demo-style_000002.png"]
    assert Image.open(result.previews[0]).size == (128, 64)  # without and with, side by side
    with safe_open(str(result.adapter_path), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("diffusion_model.layers.") or "refiner" in k for k in keys)
    assert metadata["ss_base_model_version"] == "z_image"
    assert metadata["modelspec.architecture"] == "z-image/lora"
    cfg.sample.scheduler = "euler"
    with pytest.raises(UserError, match="sample.scheduler = 'euler': a Z-Image model samples"):
        train(cfg, overwrite=True)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_adapters_train_and_apply_as_the_uis_do(kind, tmp_path, base_image):
    """PEFT's LoHa and LoKr on Z-Image's Linears, written in LyCORIS's layout under ComfyUI's
    names, and added into a fresh model by the UIs' formula (export/apply.py, checked against
    transcriptions of both UIs in tests/export/test_lycoris.py): our image."""
    family = load_family("tiny:zimage")
    torch.manual_seed(0)
    adapted = inject_adapters(family, AdapterConfig(type=kind, rank=2, unet_targets="attn-mlp"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in (p for m in adapted.values() for p in m.parameters() if p.requires_grad):
            param.copy_(0.4 * torch.randn(param.shape, generator=generator))
    ours = rendered(family.pipe, family)
    path = save_lora_file(tmp_path / f"{kind}.safetensors", family, adapted, {})
    keys = load_file(path)
    part = "hada_w1_a" if kind == "loha" else "lokr_w1"
    assert f"diffusion_model.layers.0.attention.to_q.{part}" in keys
    assert "diffusion_model.layers.0.attention.to_q.alpha" in keys
    sampled = load_family("tiny:zimage")
    apply_adapter(sampled, path, 1.0)
    assert np.abs(rendered(sampled.pipe, sampled) - ours).max() < 1e-4
    assert np.abs(base_image - ours).max() > 1e-2


def test_the_real_architecture_on_the_meta_device():
    """The bundled configs are Z-Image-Turbo's: its published sizes (6.15 B transformer, Qwen3's
    4.02 B), and the released file's layout is the one diffusers' converter reads."""
    family = ZImage.on_meta_device()
    parts = {
        "transformer": family.unet,
        "vae": family.vae,
        "text_encoder": family.pipe.text_encoder,
    }
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    assert counts == {
        "transformer": 6_154_908_736,
        "vae": 83_819_683,
        "text_encoder": 4_022_468_096,
    }
    state = family.unet.state_dict()
    original = to_original(state)
    assert original["layers.29.attention.qkv.weight"].shape == (3 * 3840, 3840)
    assert convert_z_image_transformer_checkpoint_to_diffusers(original).keys() == state.keys()
    assert len(family.swappable_blocks()) == 30
