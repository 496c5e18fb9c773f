"""QLoRA: adapters trained on an NF4 or int8 base, exported as a file a plain pipeline loads."""

import bitsandbytes as bnb
import pytest
import torch
from diffusers import DiffusionPipeline
from peft.tuners.lora import bnb as peft_bnb
from safetensors.torch import load_file
from tiny_runs import overfit, tiny_run

from stylelora.errors import UserError
from stylelora.export.lora_file import save_lora_file
from stylelora.train.quantize import quantize_linears

LAYERS = {
    "nf4": (bnb.nn.Linear4bit, peft_bnb.Linear4bit),
    "int8": (bnb.nn.Linear8bitLt, peft_bnb.Linear8bitLt),
}


def unet_output(pipe: DiffusionPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample


@pytest.mark.parametrize(
    ("kind", "dora"), [("nf4", False), ("int8", False), ("nf4", True), ("int8", True)]
)
def test_adapters_learn_on_a_quantized_base_and_load_into_a_plain_pipeline(
    kind, dora, tiny_sd15_dir, demo_subset, tmp_path
):
    """With DoRA too (QDoRA): its per-column norms read the dequantized base weight."""
    run = tiny_run(
        tmp_path,
        tiny_sd15_dir,
        demo_subset(2),
        f"train.quantize_base={kind!r}",
        "adapter.text_encoder=true",
        "train.learning_rate=1e-2",
        f"adapter.use_dora={str(dora).lower()}",
    )
    base_layer, lora_layer = LAYERS[kind]
    plain = [
        name
        for name, module in run.family.unet.named_modules()
        if type(module) is torch.nn.Linear and ".lora_" not in name
    ]
    assert plain == []  # every base Linear is quantized; only the adapters are not
    to_k = run.family.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    assert isinstance(to_k, lora_layer) and isinstance(to_k.base_layer, base_layer)

    losses = overfit(run, 6)
    print(kind, [round(x, 4) for x in losses])
    assert losses[-1] < 0.95 * losses[0]

    path = save_lora_file(tmp_path / "q.safetensors", run.family, run.adapted, {})
    assert any(key.endswith(".dora_scale") for key in load_file(path)) == dora
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    before = unet_output(pipe)
    pipe.load_lora_weights(str(path))
    assert pipe.get_list_adapters() == {"unet": ["default_0"], "text_encoder": ["default_0"]}
    assert not torch.allclose(unet_output(pipe), before, atol=1e-4)


def test_quantizing_keeps_the_layer_close_to_the_original():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256))
    reference = model[0].weight.detach().clone()
    x = torch.randn(8, 256)
    expected = model(x)
    quantize_linears(model, "nf4", torch.float32, torch.device("cpu"))
    assert isinstance(model[0], bnb.nn.Linear4bit) and model.is_loaded_in_4bit
    error = (model(x) - expected).norm() / expected.norm()
    assert error < 0.15  # NF4 keeps about 3 significant bits of each weight
    assert model[0].weight.numel() < reference.numel()  # packed: two weights a byte


def test_a_bitsandbytes_too_old_to_move_quantized_layers_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(bnb, "__version__", "0.45.1")
    with pytest.raises(UserError, match=r"^train.quantize_base needs bitsandbytes >= 0.48 "):
        quantize_linears(torch.nn.Sequential(torch.nn.Linear(4, 4)), "nf4", torch.float32, "cpu")
