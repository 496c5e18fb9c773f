"""Flux's memory options on the tiny model: gradient checkpointing, an NF4 base, and block
swapping. A swapped block's weights are parked as NaN here (on a GPU they wait on the CPU), so
any use of a parked weight would show; the gradients must be those of the plain model."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from stylelora.adapters.inject import inject_adapters
from stylelora.config import AdapterConfig, TrainConfig, load_config, preset_path
from stylelora.errors import UserError
from stylelora.families import load_family
from stylelora.families.objective import NoisedBatch
from stylelora.train.placement import enable_gradient_checkpointing
from stylelora.train.quantize import quantize_base
from stylelora.train.swap import BlockSwapper, check_block_swapping


def parked(tensor: torch.Tensor) -> bool:
    data = tensor.data
    return bool(data.isnan().all()) if data.is_floating_point() else bool((data == 255).all())


def adapter_gradients(
    checkpointing: bool, swap: bool, quantize: str = "no"
) -> tuple[dict, torch.Tensor]:
    """One training step's adapter gradients on a fixed batch, and the loss."""
    family = load_family("tiny:flux")
    quantize_base({"lora_unet": family.unet}, quantize, torch.float32, torch.device("cpu"))
    torch.manual_seed(0)
    adapted = inject_adapters(family, AdapterConfig(rank=4, alpha=4, unet_targets="full"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in family.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    if checkpointing:
        enable_gradient_checkpointing(adapted)
    blocks = family.swappable_blocks()
    if swap:
        swapper = BlockSwapper(blocks, torch.device("cpu"), poison=True)
        assert all(parked(p) for b in blocks for p in b.parameters() if not p.requires_grad)
    family.unet.train()
    objective = family.training_objective()
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    noise, sigmas = objective.draw(latents.shape, generator, None)
    noised = NoisedBatch(latents, noise, sigmas)
    with torch.no_grad():
        text = family.encode_prompts(["a cat", "a dog"])
    prediction = family.denoise(family.unet, objective.noisy(noised), sigmas, text, {})
    loss = torch.nn.functional.mse_loss(prediction, objective.target(noised))
    loss.backward()
    if swap:  # backward left at most the first swapped block on the device
        assert len(swapper.present) <= 1
    grads = {n: p.grad.clone() for n, p in family.unet.named_parameters() if p.requires_grad}
    return grads, loss.detach()


@pytest.mark.parametrize("quantize", ["no", "nf4"])
def test_checkpointing_and_block_swapping_give_the_plain_gradients(quantize):
    plain, plain_loss = adapter_gradients(checkpointing=False, swap=False, quantize=quantize)
    for checkpointing, swap in ((True, False), (True, True)):
        grads, loss = adapter_gradients(checkpointing, swap, quantize)
        assert torch.equal(loss, plain_loss)
        assert grads.keys() == plain.keys()
        for name, grad in grads.items():
            assert torch.allclose(grad, plain[name], atol=1e-6, rtol=1e-5), name
    assert any(g.abs().max() > 0 for g in plain.values())


def test_swapped_blocks_render_previews_and_are_parked_after():
    family = load_family("tiny:flux")
    family.unet.requires_grad_(False)  # frozen, as training leaves the base
    text = family.encode_prompts(["a cat"])
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = family.denoise(family.unet, latents, torch.tensor([0.5]), text, {})
        blocks = family.swappable_blocks()
        BlockSwapper(blocks, torch.device("cpu"), poison=True)
        swapped = family.denoise(family.unet, latents, torch.tensor([0.5]), text, {})
    assert torch.allclose(swapped, expected, atol=1e-6)  # NaN if a parked weight were used
    assert all(parked(p) for block in blocks for p in block.parameters())


def test_a_nf4_flux_base_trains(tmp_path, demo_subset):
    from conftest import training_config

    from stylelora.train.trainer import train

    cfg = training_config(
        tmp_path,
        "tiny:flux",
        demo_subset(2),
        "train.max_steps=2",
        "sample.every_n_steps=0",
        "train.log_with='none'",
        "train.quantize_base='nf4'",
        "train.gradient_checkpointing=true",
        "train.blocks_to_swap=1",
        "adapter.unet_targets='attn-mlp'",
    )
    cfg.sample.prompts = []
    import bitsandbytes as bnb

    from stylelora.train.run import build_run

    pipe = build_run(cfg).family.pipe  # the transformer and T5 quantized, but T5's wo
    assert isinstance(
        pipe.transformer.transformer_blocks[0].attn.to_q.base_layer, bnb.nn.Linear4bit
    )
    t5_block = pipe.text_encoder_2.encoder.block[0]
    assert isinstance(t5_block.layer[0].SelfAttention.q, bnb.nn.Linear4bit)
    assert type(t5_block.layer[1].DenseReluDense.wo) is torch.nn.Linear
    tensors = load_file(train(cfg).adapter_path)
    assert any(k.startswith("lora_unet_single_blocks_0_linear1") for k in tensors)
    assert any(v.abs().max() > 0 for k, v in tensors.items() if "lora_up" in k)


@pytest.mark.parametrize(
    ("settings", "available", "message"),
    [
        ({"blocks_to_swap": 2}, 0, "has no blocks to swap"),
        ({"blocks_to_swap": 57}, 57, "swap at most 56"),
        ({"blocks_to_swap": 8}, 57, "needs train.gradient_checkpointing = true"),
        (
            {"blocks_to_swap": 8, "gradient_checkpointing": True, "quantize_base": "int8"},
            57,
            'with quantize_base = "int8" use "nf4" or "no"',
        ),
    ],
)
def test_block_swapping_settings_it_cannot_work_with(settings, available, message):
    with pytest.raises(UserError, match=message):
        check_block_swapping(TrainConfig(**settings), available)
    check_block_swapping(TrainConfig(**{**settings, "blocks_to_swap": 0}), available)


def counting_family(cfg, device: str):
    """The tiny Flux, adapted and checkpointed as `cfg` says; its denoiser on `device`."""
    family = load_family("tiny:flux")
    family.configure({"t5_max_length": cfg.t5_max_length})
    adapted = inject_adapters(family, cfg.adapter)
    enable_gradient_checkpointing(adapted)
    family.unet.train()
    family.unet.to(device)
    return family


@pytest.mark.parametrize("swap", [0, 1])
def test_the_meta_count_is_what_the_cpu_allocates(swap):
    """benchmarks/preset_memory.py counts the full Flux on the meta device; on the tiny model the
    same count on real CPU tensors agrees (the CPU's flash attention allocates a little more
    in backward than the GPU kernel's meta function)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from preset_memory import count_training

    cfg = load_config(
        preset_path("flux-12gb", ROOT),
        ["data.dir='.'", "data.resolution=64", "train.batch_size=2", "t5_max_length=32",
         "adapter.rank=4", f"train.blocks_to_swap={swap}"],
    )  # fmt: skip
    cpu = count_training(counting_family(cfg, "cpu"), cfg, torch.float32, torch.device("cpu"))
    meta = count_training(counting_family(cfg, "meta"), cfg, torch.float32, torch.device("meta"))
    assert meta[1:] == cpu[1:]  # resident weights, optimizer states: the same tensors
    assert 0.9 * cpu[0] <= meta[0] <= cpu[0]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_the_quantized_stand_in_has_bitsandbytes_sizes(kind):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from preset_memory import QuantizedStandIn

    from stylelora.train.quantize import quantized_linear

    linear = torch.nn.Linear(512, 384).requires_grad_(False)
    layer = quantized_linear(linear, kind, torch.float32, torch.device("cpu"))
    if kind == "nf4":
        state = layer.weight.quant_state
        real = [layer.weight.data, state.absmax, state.state2.absmax, state.state2.code]
        real += [state.code, state.offset]
    else:
        real = [layer.weight.CB, layer.weight.SCB]
    real_bytes = sum(t.nbytes for t in real)
    stand_in = QuantizedStandIn(linear.to("meta"), kind)
    counted = sum(t.nbytes for t in [*stand_in.parameters(), *stand_in.buffers()])
    counted -= linear.bias.nbytes  # both keep the bias as it is
    # the stand-in leaves out NF4's two lookup tables (1 KiB a layer)
    assert 0 <= real_bytes - counted <= 1100


def test_t5_is_quantized_but_the_layer_it_keeps_in_full_precision():
    """transformers casts the input of T5's `wo` to that layer's dtype: quantized, the
    conditioning would be bytes. Quantization leaves `wo` alone, and T5 encodes as before."""
    family = load_family("tiny:flux")
    t5 = family.pipe.text_encoder_2
    ids = family.pipe.tokenizer_2(["a red fish"], return_tensors="pt").input_ids
    with torch.no_grad():
        before = t5(ids)[0]
        t5.requires_grad_(False)
        quantize_base({"t5": t5}, "nf4", torch.float32, torch.device("cpu"))
        after = t5(ids)[0]
    assert type(t5.encoder.block[0].layer[1].DenseReluDense.wo) is torch.nn.Linear
    assert type(t5.encoder.block[0].layer[0].SelfAttention.q) is not torch.nn.Linear
    correlation = torch.corrcoef(torch.stack([before.flatten(), after.flatten()]))[0, 1]
    assert correlation > 0.9
