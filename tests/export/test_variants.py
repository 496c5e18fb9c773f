"""Target presets, LoCon, DoRA and dropout: each exported file renders what our model renders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lora_helpers import adapted_family, fresh_pipe, max_diff, rendered
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from stylelora.adapters.state import read_adapter
from stylelora.export.apply import add_into_weights
from stylelora.export.lora_file import save_lora_file
from stylelora.families import detect_family

FAMILIES = ["sd15", "sd2", "sdxl"]
# cross-attn on every family is test_interop's; kohya's presets on every family, attention once.
CASES = [(t, p) for t in FAMILIES for p in ("attn-mlp", "full")] + [("sd2", "attention")]


@pytest.mark.parametrize(("tiny", "preset"), CASES)
def test_every_preset_renders_the_same_image_through_diffusers(tmp_path, tiny, preset):
    wide = preset in ("attn-mlp", "full")
    family, adapted = adapted_family(
        tiny,
        rank=4,
        alpha=2.0,
        unet_targets=preset,
        conv_rank=2,
        conv_alpha=3.0,
        text_encoder=True,
        text_encoder_targets="attn-mlp" if wide else "attention",
    )
    ours = rendered(family.pipe)
    path = save_lora_file(tmp_path / "a.safetensors", family, adapted, {})

    fresh = fresh_pipe(tiny)
    base = rendered(fresh)
    fresh.load_lora_weights(str(path))
    assert max_diff(ours, rendered(fresh)) < 1e-4
    assert max_diff(ours, base) > 1e-2

    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
        downs = {k: handle.get_tensor(k) for k in keys if k.endswith("lora_down.weight")}
        alphas = {k: handle.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    n_peft = sum(isinstance(m, LoraLayer) for c in adapted.values() for m in c.modules())
    assert len(downs) == len(alphas) == n_peft
    convs = {k for k, v in downs.items() if v.dim() == 4 and v.shape[-1] == 3}
    assert bool(convs) == (preset == "full")
    assert all(downs[k].shape[0] == 2 for k in convs)
    assert all(alphas[k.replace("lora_down.weight", "alpha")] == 3.0 for k in convs)
    assert all(v.shape[0] == 4 for k, v in downs.items() if k not in convs)
    assert any("_mlp_fc1" in k for k in keys) == wide
    assert any("_ff_net_2" in k for k in keys) == wide


def column_dora_weight(weight, delta, magnitude):
    """DoRA written from its formula, magnitude per input column: m * V / ||V||_col."""
    combined = weight + delta
    flat = combined.transpose(0, 1).reshape(combined.shape[1], -1)
    norm = flat.norm(dim=1).reshape(1, -1, *([1] * (weight.dim() - 2)))
    return magnitude.reshape(norm.shape) * combined / norm


def automatic1111_weight(weight, up, down, alpha, dora_scale, multiplier=1.0):
    """AUTOMATIC1111's network_lora + NetworkModule.finalize_updown/apply_weight_decompose."""
    updown = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    merged = updown + weight
    norm = (
        merged.transpose(0, 1)
        .reshape(merged.shape[1], -1)
        .norm(dim=1, keepdim=True)
        .reshape(merged.shape[1], *[1] * (weight.dim() - 1))
        .transpose(0, 1)
    )
    updown = merged * (dora_scale / norm) - weight
    return weight + updown * (alpha / down.shape[0]) * multiplier


def test_dora_layers_compute_the_dora_formula():
    family, adapted = adapted_family("sd15", rank=4, alpha=2.0, unet_targets="full", use_dora=True)
    layers = [m for m in family.unet.modules() if isinstance(m, LoraLayer)]
    assert any(isinstance(m.get_base_layer(), torch.nn.Conv2d) for m in layers)
    worst = 0.0
    with torch.no_grad():
        for layer in layers:
            base = layer.get_base_layer()
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            delta = (b.flatten(1) @ a.flatten(1)).reshape(base.weight.shape)
            delta = delta * layer.scaling["default"]
            magnitude = layer.lora_magnitude_vector["default"].weight
            expected_w = column_dora_weight(base.weight, delta, magnitude)
            if isinstance(base, torch.nn.Conv2d):
                x = torch.randn(2, base.in_channels, 8, 8)
                expected = F.conv2d(x, expected_w, base.bias, base.stride, base.padding)
            else:
                x = torch.randn(2, 5, base.in_features)
                expected = F.linear(x, expected_w, base.bias)
            worst = max(worst, (layer(x) - expected).abs().max().item())
    assert worst < 1e-4


@pytest.mark.parametrize("tiny", ["sd15", "sdxl"])
def test_dora_file_renders_our_image_and_the_uis_formula(tmp_path, tiny):
    family, adapted = adapted_family(
        tiny, rank=4, alpha=2.0, unet_targets="full", use_dora=True, text_encoder=True
    )
    ours = rendered(family.pipe)
    path = save_lora_file(tmp_path / "dora.safetensors", family, adapted, {})
    adapter = read_adapter(path)
    assert adapter.is_dora
    for module in adapter.modules.values():  # (1, in) or (1, in, 1, 1): the UIs' orientation
        expected = (1, module.down.shape[1]) + (1, 1) * (module.down.dim() == 4)
        assert tuple(module.dora_scale.shape) == expected
        assert module.alpha == module.rank

    fresh = fresh_pipe(tiny)
    fresh_family = detect_family(fresh)
    originals = {k: v.clone() for k, v in fresh.unet.state_dict().items()}
    add_into_weights(fresh_family, adapter, 1.0, str(path))
    assert max_diff(ours, rendered(fresh)) < 1e-4

    # The same weights from AUTOMATIC1111's formula, module by module (UNet).
    from stylelora.export.names import family_targets

    targets = family_targets(fresh_family)
    for name, module in adapter.modules.items():
        target = targets[name]
        if target.component != "unet":
            continue
        scale = module.dora_scale.reshape(1, -1, *([1] * (module.down.dim() - 2)))
        a1111 = automatic1111_weight(
            originals[f"{target.path}.weight"], module.up, module.down, module.alpha, scale
        )
        assert (a1111 - target.module.weight).abs().max() < 1e-5

    # diffusers drops dora_scale (with a warning): the file loads there as plain LoRA.
    plain = fresh_pipe(tiny)
    plain.load_lora_weights(str(path))
    assert max_diff(ours, rendered(plain)) > 1e-3


def test_training_with_dora_locon_and_module_dropout_writes_a_working_file(
    tiny_sd15_dir, demo_subset, tmp_path
):
    """The trainer runs with every variant on, and its file carries them."""
    from conftest import training_config

    from stylelora.sample.adapter import apply_adapter
    from stylelora.train.trainer import train

    cfg = training_config(
        tmp_path,
        tiny_sd15_dir,
        demo_subset(4),
        "train.max_steps=3",
        "train.gradient_checkpointing=true",
        "sample.every_n_steps=0",
        "adapter.unet_targets='full'",
        "adapter.use_dora=true",
        "adapter.module_dropout=0.3",
        "adapter.dropout=0.1",
        "adapter.conv_rank=2",
    )
    cfg.sample.prompts = []
    result = train(cfg)
    adapter = read_adapter(result.adapter_path)
    assert adapter.is_dora
    assert {m.rank for m in adapter.modules.values()} == {2, cfg.adapter.rank}
    assert '"dora_wd": true' in adapter.metadata["ss_network_args"]
    family = detect_family(fresh_pipe("sd15"))
    base = rendered(family.pipe)
    apply_adapter(family, result.adapter_path, 1.0)
    assert max_diff(rendered(family.pipe), base) > 1e-4
