"""Flux adapters across layouts and through the adapter tools, on the tiny Flux built here.

diffusers' and PEFT's split q/k/v adapters are converted to kohya's fused modules (qkv, linear1),
and resize, combine and inspect read and write kohya's Flux files. Each result is rendered by
diffusers' own `load_lora_weights` where diffusers can read it (its kohya-Flux converter splits
linear1 at Flux.1's real widths only, so a tiny file's single blocks are not), else by the UIs'
formula on the fused weights (export/apply.py, what `stylelora sample` does with Flux files).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import load_file, save_file

from stylelora.adapters.inject import inject_adapters
from stylelora.adapters.state import read_adapter
from stylelora.cli import main
from stylelora.config import AdapterConfig
from stylelora.errors import UserError
from stylelora.export.convert import by_component
from stylelora.export.inspect import inspect_file
from stylelora.export.lora_file import save_lora_file
from stylelora.export.tools import run_export
from stylelora.families import load_family
from stylelora.families.tiny import tiny_model_path
from stylelora.sample.adapter import apply_adapter
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import render

PROMPT = SamplePrompt("zqxstyle, a fish", width=64, height=64, seed=3, steps=3, guidance_scale=3.5)
TINY = str(tiny_model_path("flux"))
DOUBLE, SINGLE = "transformer_blocks.0.", "single_transformer_blocks.0."
# Fused modules with a member left out (the image stream's to_v, the single block's to_k),
# members of different ranks and alphas, and unfused ones.
DOUBLE_TARGETS = [
    DOUBLE + m
    for m in ("attn.to_q", "attn.to_k", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
              "attn.to_out.0", "ff.net.0.proj")
]  # fmt: skip
SINGLE_TARGETS = [SINGLE + m for m in ("attn.to_q", "attn.to_v", "proj_mlp", "proj_out")]
RANKS = {DOUBLE + "attn.to_k": 2, DOUBLE + "attn.add_v_proj": 6, SINGLE + "proj_mlp": 3}
ALPHAS = {DOUBLE + "attn.add_k_proj": 8.0, SINGLE + "attn.to_v": 1.0}
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def rendered(pipe) -> np.ndarray:
    return render(pipe, PROMPT, output_type="np")


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def fresh_pipe() -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(TINY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randomise_ups(models, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.5 * torch.randn(param.shape, generator=generator))


def trained_elsewhere(folder: Path, targets: list[str], seed: int = 0):
    """A Flux adapter as diffusers' train_dreambooth_lora_flux.py saves it (PEFT on the
    transformer and CLIP, `FluxPipeline.save_lora_weights` with their configs), the same as a
    PEFT folder (`transformer/adapter_config.json` ...), and the image the adapted pipe renders."""
    pipe = fresh_pipe()
    torch.manual_seed(seed)  # PEFT draws the downs from the global RNG
    configs = {
        "transformer": LoraConfig(
            r=4,
            lora_alpha=2.0,
            target_modules=targets,
            rank_pattern={k: v for k, v in RANKS.items() if k in targets},
            alpha_pattern={k: v for k, v in ALPHAS.items() if k in targets},
        ),
        "text_encoder": LoraConfig(r=2, lora_alpha=4.0, target_modules=TEXT_TARGETS),
    }
    states = {}
    for component, config in configs.items():
        inject_adapter_in_model(config, getattr(pipe, component))
        randomise_ups([getattr(pipe, component)], seed)
        states[component] = get_peft_model_state_dict(getattr(pipe, component))
        peft_folder = folder / "peft" / component
        config.save_pretrained(peft_folder)
        tensors = {f"base_model.model.{k}": v for k, v in states[component].items()}
        save_file(tensors, peft_folder / "adapter_model.safetensors")
    FluxPipeline.save_lora_weights(
        folder,
        weight_name="diffusers.safetensors",
        transformer_lora_layers=states["transformer"],
        text_encoder_lora_layers=states["text_encoder"],
        transformer_lora_adapter_metadata=configs["transformer"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
    )
    return folder / "diffusers.safetensors", folder / "peft", rendered(pipe)


def expected_deltas(diffusers_file: Path) -> dict[str, torch.Tensor]:
    """Each module's alpha / rank * B @ A, from the file's own tensors and the configs above."""
    tensors = load_file(diffusers_file)
    deltas = {}
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        module = key.removesuffix(".lora_A.weight")
        down, up = tensors[key], tensors[f"{module}.lora_B.weight"]
        component, _, path = module.partition(".")
        default = 2.0 if component == "transformer" else 4.0
        deltas[module] = ALPHAS.get(path, default) / down.shape[0] * up @ down
    return deltas


def export(source: Path, out: Path, fmt: str = "kohya") -> Path:
    assert main(["export", str(source), "--model", TINY, "--format", fmt, "--out", str(out)]) == 0
    return out


def test_diffusers_flux_adapter_to_kohya_renders_the_same_in_diffusers(tmp_path):
    """Double blocks and CLIP (what diffusers reads of a tiny kohya Flux file): the kohya file
    loaded by diffusers' own loader renders as the diffusers file does, and splitting it back
    gives each original module's product."""
    source, _, ours = trained_elsewhere(tmp_path, DOUBLE_TARGETS)
    pipe = fresh_pipe()
    pipe.load_lora_weights(str(source))
    as_diffusers = rendered(pipe)
    assert max_diff(as_diffusers, ours) < 1e-4
    assert max_diff(as_diffusers, rendered(fresh_pipe())) > 1e-2

    kohya = export(source, tmp_path / "kohya.safetensors")
    tensors = load_file(kohya)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    up = tensors[f"{qkv}.lora_up.weight"]
    assert up.shape == (96, 4 + 2)  # to_q's rank 4, to_k's 2, no to_v
    assert not up[64:].any() and not up[:32, 4:].any() and not up[32:64, :4].any()
    assert tensors[f"{qkv}.alpha"].item() == 6.0
    assert tensors["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"].shape[0] == 14
    assert read_adapter(kohya).metadata["ss_base_model_version"] == "flux1"
    pipe = fresh_pipe()
    pipe.load_lora_weights(str(kohya))
    assert max_diff(rendered(pipe), as_diffusers) < 1e-4

    split = by_component(read_adapter(kohya), load_family(TINY), str(kohya))
    products = {
        f"{component}.{path}": module.delta()
        for component, modules in split.items()
        for path, module in modules.items()
    }
    expected = expected_deltas(source)
    for module, delta in expected.items():
        assert torch.allclose(products.pop(module), delta, atol=1e-6), module
    assert set(products) == {"transformer." + DOUBLE + "attn.to_v"}  # the zero rows
    assert not products["transformer." + DOUBLE + "attn.to_v"].any()


def test_peft_flux_folder_fuses_linear1_as_the_uis_apply_it(tmp_path):
    """Single blocks too (linear1 fuses q, k, v and the MLP input): the kohya file applied by
    the UIs' formula renders the adapted pipe's image; the PEFT folder gives the same file."""
    source, folder, ours = trained_elsewhere(tmp_path, DOUBLE_TARGETS + SINGLE_TARGETS, seed=1)
    from_diffusers = load_file(export(source, tmp_path / "a.safetensors"))
    from_peft = load_file(export(folder, tmp_path / "b.safetensors"))
    assert from_diffusers.keys() == from_peft.keys()
    assert all(torch.equal(from_diffusers[k], from_peft[k]) for k in from_peft)
    up = from_peft["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert up.shape == (3 * 32 + 128, 4 + 4 + 3) and not up[32:64].any()  # no to_k

    family = load_family(TINY)
    apply_adapter(family, tmp_path / "b.safetensors", 1.0)
    assert max_diff(rendered(family.pipe), ours) < 1e-4
    family = load_family(TINY)  # `stylelora sample --adapter <PEFT folder>`
    apply_adapter(family, folder, 1.0)
    assert max_diff(rendered(family.pipe), ours) < 1e-4


def test_bad_flux_conversions_are_one_line_errors(tmp_path):
    source, _, _ = trained_elsewhere(tmp_path, [DOUBLE + "attn.to_q", DOUBLE + "attn.to_k"])
    out = tmp_path / "k.safetensors"
    with pytest.raises(UserError) as caught:  # named on the real Flux.1's 3072 widths
        run_export(source, "kohya", out, model=None)
    message = str(caught.value)
    assert str(source) in message and "pass --model" in message and "\n" not in message

    tensors = load_file(source)
    tensors["transformer.norm_out.norm.lora_A.weight"] = torch.zeros(2, 32)
    tensors["transformer.norm_out.norm.lora_B.weight"] = torch.zeros(32, 2)
    stray = tmp_path / "stray.safetensors"
    save_file(tensors, stray)
    with pytest.raises(UserError, match=r"stray.safetensors: transformer.norm_out.norm is not"):
        run_export(stray, "kohya", out, model=TINY)
    assert not out.exists()


def test_a_file_without_configs_is_read_with_alpha_rank(tmp_path):
    """ai-toolkit writes no LoraConfig: alpha = rank, so the fused ups are the B's as they are."""
    source, _, _ = trained_elsewhere(tmp_path, [DOUBLE + "attn.to_q", DOUBLE + "attn.to_v"])
    tensors = load_file(source)
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, bare)
    fused = load_file(export(bare, tmp_path / "k.safetensors"))
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    ups = [tensors[f"transformer.{DOUBLE}attn.to_{m}.lora_B.weight"] for m in "qv"]
    expected = torch.block_diag(ups[0], torch.zeros(32, 0), ups[1])
    assert torch.equal(fused[f"{qkv}.lora_up.weight"], expected)
    assert fused[f"{qkv}.alpha"].item() == 8.0


def kohya_file(path: Path, seed: int, blocks: str, **options):
    """A kohya Flux file from our exporter (random non-zero ups) and the image it renders."""
    family = load_family(TINY)
    torch.manual_seed(seed)
    config = AdapterConfig(train_blocks=blocks, text_encoder=True, **options)
    adapted = inject_adapters(family, config)
    randomise_ups(adapted.values(), seed)
    save_lora_file(path, family, adapted, {"ss_output_name": path.stem})
    return path, rendered(family.pipe)


def with_adapters(blocks: str, weighted: list[tuple[Path, float]]) -> np.ndarray:
    """What these files render at these weights: loaded together by diffusers (double blocks
    only), else each added in turn by the UIs' formula."""
    if blocks == "double":
        pipe = fresh_pipe()
        for index, (path, _) in enumerate(weighted):
            pipe.load_lora_weights(str(path), adapter_name=f"a{index}")
        pipe.set_adapters([f"a{i}" for i in range(len(weighted))], [w for _, w in weighted])
        return rendered(pipe)
    family = load_family(TINY)
    for path, weight in weighted:
        apply_adapter(family, path, weight)
    return rendered(family.pipe)


@pytest.mark.parametrize("blocks", ["double", "all"])
def test_resize_of_fused_modules(tmp_path, blocks):
    """Resizing to the largest fused rank (linear1: 4 x 4) keeps every delta and the image; a
    smaller rank is the SVD's best approximation of the whole fused delta."""
    path, ours = kohya_file(tmp_path / "a.safetensors", 0, blocks, rank=4, alpha=2.0,
                            unet_targets="full")  # fmt: skip
    original = read_adapter(path)
    full = tmp_path / "full.safetensors"
    assert main(["resize", str(path), "--rank", "16", "--out", str(full)]) == 0
    resized = read_adapter(full)
    for name, module in original.modules.items():
        assert torch.allclose(resized.modules[name].delta(), module.delta(), atol=1e-5), name
    assert max_diff(with_adapters(blocks, [(full, 1.0)]), ours) < 1e-4

    small = tmp_path / "small.safetensors"
    assert main(["resize", str(path), "--rank", "5", "--out", str(small)]) == 0
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    singular = torch.linalg.svdvals(original.modules[qkv].delta().double())
    error = (read_adapter(small).modules[qkv].delta() - original.modules[qkv].delta()).norm()
    assert error.item() == pytest.approx(singular[5:].norm().item(), rel=1e-4)
    assert max_diff(with_adapters(blocks, [(small, 1.0)]), ours) > 1e-4


@pytest.mark.parametrize("blocks", ["double", "all"])
def test_combine_of_fused_modules_is_loading_both(tmp_path, blocks):
    a, _ = kohya_file(tmp_path / "a.safetensors", 0, blocks, rank=4, alpha=2.0,
                      unet_targets="attention")  # fmt: skip
    b, _ = kohya_file(tmp_path / "b.safetensors", 1, blocks, rank=2, alpha=4.0,
                      unet_targets="attn-mlp")  # fmt: skip
    out = tmp_path / "c.safetensors"
    assert main(["combine", f"{a}:1.0", f"{b}:0.5", "--out", str(out)]) == 0
    combined = read_adapter(out)
    assert combined.modules["lora_unet_double_blocks_0_img_attn_qkv"].rank == 3 * 4 + 3 * 2
    assert combined.metadata["ss_base_model_version"] == "flux1"
    expected = with_adapters(blocks, [(a, 1.0), (b, 0.5)])
    assert max_diff(with_adapters(blocks, [(out, 1.0)]), expected) < 1e-4
    assert max_diff(with_adapters(blocks, [(a, 1.0)]), expected) > 1e-2


def test_inspect_names_flux(tmp_path):
    path, _ = kohya_file(tmp_path / "a.safetensors", 0, "all", rank=4, unet_targets="full")
    lines = inspect_file(path)
    assert "family: flux" in lines
    kinds = next(line for line in lines if line.startswith("kinds: "))
    assert "resnet / other" not in kinds and "fused" in kinds

    tensors = load_file(path)  # no metadata: told from BFL's names
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, bare)
    assert "family: flux (told from names/shapes)" in inspect_file(bare)

    source, folder, _ = trained_elsewhere(tmp_path, DOUBLE_TARGETS)
    for other in (source, folder):
        assert "family: flux (told from names/shapes)" in inspect_file(other)
