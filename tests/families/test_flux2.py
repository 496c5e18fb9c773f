"""Flux.2 on tiny pipelines built here (klein's Qwen3 and dev's Mistral3 with their tokenizers):
the training forward is each pipeline's own denoiser call, the objective agrees with its
scheduler, a tiny model learns, the exported file is ComfyUI's BFL layout that diffusers' own
loader reads with the same image, the files users hold load, and the real architectures on the
meta device have the published sizes."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import training_config
from diffusers import DiffusionPipeline, Flux2KleinPipeline, Flux2Pipeline
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux2_lora_to_diffusers
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stylelora.adapters.inject import inject_adapters
from stylelora.adapters.kohya import peft_to_kohya
from stylelora.adapters.state import file_layout
from stylelora.config import AdapterConfig
from stylelora.errors import UserError
from stylelora.export.lora_file import save_lora_file, write_lora_tensors
from stylelora.export.tools import run_export, run_inspect, run_merge, run_resize
from stylelora.families import load_family
from stylelora.families.flux.files import is_bfl_transformer
from stylelora.families.flux2 import Flux2
from stylelora.families.flux2.bfl import to_bfl
from stylelora.families.flux2.files import is_flux2_transformer, load_vae_file
from stylelora.families.ldm import vae_state
from stylelora.families.objective import NoisedBatch
from stylelora.families.tiny import tiny_model_path
from stylelora.sample.adapter import apply_adapter
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import render
from stylelora.train.trainer import train

PROMPT = SamplePrompt("zqxstyle, a fish", width=32, height=32, seed=3, steps=2, guidance_scale=2.0)


def rendered(pipe, family=None) -> np.ndarray:
    return render(pipe, PROMPT, output_type="np", family=family)


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dev pipeline (Mistral3, guidance embedding), saved as a diffusers folder."""
    folder = tmp_path_factory.mktemp("flux2-dev")
    torch.manual_seed(0)
    Flux2.build_tiny_dev(folder).save_pretrained(folder)
    return folder


def fresh(folder: Path) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base_image() -> np.ndarray:
    """A fresh klein pipeline's picture, without adapters: each adapter must change it."""
    return rendered(fresh(tiny_model_path("flux2")), load_family("tiny:flux2"))


def model_folder(variant: str, dev_folder: Path) -> Path:
    return dev_folder if variant == "dev" else tiny_model_path("flux2")


def randomise_up_weights(modules, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_training_forward_is_the_pipelines_denoiser_call_and_its_scheduler_lands_on_x0(
    variant, dev_folder
):
    """The pipeline's own first transformer call (recorded inside its sampling loop) on the
    latents the objective noised: our conditioning and call give its prediction bitwise (dev:
    guidance 1.0, as trained); one step of its scheduler fed the objective's target lands on
    the clean latents."""
    family = load_family(str(model_folder(variant, dev_folder)))
    pipe, objective = family.pipe, family.training_objective()
    assert isinstance(pipe, Flux2Pipeline if variant == "dev" else Flux2KleinPipeline)
    scheduler = copy.deepcopy(pipe.scheduler)
    mu = compute_empirical_mu(image_seq_len=16, num_steps=1)  # as the pipeline computes it
    scheduler.set_timesteps(sigmas=[0.6], mu=mu)  # shifted by mu, then a step to 0
    sigma = scheduler.sigmas[:1]
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 1, 32, 4, 4, generator=generator)
    noised = NoisedBatch(clean, noise, sigma)
    noisy = objective.noisy(noised)

    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, out: calls.append(out[0]))
    pipe(prompt="a red fish", height=16, width=16, latents=noisy, sigmas=[0.6],
         num_inference_steps=1, guidance_scale=1.0, output_type="latent")  # fmt: skip
    hook.remove()
    theirs = Flux2Pipeline._unpack_latents_with_ids(
        calls[0], Flux2Pipeline._prepare_latent_ids(noisy)
    )
    with torch.no_grad():
        text = family.encode_prompts(["a red fish"])
        ours = family.denoise(pipe.transformer, noisy, sigma, text, {})
    assert text["prompt_embeds"].shape == (1, 512, 48)
    assert torch.equal(ours, theirs)

    landed = scheduler.step(objective.target(noised), scheduler.timesteps[0], noisy).prev_sample
    assert sigma.item() == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / 0.6 - 1))
    assert torch.allclose(landed, clean, atol=1e-5)


def test_latents_are_the_pipelines_patchified_normalised_ones():
    """`scale_latents` is what the pipeline does to an image's latents (its
    `_encode_vae_image` on the posterior's mode), and previews round sides to 2 x the VAE's."""
    family = load_family("tiny:flux2")
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mode = family.vae.encode(pixels).latent_dist.mode()
    theirs = family.pipe._encode_vae_image(pixels, generator=None)
    assert torch.equal(family.scale_latents(mode), theirs)
    assert theirs.shape == (1, 32, 8, 8) and family.size_step == 4


def test_a_tiny_model_overfits_a_fixed_batch():
    """60 steps of the `full` adapters take the loss on one noised batch to 0.42 of where it
    started (the tiny random model's adapters level off there)."""
    family = load_family("tiny:flux2", settings={"max_sequence_length": 64})
    adapted = inject_adapters(family, AdapterConfig(rank=8, alpha=8, unet_targets="full"))
    params = [p for m in adapted.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    objective = family.training_objective()
    latents = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(1))
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


def fused_pairs(path: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return handle.get_tensor(f"{name}.lora_A.weight"), handle.get_tensor(
            f"{name}.lora_B.weight"
        )


@pytest.mark.parametrize("targets", ["attention", "attn-mlp", "full"])
def test_exported_file_is_comfyuis_bfl_layout_and_diffusers_reads_every_key(
    tmp_path, targets, base_image
):
    """`diffusion_model.<BFL module>.lora_A/lora_B` (alpha folded in, q/k/v fused with the up
    block-diagonal): diffusers' own `load_lora_weights` splits it back exactly, adapting every
    module the file's names cover, and renders our in-memory adapter's image; so do
    `export --format diffusers`'s file (named on the tiny model: the real one is wider) and
    what `sample` and `merge` do with it."""
    family = load_family("tiny:flux2")
    adapted = inject_adapters(family, AdapterConfig(rank=4, alpha=2.0, unet_targets=targets))
    randomise_up_weights(adapted.values())
    ours = rendered(family.pipe, family)
    path = save_lora_file(tmp_path / "a.safetensors", family, adapted, {"ss_output_name": "a"})
    with safe_open(str(path), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    modules = {k.removesuffix(".lora_A.weight") for k in keys if k.endswith(".lora_A.weight")}
    assert keys == {f"{m}.lora_{x}.weight" for m in modules for x in "AB"}  # no alpha keys
    assert "diffusion_model.double_blocks.1.txt_attn.qkv" in modules
    assert "diffusion_model.single_blocks.0.linear1" in modules
    assert ("diffusion_model.double_blocks.0.img_mlp.2" in modules) == (targets != "attention")
    modulation = "diffusion_model.double_stream_modulation_img.lin"
    assert (modulation in modules) == (targets == "full")
    assert metadata["ss_base_model_version"] == "flux2_klein_4b"
    assert run_inspect(path)[1:3] == ["format: comfyui", "family: flux2"]

    # The fused qkv: downs stacked, the up block-diagonal; diffusers' converter gives each of
    # q, k and v the whole down and its rows of the up, so B_q @ A is our q's delta exactly.
    down, up = fused_pairs(path, "diffusion_model.double_blocks.0.img_attn.qkv")
    assert down.shape == (12, 32) and up.shape == (96, 12)
    assert up[:32, 4:].abs().sum() == 0 and up[32:64, :4].abs().sum() == 0
    converted = _convert_non_diffusers_flux2_lora_to_diffusers(dict(load_file(path)))
    attention = family.unet.transformer_blocks[0].attn
    for member in ("to_q", "to_k", "to_v"):
        layer = getattr(attention, member)
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        key = f"transformer.transformer_blocks.0.attn.{member}"
        theirs = converted[f"{key}.lora_B.weight"] @ converted[f"{key}.lora_A.weight"]
        assert torch.allclose(theirs, delta * layer.scaling["default"], atol=1e-6)

    members = {"qkv": 3}  # diffusers' modules each fused name stands for
    count = sum(members.get(m.rpartition(".")[2], 1) for m in modules)
    exported = tmp_path / "diffusers.safetensors"
    with pytest.raises(UserError, match="fused module has 96 output rows, the model's 9216"):
        run_export(path, "diffusers", exported, model=None)  # named on the real klein 4B
    run_export(path, "diffusers", exported, model=str(tiny_model_path("flux2")))
    for source in (path, exported):
        pipe = fresh(tiny_model_path("flux2"))
        pipe.load_lora_weights(str(source))
        layers = [m for m in pipe.transformer.modules() if isinstance(m, LoraLayer)]
        assert len(layers) == count
        assert np.abs(rendered(pipe, family) - ours).max() < 1e-4
    assert np.abs(base_image - ours).max() > 1e-2
    sampled = load_family("tiny:flux2")  # what `stylelora sample` and `merge` do with it
    apply_adapter(sampled, path, 1.0)
    assert np.abs(rendered(sampled.pipe, sampled) - ours).max() < 1e-4

    resized = tmp_path / "resized.safetensors"
    run_resize(path, 2, None, resized)
    assert all(k.startswith("diffusion_model.") for k in load_file(resized))
    with pytest.raises(UserError, match="use --format comfyui"):
        run_export(path, "kohya", tmp_path / "k.safetensors", model=None)


def test_dev_adapters_train_render_in_diffusers_and_are_refused_by_klein(tmp_path, dev_folder):
    """A dev adapter (Mistral3 text, guidance embedding) is read by diffusers' loader into
    Flux2Pipeline with our image; a klein model refuses it in one line."""
    family = load_family(str(dev_folder))
    assert (family.base_version, family.modelspec_architecture) == ("flux2_dev", "flux-2-dev")
    adapted = inject_adapters(family, AdapterConfig(rank=4, unet_targets="attn-mlp"))
    randomise_up_weights(adapted.values())
    ours = rendered(family.pipe, family)
    path = save_lora_file(tmp_path / "dev.safetensors", family, adapted, {})
    pipe = fresh(dev_folder)
    pipe.load_lora_weights(str(path))
    assert np.abs(rendered(pipe, family) - ours).max() < 1e-4
    with pytest.raises(UserError, match="trained for flux2_dev, but the model is flux2 \\(flux2"):
        apply_adapter(load_family("tiny:flux2"), path, 1.0)


def bfl_vae(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The VAE in BFL's names: LDM's, the quant convolutions inside the encoder and decoder."""
    moved = {"quant_conv.": "encoder.quant_conv.", "post_quant_conv.": "decoder.post_quant_conv."}
    out = {}
    for key, value in vae_state(vae).items():
        if key == "bn.num_batches_tracked":
            continue  # a counter some files leave out
        for ours, bfl in moved.items():
            key = bfl + key.removeprefix(ours) if key.startswith(ours) else key
        out[key] = value
    return out


def without_weights(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    for weights in folder.glob("*/*.safetensors"):
        weights.unlink()
    return folder


def save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_the_klein_files_users_hold_load_and_merge_writes_bfls_layout(tmp_path):
    """BFL's transformer file under ComfyUI's prefix, BFL's VAE file and Qwen3 with
    `model.layers...` names (no lm_head, as ComfyUI keeps it), beside a config folder without
    weights: the same pipeline, the same image; merge writes BFL's layout, which diffusers'
    converter reads back exactly."""
    family = load_family("tiny:flux2")
    expected = rendered(family.pipe, family)
    state = family.unet.state_dict()
    original = to_bfl(state)
    assert original["double_blocks.0.img_attn.qkv.weight"].shape == (96, 32)
    back = convert_flux2_transformer_checkpoint_to_diffusers(dict(original))
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())

    files = tmp_path / "files"
    files.mkdir()
    prefixed = {f"model.diffusion_model.{k}": v for k, v in original.items()}
    transformer = save(prefixed, files / "flux-2-klein-4b.safetensors")
    encoder = {k: v for k, v in family.pipe.text_encoder.state_dict().items() if "lm_head" not in k}
    parts = {
        "vae": save(bfl_vae(family.vae), files / "flux2-vae.safetensors"),
        "text_encoder": save(encoder, files / "qwen_3_4b.safetensors"),
    }
    configs = without_weights(tiny_model_path("flux2"), tmp_path / "configs")
    with pytest.raises(UserError, match="holds Flux.2's transformer only; set vae to your VAE"):
        load_family(str(transformer), config=str(configs))
    loaded = load_family(str(transformer), config=str(configs), parts=parts)
    assert (
        isinstance(loaded, Flux2) and loaded.base_version == "flux2_klein_4b" and loaded.distilled
    )
    assert np.abs(rendered(loaded.pipe, loaded) - expected).max() < 1e-5

    adapted = inject_adapters(family, AdapterConfig(rank=4, unet_targets="attn-mlp"))
    randomise_up_weights(adapted.values())
    ours = rendered(family.pipe, family)
    adapter = save_lora_file(tmp_path / "a.safetensors", family, adapted, {})
    merged = tmp_path / "merged.safetensors"
    run_merge(str(tiny_model_path("flux2")), [f"{adapter}:1.0"], merged, "fp32")
    assert "single_stream_modulation.lin.weight" in load_file(merged)
    again = load_family(str(merged), config=str(tiny_model_path("flux2")))
    assert np.abs(rendered(again.pipe, again) - ours).max() < 1e-4


def test_the_dev_files_users_hold_load_with_comfyuis_pruned_mistral(tmp_path, dev_folder):
    """dev's transformer in diffusers' names, its VAE as a diffusers folder (or a diffusers-named
    file), and Mistral3 as ComfyUI prunes it (`model.layers.N` of the language model only, no
    vision tower, the layers after the last one read dropped): the same image."""
    family = load_family(str(dev_folder))
    expected = rendered(family.pipe, family)
    files = tmp_path / "files"
    files.mkdir()
    transformer = save(family.unet.state_dict(), files / "flux2-dev.safetensors")
    language = family.pipe.text_encoder.model.language_model.state_dict()
    pruned = {
        f"model.{k}": v
        for k, v in language.items()
        if not k.startswith("layers.") or int(k.split(".")[1]) < 30
    }
    parts = {
        "vae": dev_folder / "vae",  # a diffusers folder
        "text_encoder": save(pruned, files / "mistral_3_small_flux2_bf16.safetensors"),
    }
    configs = without_weights(dev_folder, tmp_path / "configs")
    loaded = load_family(str(transformer), config=str(configs), parts=parts)
    vae = load_vae_file(
        save(family.vae.state_dict(), files / "vae.safetensors"), torch.float32, configs
    )
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in family.vae.state_dict().items())
    assert isinstance(loaded.pipe, Flux2Pipeline) and loaded.base_version == "flux2_dev"
    encoder = loaded.pipe.text_encoder
    assert encoder.config.text_config.num_hidden_layers == 30
    assert encoder.lm_head.weight is encoder.model.language_model.embed_tokens.weight  # no head
    assert np.abs(rendered(loaded.pipe, loaded) - expected).max() < 1e-5
    back = convert_flux2_transformer_checkpoint_to_diffusers(dict(loaded.single_file_state()))
    assert all(torch.equal(back[k], v) for k, v in family.unet.state_dict().items())


def test_previews_guide_as_each_variant_samples(dev_folder):
    """dev: the embedded guidance, no negative prompt (its pipeline takes none); distilled
    klein: no CFG (1.0, which its pipeline ignores); base klein: true CFG against the negative
    prompt, encoded as the pipeline encodes its empty one."""
    dev = load_family(str(dev_folder))
    assert dev.pipeline_guidance_kwargs(4.0) == {"guidance_scale": 4.0}
    assert dev.pipeline_text_kwargs("a", "ugly", (32, 32)) == {
        "prompt": "a",
        "max_sequence_length": 512,
    }
    klein = load_family("tiny:flux2")
    assert klein.pipeline_guidance_kwargs(4.0) == {"guidance_scale": 1.0}
    klein.pipe.register_to_config(is_distilled=False)  # klein base
    assert not klein.distilled and klein.pipeline_guidance_kwargs(4.0) == {"guidance_scale": 4.0}
    text = klein.pipeline_text_kwargs("a", "ugly", (32, 32))
    empty = klein.pipe.encode_prompt("", device=torch.device("cpu"))[0]
    assert text["negative_prompt_embeds"].shape == empty.shape
    plain = rendered(klein.pipe, klein)
    negative = SamplePrompt(**{**PROMPT.__dict__, "negative_prompt": "ugly"})
    guided = render(klein.pipe, negative, output_type="np", family=klein)
    assert np.abs(guided - plain).max() > 1e-3


def test_flux1_and_flux2_files_are_each_claimed_once():
    flux2 = list(to_bfl(load_family("tiny:flux2").unet.state_dict()))
    flux1 = list(load_family("tiny:flux").single_file_state())
    assert is_flux2_transformer(flux2) and not is_bfl_transformer(flux2)
    assert is_bfl_transformer(flux1) and not is_flux2_transformer(flux1)


def test_what_a_flux2_model_does_not_take_is_one_line():
    family = load_family("tiny:flux2")
    with pytest.raises(UserError, match="Flux.2's attention is joint"):
        family.denoiser_targets(AdapterConfig(unet_targets="cross-attn"))
    with pytest.raises(UserError, match="a Flux.2 model's text encoder takes no adapter"):
        inject_adapters(family, AdapterConfig(text_encoder=True, unet_targets="attention"))
    with pytest.raises(UserError, match="adapter.type = 'loha': flux2's kohya layout fuses"):
        inject_adapters(family, AdapterConfig(type="loha", unet_targets="attention"))
    with pytest.raises(UserError, match="double_block_indices: block 2 does not exist; .* 0 to 1"):
        family.denoiser_targets(AdapterConfig(unet_targets="full", double_block_indices=[2]))
    with pytest.raises(UserError, match="t5_max_length: a setting of Flux.1 models; a Flux.2"):
        load_family("tiny:flux2", settings={"t5_max_length": 64})
    with pytest.raises(UserError, match="max_sequence_length = 600: Flux.2 encodes .* 512"):
        load_family("tiny:flux2", settings={"max_sequence_length": 600})
    with pytest.raises(UserError, match="block-wise rates and dims"):
        family.kohya_blocks()
    single = family.denoiser_targets(AdapterConfig(unet_targets="full", train_blocks="single"))
    linears = ("to_qkv_mlp_proj", "to_out")
    blocks = [f"single_transformer_blocks.{i}.attn.{m}" for i in (0, 1) for m in linears]
    assert single.main == [*blocks, "single_stream_modulation.linear"]


def test_tiny_flux2_trains_with_cached_text_and_previews(demo_subset, tmp_path):
    """Two steps through the real trainer: captions cached (each padded to the model's
    length, as the pipeline pads), batch 2, previews by the pipeline's own sampler, the file
    in ComfyUI's layout."""
    cfg = training_config(
        tmp_path,
        "tiny:flux2",
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
    assert keys and all(k.startswith("diffusion_model.") for k in keys)
    assert any(k.startswith("diffusion_model.double_blocks.") for k in keys)
    assert metadata["ss_base_model_version"] == "flux2_klein_4b"
    assert metadata["modelspec.architecture"] == "flux-2-klein-4b/lora"


# Published sizes: FLUX.2 dev's 32 B transformer with Mistral Small 3.1's 24 B (its Pixtral
# vision tower included), klein 4B (Qwen3-4B) and 9B (Qwen3-8B); one 84 M VAE.
REAL_SIZES = {
    "black-forest-labs/FLUX.2-dev": (32_223_281_152, 24_011_361_280),
    "black-forest-labs/FLUX.2-klein-4B": (3_875_544_576, 4_022_468_096),
    "black-forest-labs/FLUX.2-klein-base-9B": (9_078_581_248, 8_190_735_360),
}


@pytest.mark.parametrize("model", sorted(REAL_SIZES))
def test_the_real_architectures_on_the_meta_device(model):
    """The bundled configs have the published sizes; the released file's layout is the one
    diffusers' converter reads; the adapter names are BFL's."""
    family = Flux2.variant_on_meta_device(model)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    transformer, encoder = REAL_SIZES[model]
    assert (count(family.unet), count(family.pipe.text_encoder)) == (transformer, encoder)
    assert count(family.vae) == 84_046_115
    state = family.unet.state_dict()
    original = to_bfl(state)
    width = family.unet.config.num_attention_heads * 128
    assert original["double_blocks.4.img_attn.qkv.weight"].shape == (3 * width, width)
    assert original["single_blocks.0.linear1.weight"].shape == (9 * width, width)
    assert convert_flux2_transformer_checkpoint_to_diffusers(original).keys() == state.keys()
    blocks = family.unet.config.num_layers + family.unet.config.num_single_layers
    assert len(family.swappable_blocks()) == blocks
    name, members = family.file_module("lora_unet", "transformer_blocks.3.attn.add_v_proj")
    assert name == "diffusion_model.double_blocks.3.txt_attn.qkv"
    assert members[2] == "transformer_blocks.3.attn.add_v_proj"


def adapted_on_meta(variant: str, preset: str) -> Flux2:
    """A real architecture on the meta device with adapters of random real weights."""
    family = Flux2.variant_on_meta_device(variant)
    family.pipe.vae = torch.nn.Identity()  # the names need no VAE; injection freezes one
    inject_adapters(family, AdapterConfig(rank=2, alpha=1.0, unet_targets=preset))
    generator = torch.Generator().manual_seed(0)
    for module in family.unet.modules():
        for part in ("lora_A", "lora_B"):
            if hasattr(module, part) and "default" in getattr(module, part):
                layer = getattr(module, part)["default"].to_empty(device="cpu")
                with torch.no_grad():
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
    return family


def test_a_klein_9b_adapter_exports_to_diffusers_named_on_its_own_architecture(tmp_path):
    """`export --format diffusers` without --model names a klein 9B file's modules on klein
    9B's architecture (its base version says which), splitting each fused qkv by its widths."""
    family = adapted_on_meta("klein_9b", "attention")
    tensors = file_layout(peft_to_kohya(family.unet, "lora_unet", family.file_module))
    path = tmp_path / "klein9b.safetensors"
    write_lora_tensors(path, tensors, family.metadata())
    exported = tmp_path / "diffusers.safetensors"
    run_export(path, "diffusers", exported, model=None)
    keys = load_file(exported)
    assert keys["transformer.transformer_blocks.7.attn.add_v_proj.lora_B.weight"].shape == (4096, 6)
    assert len(keys) == 2 * (8 * 8 + 24 * 2)  # every member of every fused module


# The modulations the blocks of a kind share, BFL's names (`full` adapts them).
MODULATIONS = ("double_stream_modulation_img", "double_stream_modulation_txt")
MODULATIONS += ("single_stream_modulation",)


def real_names(preset: str, double: int = 8, single: int = 48) -> set[str]:
    """ComfyUI's names of FLUX.2 dev's adapted modules (8 double, 48 single blocks): BFL's."""
    attention = ["img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj"]
    mlp = ["img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2"]
    inner = attention + (mlp if preset != "attention" else [])
    names = {f"double_blocks.{i}.{m}" for i in range(double) for m in inner}
    names |= {f"single_blocks.{i}.{m}" for i in range(single) for m in ("linear1", "linear2")}
    if preset == "full":
        names |= {f"{m}.lin" for m in MODULATIONS}
    return {f"diffusion_model.{name}" for name in names}


@pytest.mark.parametrize("preset", ["attention", "attn-mlp", "full"])
def test_real_dev_names_are_bfls_and_diffusers_reads_every_key(preset):
    """On FLUX.2 dev's architecture (meta device): the exported names are BFL's, and diffusers'
    Flux.2 converter turns every key of the file into a LoRA of the right shape on a module of
    the model (the modulations of `full` included)."""
    family = adapted_on_meta("dev", preset)
    tensors = file_layout(peft_to_kohya(family.unet, "lora_unet", family.file_module))
    assert {k.rsplit(".", 2)[0] for k in tensors} == real_names(preset)
    converted = _convert_non_diffusers_flux2_lora_to_diffusers(dict(tensors))
    modules = dict(family.unet.named_modules())
    for key, value in converted.items():
        path, _, part = key.removeprefix("transformer.").rpartition(".lora_")
        base = getattr(modules[path], "base_layer", modules[path])
        expected = base.in_features if part.startswith("A") else base.out_features
        assert value.shape[1 if part.startswith("A") else 0] == expected, key
    adapted = {n for n, m in family.unet.named_modules() if isinstance(m, LoraLayer)}
    assert {k.removeprefix("transformer.").rpartition(".lora_")[0] for k in converted} == adapted
