"""Qwen-Image on a tiny pipeline built here (its Qwen tokenizer too): the training forward is the
pipeline's own denoiser call, the objective agrees with its scheduler, a tiny model learns, the
exported file is read by diffusers' own loader with the same image, and the files users hold
(ComfyUI's transformer, the VAE in Wan's layout or diffusers', Qwen2.5-VL's file) load."""

from __future__ import annotations

import copy
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import training_config
from diffusers import DiffusionPipeline, QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stylelora.adapters.inject import inject_adapters
from stylelora.config import AdapterConfig
from stylelora.errors import UserError
from stylelora.export.lora_file import save_lora_file
from stylelora.export.names import adapter_family
from stylelora.export.tools import run_export, run_inspect, run_merge, run_resize
from stylelora.families import load_family
from stylelora.families.objective import NoisedBatch
from stylelora.families.qwen_image import QwenImage
from stylelora.families.tiny import tiny_model_path
from stylelora.sample.adapter import apply_adapter
from stylelora.sample.preview import latents_in_model_dtype
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import render
from stylelora.train.trainer import train

PROMPT = SamplePrompt("zqxstyle, a fish", width=32, height=32, seed=3, steps=3, guidance_scale=2.0)
CAPTIONS = ["a red fish", "a small dog on a mat"]  # of different lengths: the second is padded


def rendered(pipe, family=None) -> np.ndarray:
    return render(pipe, PROMPT, output_type="np", family=family)


def fresh_pipe() -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(tiny_model_path("qwen_image"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base_image() -> np.ndarray:
    """A fresh pipeline's picture, without adapters: each adapter must change it."""
    return rendered(fresh_pipe(), load_family("tiny:qwen_image"))


def save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def randomise_up_weights(modules, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator))


def test_training_forward_is_the_pipelines_denoiser_call_and_its_scheduler_lands_on_x0():
    """The pipeline's own first transformer call (recorded inside its sampling loop, two
    captions of different lengths, so with their mask) on the latents the objective noised:
    our conditioning and call give its prediction bitwise. Each step of its scheduler (shifted
    by the image's size, stretched to end at 0.02) fed the objective's target lands on the
    objective's latents at the next sigma, the last on the clean latents."""
    family = load_family("tiny:qwen_image")
    pipe, objective = family.pipe, family.training_objective()
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 2, 16, 4, 4, generator=generator)  # 32 px images
    scheduler = copy.deepcopy(pipe.scheduler)
    mu = calculate_shift(4, 256, 8192, 0.5, 0.9)  # 4 patches: the pipeline's mu for them
    scheduler.set_timesteps(sigmas=[0.8, 0.4], mu=mu)
    scheduler.set_begin_index(0)
    sigmas = scheduler.sigmas[:2].tolist()
    assert sigmas[1] == pytest.approx(0.02) and 0.5 < sigmas[0] < 0.8
    noised = NoisedBatch(clean, noise, torch.tensor([sigmas[0]] * 2))
    noisy = objective.noisy(noised)

    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, out: calls.append(out[0]))
    packed = QwenImagePipeline._pack_latents(noisy, 2, 16, 4, 4)
    pipe(CAPTIONS, height=32, width=32, latents=packed, sigmas=[0.8, 0.4], num_inference_steps=2,
         true_cfg_scale=1.0, output_type="latent")  # fmt: skip
    hook.remove()
    theirs = QwenImagePipeline._unpack_latents(calls[0], 32, 32, 8)[:, :, 0]
    text = family.encode_prompts(CAPTIONS)
    assert text["prompt_embeds_mask"].sum(1).tolist()[0] < text["prompt_embeds"].shape[1]
    with torch.no_grad():
        ours = family.denoise(pipe.transformer, noisy, noised.timesteps, text, {})
    assert torch.equal(ours, theirs)

    step = scheduler.step(objective.target(noised), scheduler.timesteps[0], noisy).prev_sample
    later = NoisedBatch(clean, noise, torch.tensor([sigmas[1]] * 2))
    assert torch.allclose(step, objective.noisy(later), atol=1e-5)
    landed = scheduler.step(objective.target(later), scheduler.timesteps[1], step).prev_sample
    assert torch.allclose(landed, clean, atol=1e-5)


def test_latents_are_the_vaes_normalised_frame_and_captions_reach_the_transformer():
    """Training latents are what the pipeline decodes (latents * std + mean, a frame axis
    added); the tiny tokenizer's template is longer than the 34 tokens the pipeline drops, so
    a caption's own tokens are still encoded."""
    family = load_family("tiny:qwen_image")
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = family.encode_posterior(pixels)
    assert mean.shape == (1, 16, 1, 4, 4)
    latents = family.scale_latents(mean)
    assert latents.shape == (1, 16, 4, 4)
    config = family.vae.config
    back = latents[:, :, None] * torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
    back = back + torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
    assert torch.allclose(back, mean, atol=1e-5)
    one, other = (family.encode_prompts([c])["prompt_embeds"] for c in ("a red fish", "a cat"))
    assert one.shape[1] > 100 and not torch.equal(one[:, -20:], other[:, -20:])
    assert family.size_step == 16 and family.default_resolution == 1024


@pytest.mark.parametrize("targets", ["attention", "attn-mlp", "full"])
def test_exported_file_is_comfyuis_layout_and_diffusers_reads_every_key(
    tmp_path, targets, base_image
):
    """`diffusion_model.<module>.lora_A/lora_B` (alpha folded in): diffusers' own
    `load_lora_weights` reads it, adapting every module the file names, and renders our
    in-memory adapter's image (true CFG with " " as the negative prompt); so does
    `export --format diffusers`'s file."""
    family = load_family("tiny:qwen_image")
    adapted = inject_adapters(family, AdapterConfig(rank=4, alpha=2.0, unet_targets=targets))
    randomise_up_weights(adapted.values())
    ours = rendered(family.pipe, family)
    path = save_lora_file(tmp_path / "a.safetensors", family, adapted, {"ss_output_name": "a"})
    with safe_open(str(path), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    modules = {k.removesuffix(".lora_A.weight") for k in keys if k.endswith(".lora_A.weight")}
    assert keys == {f"{m}.lora_{x}.weight" for m in modules for x in "AB"}  # no alpha keys
    block = "diffusion_model.transformer_blocks"
    assert f"{block}.0.attn.to_q" in modules and f"{block}.1.attn.add_k_proj" in modules
    assert f"{block}.0.attn.to_add_out" in modules and f"{block}.0.attn.to_out.0" in modules
    assert len(modules) == 2 * {"attention": 8, "attn-mlp": 12, "full": 14}[targets]
    assert (f"{block}.1.txt_mlp.net.0.proj" in modules) == (targets != "attention")
    assert (f"{block}.0.img_mod.1" in modules) == (targets == "full")
    assert metadata["ss_base_model_version"] == "qwen_image"
    assert run_inspect(path)[1:3] == ["format: comfyui", "family: qwen_image"]

    converted = tmp_path / "diffusers.safetensors"
    run_export(path, "diffusers", converted, model=None)  # named on the real architecture
    for source in (path, converted):
        pipe = fresh_pipe()
        pipe.load_lora_weights(str(source))
        layers = [m for m in pipe.transformer.modules() if isinstance(m, LoraLayer)]
        assert len(layers) == len(modules)
        assert np.abs(rendered(pipe, family) - ours).max() < 1e-4
    assert np.abs(base_image - ours).max() > 1e-2
    sampled = load_family("tiny:qwen_image")  # what `stylelora sample` and `merge` do with it
    apply_adapter(sampled, path, 1.0)
    assert np.abs(rendered(sampled.pipe, sampled) - ours).max() < 1e-4

    resized = tmp_path / "resized.safetensors"
    run_resize(path, 2, None, resized)
    assert all(k.startswith("diffusion_model.") for k in load_file(resized))
    with pytest.raises(UserError, match="use --format comfyui"):
        run_export(path, "kohya", tmp_path / "k.safetensors", model=None)


def to_wan_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Qwen-Image VAE's weights in Wan 2.1's original layout (ComfyUI's
    `qwen_image_vae.safetensors`): diffusers' converter reversed, for this test's files (the
    test checks that the converter brings them back)."""
    residual = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3"}
    residual |= {"conv2": "residual.6", "conv_shortcut": "shortcut"}
    renames = [
        (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
        (r"^quant_conv\.", "conv1."),
        (r"^post_quant_conv\.", "conv2."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
        (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
        (r"^encoder\.down_blocks\.", "encoder.downsamples."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)\.(.*)", key):
            key = f"{m[1]}.middle.{2 * int(m[2])}.{residual[m[3]]}.{m[4]}"
        elif m := re.match(r"^decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(\w+)\.(.*)", key):
            key = f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{residual[m[3]]}.{m[4]}"
        elif m := re.match(r"^decoder\.up_blocks\.(\d)\.upsamplers\.0\.(.*)", key):
            key = f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
        elif m := re.match(r"^encoder\.downsamples\.(\d+)\.(\w+)\.(.*)", key):
            key = f"encoder.downsamples.{m[1]}.{residual.get(m[2], m[2])}.{m[3]}"
        out[key] = value
    return out


def legacy_encoder_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen2.5-VL's weights under transformers' older names, as the released checkpoints and
    ComfyUI's `qwen_2.5_vl_7b.safetensors` keep them (`model.layers.N`, `visual.`)."""
    out = {}
    for key, value in state.items():
        key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        out[key] = value
    return out


def test_the_files_users_hold_load(tmp_path):
    """The transformer with and without ComfyUI's prefix (diffusers' single-file mapping of it
    is the identity), the VAE in Wan's original layout (diffusers' converter brings it back), in
    diffusers' names and as a folder, Qwen2.5-VL with and without its vision tower and head, or
    as a folder, beside a config folder without weights: the same pipeline, the same image."""
    family = load_family("tiny:qwen_image")
    expected = rendered(family.pipe, family)
    state = family.unet.state_dict()
    layout = family.single_file_state()
    mapped = SINGLE_FILE_LOADABLE_CLASSES["QwenImageTransformer2DModel"]["checkpoint_mapping_fn"]
    assert mapped(dict(layout)).keys() == state.keys()
    vae = family.vae.state_dict()
    wan = to_wan_layout(vae)
    assert "decoder.middle.0.residual.0.gamma" in wan and "encoder.conv1.weight" in wan
    back = convert_wan_vae_to_diffusers(dict(wan))
    assert back.keys() == vae.keys() and all(torch.equal(back[k], v) for k, v in vae.items())

    files = tmp_path / "files"
    files.mkdir()
    save({f"model.diffusion_model.{k}": v for k, v in layout.items()}, files / "qwen.safetensors")
    save(wan, files / "qwen_image_vae.safetensors")
    save(vae, files / "diffusers_vae.safetensors")
    encoder = legacy_encoder_names(family.pipe.text_encoder.state_dict())
    assert any(k.startswith("visual.") for k in encoder) and "lm_head.weight" in encoder
    assert "model.layers.0.mlp.up_proj.weight" in encoder
    save(encoder, files / "qwen_2.5_vl_7b.safetensors")
    text_only = {k: v for k, v in encoder.items() if k.startswith("model.")}
    save(text_only, files / "text_only.safetensors")
    configs = tmp_path / "configs"
    shutil.copytree(tiny_model_path("qwen_image"), configs)
    for weights in configs.glob("*/*.safetensors"):
        weights.unlink()

    with pytest.raises(UserError, match="holds Qwen-Image's transformer only; set vae to your"):
        load_family(str(files / "qwen.safetensors"), config=str(configs))
    save(layout, files / "plain.safetensors")  # without ComfyUI's prefix
    for transformer_file, vae_file, encoder_file in [
        ("qwen", "qwen_image_vae", "qwen_2.5_vl_7b"),
        ("plain", "diffusers_vae", "text_only"),
    ]:
        parts = {
            "vae": files / f"{vae_file}.safetensors",
            "text_encoder": files / f"{encoder_file}.safetensors",
        }
        path = files / f"{transformer_file}.safetensors"
        loaded = load_family(str(path), config=str(configs), parts=parts)
        assert isinstance(loaded, QwenImage)
        assert isinstance(loaded.unet, QwenImageTransformer2DModel)
        assert np.abs(rendered(loaded.pipe, loaded) - expected).max() < 1e-5
    tiny = tiny_model_path("qwen_image")  # a pipeline folder, a component folder
    parts = {"vae": tiny, "text_encoder": tiny / "text_encoder"}
    loaded = load_family(str(files / "plain.safetensors"), config=str(configs), parts=parts)
    assert np.abs(rendered(loaded.pipe, loaded) - expected).max() < 1e-5
    broken = {k: v for k, v in layout.items() if "transformer_blocks.1.img_mlp" not in k}
    with pytest.raises(UserError, match="not a complete Qwen-Image transformer: transformer_b"):
        load_family(str(save(broken, tmp_path / "broken.safetensors")), config=str(configs),
                    parts={"vae": files / "qwen_image_vae.safetensors",
                           "text_encoder": files / "text_only.safetensors"})  # fmt: skip
    with pytest.raises(UserError, match="text_encoder = .*vae.safetensors: could not load it"):
        load_family(str(files / "qwen.safetensors"), config=str(configs),
                    parts={"vae": files / "qwen_image_vae.safetensors",
                           "text_encoder": files / "qwen_image_vae.safetensors"})  # fmt: skip


def test_merge_writes_comfyuis_layout_which_loads_back_and_diffusers_reads(tmp_path):
    """`merge` folds an adapter into the transformer and writes it under diffusers' names
    (ComfyUI's): it loads back as a Qwen-Image file with the adapter's image, and diffusers'
    own `from_single_file` reads the same weights."""
    family = load_family("tiny:qwen_image")
    adapted = inject_adapters(family, AdapterConfig(rank=4, alpha=4.0, unet_targets="full"))
    randomise_up_weights(adapted.values())
    ours = rendered(family.pipe, family)
    adapter = save_lora_file(tmp_path / "a.safetensors", family, adapted, {})
    folder = tiny_model_path("qwen_image")
    out = tmp_path / "merged.safetensors"
    run_merge(str(folder), [f"{adapter}:1.0"], out, "fp32")
    assert "transformer_blocks.0.img_mod.1.weight" in load_file(out)
    merged = load_family(str(out), config=str(folder))
    assert isinstance(merged, QwenImage)
    assert np.abs(rendered(merged.pipe, merged) - ours).max() < 1e-4
    read = QwenImageTransformer2DModel.from_single_file(
        str(out), config=str(folder), subfolder="transformer", local_files_only=True
    )
    expected = merged.unet.state_dict()
    assert all(torch.equal(read.state_dict()[k], v) for k, v in expected.items())


def test_a_bf16_transformer_previews_and_the_vae_takes_latents_of_another_dtype():
    """The pipeline hands a bf16 transformer fp32 latents (it makes them in the text
    encoder's dtype): the preview hooks cast them, by its `hidden_states` keyword. A VAE kept in
    another dtype than the weights takes bf16 latents: `cast_vae` finds this video VAE's first
    layer (its 3D post_quant_conv)."""
    family = load_family("tiny:qwen_image")
    family.unet.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="same dtype"):
        rendered(family.pipe, family)
    with latents_in_model_dtype(family):
        assert np.isfinite(rendered(family.pipe, family)).all()
    family.vae_dtype = lambda weight_dtype: torch.float32
    family.cast_vae(torch.bfloat16)
    latents = torch.randn(1, 16, 1, 4, 4, dtype=torch.bfloat16)
    assert family.vae.decode(latents).sample.dtype == torch.float32


def test_what_a_qwen_image_model_does_not_take_is_one_line():
    family = load_family("tiny:qwen_image")
    with pytest.raises(UserError, match="Qwen-Image's attention is joint"):
        family.denoiser_targets(AdapterConfig(unet_targets="cross-attn"))
    with pytest.raises(UserError, match="a Qwen-Image model's text encoder takes no adapter"):
        inject_adapters(family, AdapterConfig(text_encoder=True, unet_targets="attention"))
    with pytest.raises(UserError, match="t5_max_length: a setting of Flux.1 models; a Qwen-Image"):
        load_family("tiny:qwen_image", settings={"t5_max_length": 64})
    with pytest.raises(UserError, match=r"^max_sequence_length = 1100: Qwen-Image .* 1024 tokens$"):
        load_family("tiny:qwen_image", settings={"max_sequence_length": 1100})
    assert load_family("tiny:qwen_image", settings={"max_sequence_length": 1024}).max_length == 1024
    assert family.max_length == 512
    with pytest.raises(UserError, match="block-wise rates and dims .* a Qwen-Image transformer"):
        family.kohya_blocks()


def test_tiny_qwen_image_trains_with_cached_text_and_previews(demo_subset, tmp_path):
    """Two steps through the real trainer: captions of different lengths cached and batched
    with their masks, previews by the pipeline's own sampler with true CFG, the file in
    ComfyUI's layout."""
    cfg = training_config(
        tmp_path,
        "tiny:qwen_image",
        demo_subset(4),
        "train.max_steps=2",
        "train.batch_size=2",
        "adapter.unet_targets='attn-mlp'",
        "sample.every_n_steps=2",
        "sample.num_inference_steps=2",
        "sample.guidance_scale=4.0",
        "max_sequence_length=256",
    )
    cfg.sample.prompts = ["zqxstyle, a fish"]
    result = train(cfg)
    assert result.steps == 2 and all(math.isfinite(loss) for loss in result.losses)
    assert [p.name for p in result.previews] == ["demo-style_000002.png"]
    assert Image.open(result.previews[0]).size == (128, 64)  # without and with, side by side
    with safe_open(str(result.adapter_path), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("diffusion_model.transformer_blocks.") for k in keys)
    assert metadata["ss_base_model_version"] == "qwen_image"
    assert metadata["modelspec.architecture"] == "qwen-image/lora"
    cfg.sample.scheduler = "euler"
    with pytest.raises(UserError, match="sample.scheduler = 'euler': a Qwen-Image model samples"):
        train(cfg, overwrite=True)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_adapters_train_and_apply_as_the_uis_do(kind, tmp_path, base_image):
    """PEFT's LoHa and LoKr on Qwen-Image's Linears (no module is fused in its files), written
    in LyCORIS's layout under ComfyUI's names, and added into a fresh model by the UIs'
    formula (export/apply.py): our image."""
    family = load_family("tiny:qwen_image")
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
    assert f"diffusion_model.transformer_blocks.0.attn.add_q_proj.{part}" in keys
    assert "diffusion_model.transformer_blocks.1.img_mlp.net.2.alpha" in keys
    sampled = load_family("tiny:qwen_image")
    apply_adapter(sampled, path, 1.0)
    assert np.abs(rendered(sampled.pipe, sampled) - ours).max() < 1e-4
    assert np.abs(base_image - ours).max() > 1e-2


def test_a_tiny_model_overfits_a_fixed_batch():
    """60 steps of the `full` adapters take the loss on one noised batch to 0.40 of where it
    started (the tiny random model's adapters level off there: 0.405 after 60 steps or 120)."""
    family = load_family("tiny:qwen_image")
    adapted = inject_adapters(family, AdapterConfig(rank=8, alpha=8, unet_targets="full"))
    params = [p for m in adapted.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    objective = family.training_objective()
    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    noise, sigmas = objective.draw(latents.shape, torch.Generator().manual_seed(2), None)
    noised = NoisedBatch(latents, noise, sigmas)
    with torch.no_grad():
        text = family.encode_prompts(CAPTIONS)
    losses = []
    for _ in range(60):
        prediction = family.denoise(family.unet, objective.noisy(noised), sigmas, text, {})
        loss = torch.nn.functional.mse_loss(prediction, objective.target(noised))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_adapter_names_tell_qwen_image_from_flux():
    """Without metadata a file's names tell: ComfyUI's (ours, ai-toolkit's) and musubi-tuner's
    kohya names of Qwen-Image's blocks, even for attention alone; not Flux.1's BFL names (whose
    double blocks have an `img_mlp` too) nor its diffusers names."""
    ours = ["diffusion_model.transformer_blocks.0.attn.to_q", "diffusion_model.proj_out"]
    musubi = ["lora_unet_transformer_blocks_3_txt_mlp_net_2", "lora_unet_img_in"]
    diffusers = ["transformer.transformer_blocks.0.img_mod.1"]
    for names in (ours, musubi, diffusers):
        assert adapter_family("", names, []) is QwenImage
    flux_kohya = ["lora_unet_double_blocks_0_img_mlp_0", "lora_unet_double_blocks_0_txt_mod_lin"]
    flux_diffusers = ["transformer.transformer_blocks.0.ff.net.0.proj"]
    flux_diffusers += ["transformer.single_transformer_blocks.0.proj_mlp"]
    for names in (flux_kohya, flux_diffusers):
        assert not QwenImage.claims_names(names)
    assert not QwenImage.claims_names([f"diffusion_model.{n[12:]}" for n in flux_diffusers])


def test_the_real_architecture_on_the_meta_device():
    """The bundled configs are Qwen/Qwen-Image's: its published sizes (the 20.4 B transformer,
    Qwen2.5-VL-7B-Instruct's 8.29 B with its vision tower, the 127 M Wan 2.1 VAE); the file
    layout is diffusers' names, as ComfyUI's `qwen_image_bf16.safetensors` has them."""
    family = QwenImage.on_meta_device()
    parts = {
        "transformer": family.unet,
        "vae": family.vae,
        "text_encoder": family.pipe.text_encoder,
    }
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    assert counts == {
        "transformer": 20_430_401_088,
        "vae": 126_892_531,
        "text_encoder": 8_292_166_656,
    }
    visual = sum(p.numel() for p in family.pipe.text_encoder.model.visual.parameters())
    assert visual == 676_550_144
    state = family.single_file_state()
    assert QwenImage.reads_single_file([f"model.diffusion_model.{k}" for k in state])
    assert state["transformer_blocks.59.attn.to_q.weight"].shape == (3072, 3072)
    assert state["txt_in.weight"].shape == (3072, 3584)
    assert len(family.swappable_blocks()) == 60
    vae = family.vae.state_dict()
    assert convert_wan_vae_to_diffusers(to_wan_layout(vae)).keys() == vae.keys()
    assert family.default_resolution == 1024 and family.size_step == 16
    names = [
        f"diffusion_model.{path}"
        for path in family.denoiser_targets(AdapterConfig(unet_targets="attn-mlp")).main
    ]
    assert QwenImage.claims_names(names) and len(names) == 60 * 12
