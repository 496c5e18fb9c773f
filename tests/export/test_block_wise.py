"""Block-wise learning rates and ranks, numbered as kohya numbers a UNet's blocks."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import fresh_pipe, max_diff, randomise, rendered
from safetensors import safe_open

from stylelora.adapters.blocks import full_paths, plan_blocks, preset_weights
from stylelora.adapters.inject import adapted_module, inject_adapters
from stylelora.adapters.targets import unet_targets
from stylelora.config import AdapterConfig, TrainConfig
from stylelora.errors import UserError
from stylelora.export.lora_file import save_lora_file
from stylelora.families import load_family
from stylelora.families.sd15 import SD15
from stylelora.families.sdxl import SDXL
from stylelora.families.tiny import tiny_model_path
from stylelora.train.optim import parameter_groups


def block_of(family, path: str) -> int:
    return family.kohya_block_index(family.file_module("lora_unet", path)[0])


def test_blocks_are_numbered_as_kohya_numbers_them():
    sd15 = SD15.on_meta_device()
    assert block_of(sd15, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == 4
    assert block_of(sd15, "down_blocks.0.downsamplers.0.conv") == 3
    assert block_of(sd15, "mid_block.attentions.0.proj_in") == 12
    assert block_of(sd15, "up_blocks.3.attentions.2.proj_out") == 24
    assert block_of(sd15, "conv_in") == -1
    full = unet_targets(sd15.unet, "full")
    assert {block_of(sd15, p) for p in full.main + full.conv} == set(range(1, 25))
    sdxl = SDXL.on_meta_device()
    # diffusers' down_blocks.1.attentions.0 is the original UNet's input_blocks.4.1
    assert block_of(sdxl, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == 5
    assert block_of(sdxl, "mid_block.attentions.0.proj_in") == 11
    assert block_of(sdxl, "up_blocks.0.attentions.2.proj_out") == 15
    full = unet_targets(sdxl.unet, "full")
    assert {block_of(sdxl, p) for p in full.main + full.conv} == set(range(2, 22))


def test_kohyas_named_curves():
    assert preset_weights("linear", 12)[0] == 0.0 and preset_weights("linear", 12)[-1] == 1.0
    assert preset_weights("zeros+0.5", 3) == [0.5, 0.5, 0.5]
    assert preset_weights("cosine", 12) == list(reversed(preset_weights("sine", 12)))
    with pytest.raises(UserError, match="not a list of numbers or one of cosine"):
        preset_weights("wavy", 12)


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_block_rates_scale_each_modules_learning_rate_and_zero_leaves_it_out(kind):
    family = load_family(str(tiny_model_path("sd15")))
    adapter = AdapterConfig(type=kind, rank=4, unet_targets="attn-mlp")
    # the tiny UNet's attention blocks are 1, 12, 16 and 17; 16 falls under the threshold
    train = TrainConfig(
        learning_rate=1e-3,
        down_lr_weight=[0.0, 0.5],
        mid_lr_weight=2.0,
        up_lr_weight=[0.25, 0.25, 0.25, 0.05],
        block_lr_zero_threshold=0.1,
    )
    plan = plan_blocks(family, family.denoiser_targets(adapter), adapter, train)
    adapted = inject_adapters(family, adapter, plan)
    expected = {1: 0.5, 12: 2.0, 13: 0.25, 14: 0.25, 15: 0.25, **{b: 1.0 for b in range(17, 25)}}
    groups = parameter_groups(adapted, train, plan.lr_weights)
    lr_of = {id(p): group["lr"] for group in groups for p in group["params"]}
    seen = set()
    for name, param in family.unet.named_parameters():
        if param.requires_grad:
            block = block_of(family, adapted_module(name))
            assert lr_of[id(param)] == pytest.approx(1e-3 * expected[block]), name
            seen.add(block)
    assert seen == {1, 12, 17}  # block 16's weight is under the threshold: no adapter there
    everything = unet_targets(family.unet, "attn-mlp")
    assert any(block_of(family, p) == 16 for p in full_paths(family.unet, everything.main))
    with pytest.raises(UserError, match="train.down_lr_weight: 13 values, a sd15 UNet has 12"):
        plan_blocks(family, everything, adapter, TrainConfig(down_lr_weight=[1.0] * 13))
    with pytest.raises(UserError, match="adapter.block_dims: 23 values, a sd15 UNet has 25"):
        plan_blocks(family, everything, AdapterConfig(block_dims=[4] * 23), TrainConfig())
    with pytest.raises(UserError, match="adapter.block_alphas needs adapter.block_dims"):
        plan_blocks(family, everything, AdapterConfig(block_alphas=[4.0] * 25), TrainConfig())
    flux = load_family(str(tiny_model_path("flux")))
    with pytest.raises(UserError, match="UNets; a Flux.1 transformer has no such blocks: choose"):
        plan_blocks(flux, flux.denoiser_targets(adapter), adapter, train)


def test_block_dims_are_written_per_module_and_diffusers_renders_them(tmp_path):
    family = load_family(str(tiny_model_path("sd15")))
    dims = [0] * 25
    dims[1], dims[5], dims[12], dims[17] = 2, 3, 4, 1  # the tiny UNet's blocks vary
    alphas = [float(d or 1) * 2 for d in dims]
    adapter = AdapterConfig(rank=8, unet_targets="attn-mlp", block_dims=dims, block_alphas=alphas)
    plan = plan_blocks(family, family.denoiser_targets(adapter), adapter, TrainConfig())
    torch.manual_seed(0)
    adapted = inject_adapters(family, adapter, plan)
    randomise(adapted.values())
    ours = rendered(family.pipe)
    path = save_lora_file(tmp_path / "blocks.safetensors", family, adapted, {})
    with safe_open(path, "pt") as f:
        names = {k.split(".")[0] for k in f.keys()}  # noqa: SIM118
        assert names
        for name in names:
            block = family.kohya_block_index(name)
            rank = f.get_tensor(f"{name}.lora_down.weight").shape[0]
            assert rank == dims[block], name
            # each block's alpha folded into lora_up against adapter.alpha, which every module
            # carries (diffusers drops per-module alphas); the render below checks the scale
            assert float(f.get_tensor(f"{name}.alpha")) == adapter.alpha
    pipe = fresh_pipe("sd15")
    pipe.load_lora_weights(str(path))
    assert max_diff(rendered(pipe), ours) < 1e-4


def test_a_run_with_block_options_trains_and_records_them(tiny_sd15_dir, demo_subset, tmp_path):
    import json

    from conftest import training_config

    from stylelora.train.trainer import train

    dims = [4] * 25
    dims[12] = 2
    cfg = training_config(tmp_path, tiny_sd15_dir, demo_subset(2), "train.max_steps=2",
                          "train.up_lr_weight='zeros'", f"adapter.block_dims={dims}")  # fmt: skip
    result = train(cfg)
    with safe_open(result.adapter_path, "pt") as f:
        names = {key.split(".")[0] for key in f.keys()}  # noqa: SIM118
        args = json.loads(f.metadata()["ss_network_args"])
        mid = [n for n in names if "mid_block" in n]
        assert mid and all(f.get_tensor(f"{n}.lora_down.weight").shape[0] == 2 for n in mid)
    assert not any("up_blocks" in name for name in names)  # the up path is not trained
    assert any("down_blocks" in name for name in names)
    assert args["up_lr_weight"] == "zeros" and args["block_dims"].startswith("4,4,")
