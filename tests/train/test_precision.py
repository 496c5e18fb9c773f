"""Mixed precision, gradient checkpointing and attention: what runs in which dtype, and where
gradients reach."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from tiny_runs import adapter_tensors, overfit, tiny_run

from stylelora.errors import UserError
from stylelora.families.tiny import tiny_model_path
from stylelora.sample.preview import Previewer
from stylelora.train.placement import visiting
from stylelora.train.run import backward_pass
from stylelora.train.session import Session


def test_bf16_keeps_adapters_and_optimizer_state_in_fp32(tiny_sd15_dir, demo_subset, tmp_path):
    run = tiny_run(
        tmp_path,
        tiny_sd15_dir,
        demo_subset(2),
        "train.mixed_precision='bf16'",
        "adapter.text_encoder=true",
        "train.learning_rate=3e-3",
    )
    frozen = [p for m in run.adapted.values() for p in m.parameters() if not p.requires_grad]
    trained = [p for m in run.adapted.values() for p in m.parameters() if p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    assert {p.dtype for p in trained} == {torch.float32}
    assert run.family.vae.dtype == torch.bfloat16
    losses = overfit(run, 6)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    states = [s for s in run.optimizer.optimizer.state.values()]
    assert states and {s["exp_avg"].dtype for s in states} == {torch.float32}


def test_fp16_on_the_cpu_is_refused_in_one_line(tiny_sd15_dir, demo_subset, tmp_path):
    with pytest.raises(UserError, match=r"^train.mixed_precision = 'fp16' needs a GPU"):
        tiny_run(tmp_path, tiny_sd15_dir, demo_subset(1), "train.mixed_precision='fp16'")


def test_a_step_the_fp16_loss_scaler_skips_is_neither_taken_nor_counted_as_non_finite(
    tiny_sd15_dir, demo_subset, tmp_path
):
    """The fp16 path's loss scaling, with torch's real GradScaler, which runs on the CPU too
    (accelerate only creates one on a GPU, so the test hands it over and prepares the
    optimizer again). An infinite scale makes every scaled gradient overflow while the loss
    itself stays finite."""
    run = tiny_run(tmp_path, tiny_sd15_dir, demo_subset(2), "train.max_grad_norm=0")
    scaler = torch.amp.GradScaler("cpu", init_scale=float("inf"))
    run.accelerator.scaler = scaler
    run.optimizer = run.accelerator.prepare_optimizer(run.optimizer.optimizer)
    session = Session(run=run, previewer=None, metadata=lambda steps, epochs: {})
    batch = next(iter(run.loader))
    before = adapter_tensors(run)

    assert not session.optimizer_step(backward_pass(run, dict(batch), 0))
    assert all(torch.equal(before[n], t) for n, t in adapter_tensors(run).items())
    assert (session.guard.skipped, session.state.losses) == (0, [])

    scaler.update(2.0**16)  # as if the scale had come down from its overflow
    assert session.optimizer_step(backward_pass(run, dict(batch), 0))
    after = adapter_tensors(run)
    assert all(t.isfinite().all() for t in after.values())
    assert any(not torch.equal(before[n], t) for n, t in after.items())
    assert session.guard.skipped == 0 and len(session.state.losses) == 1
    assert scaler.get_scale() == 2.0**16


def test_checkpointed_text_encoder_adapters_still_learn(tiny_sd15_dir, demo_subset, tmp_path):
    """The token embeddings are frozen: with reentrant checkpointing no gradient would reach
    the adapters inside the checkpointed encoder layers."""
    run = tiny_run(
        tmp_path,
        tiny_sd15_dir,
        demo_subset(2),
        "adapter.text_encoder=true",
        "train.gradient_checkpointing=true",
    )
    encoder = run.adapted["lora_te"]
    assert all(layer.gradient_checkpointing for layer in encoder.encoder.layers)
    assert run.family.unet.is_gradient_checkpointing
    before = adapter_tensors(run, "lora_te")
    overfit(run, 1)
    after = adapter_tensors(run, "lora_te")
    ups = [name for name in before if "lora_B" in name]
    assert ups and all(after[n].abs().max() > 0 and before[n].abs().max() == 0 for n in ups)


def test_sdpa_is_the_default_and_xformers_is_refused_on_the_cpu(
    tiny_sd15_dir, demo_subset, tmp_path
):
    run = tiny_run(tmp_path, tiny_sd15_dir, demo_subset(1))
    processors = run.family.unet.attn_processors.values()
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)
    with pytest.raises(UserError, match=r"^train.attention = 'xformers' needs a CUDA GPU"):
        tiny_run(tmp_path / "x", tiny_sd15_dir, demo_subset(1, 1), "train.attention='xformers'")


def test_cached_away_modules_are_parked_and_previews_still_render(
    tiny_sd15_dir, demo_subset, tmp_path
):
    data = demo_subset(2)
    run = tiny_run(
        tmp_path,
        tiny_sd15_dir,
        data,
        "data.cache_latents=true",
        "data.cache_text_encoder_outputs=true",
        "sample.num_inference_steps=2",
        prompts=("zqxstyle, a house",),
    )
    assert run.idle == [run.family.vae, run.family.pipe.text_encoder]
    overfit(run, 1)
    with visiting(run.idle, run.accelerator.device):  # as Session.preview renders
        sheet = Previewer(run.family, run.prompts, "default").render()
    assert sheet.size == (128, 64)  # without and with the adapter
    only_text = tiny_run(
        tmp_path / "b",
        tiny_sd15_dir,
        data,
        "data.cache_latents=false",
        "data.cache_text_encoder_outputs=true",
    )
    assert only_text.idle == [only_text.family.pipe.text_encoder]


@pytest.mark.parametrize(("tiny", "base"), [("sd15", "no"), ("sdxl", "no"), ("sd15", "nf4")])
def test_previews_render_under_bf16_and_training_goes_on(tiny, base, demo_subset, tmp_path):
    """accelerate's mixed-precision wrapper hands the UNet's output back in fp32; the pipeline
    passes those latents on to the bf16 UNet and VAE, which must take them in their own dtype
    (a quantized UNet's layers keep the input's dtype, so fp32 reaches its bf16 norms)."""
    run = tiny_run(
        tmp_path,
        tiny_model_path(tiny),
        demo_subset(2),
        "train.mixed_precision='bf16'",
        f"train.quantize_base={base!r}",
        "sample.num_inference_steps=2",
        prompts=("zqxstyle, a house",),
    )
    assert run.family.vae.dtype == torch.bfloat16
    overfit(run, 1)
    sheet = Previewer(run.family, run.prompts, "default").render()
    pixels = np.asarray(sheet, dtype=np.float32)
    assert sheet.size == (128, 64) and pixels.std() > 1
    assert np.isfinite(overfit(run, 1)).all()  # eval-mode passes leave the base trainable
