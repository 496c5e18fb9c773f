"""The quality options, each against its formula: min-SNR weights, noise shaping, timestep range,
Huber loss, the EMA update and LoRA+ groups."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from stylelora.adapters.inject import inject_adapters
from stylelora.config import AdapterConfig, TrainConfig
from stylelora.errors import UserError
from stylelora.families import load_family
from stylelora.families.objective import (
    DDPMObjective,
    min_snr_weights,
    multires_noise,
    offset_noise,
)
from stylelora.train.ema import AdapterEMA
from stylelora.train.loss import elementwise_loss
from stylelora.train.optim import parameter_groups

SCHEDULER = DDPMScheduler(num_train_timesteps=1000)


def snr(t: int) -> float:
    alpha = SCHEDULER.alphas_cumprod[t].item()
    return alpha / (1 - alpha)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_paper(prediction_type):
    steps = torch.tensor([0, 50, 200, 500, 999])
    weights = min_snr_weights(SCHEDULER, steps, 5.0, prediction_type)
    for t, weight in zip(steps.tolist(), weights.tolist(), strict=True):
        divisor = snr(t) if prediction_type == "epsilon" else snr(t) + 1
        assert weight == pytest.approx(min(snr(t), 5.0) / divisor, rel=1e-5)
    # Low timesteps (high SNR) are weighted down; the noisiest keep (about) full weight.
    assert weights[0] < 0.01 and weights[-1] == pytest.approx(
        1.0 if prediction_type == "epsilon" else snr(999) / (snr(999) + 1), rel=1e-4
    )


def test_epsilon_weight_is_one_at_zero_snr():
    rescaled = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True)
    weight = min_snr_weights(rescaled, torch.tensor([999]), 5.0, "epsilon")
    assert weight.item() == 1.0


def test_noise_offset_shifts_each_channel_by_a_constant():
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    shifted = offset_noise(noise, 0.1, torch.Generator().manual_seed(1))
    shift = shifted - noise
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift))
    expected = 0.1 * torch.randn((2, 4, 1, 1), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(shift[..., :1, :1], expected)


def test_multires_noise_is_renormalised_and_spatially_correlated():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 4, 32, 32, generator=generator)
    pyramid = multires_noise(noise.clone(), 6, 0.8, generator)
    assert pyramid.shape == noise.shape
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5)

    def neighbour_correlation(x: torch.Tensor) -> float:
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    assert abs(neighbour_correlation(noise)) < 0.05
    assert neighbour_correlation(pyramid) > 0.2


def test_timestep_range_and_its_errors():
    objective = DDPMObjective(SCHEDULER)
    assert objective.timestep_range(None) == (0, 1000)
    options = TrainConfig(min_timestep=100, max_timestep=400)
    assert objective.timestep_range(options) == (100, 400)
    assert objective.timestep_range(TrainConfig(max_timestep=1000)) == (0, 1000)
    with pytest.raises(UserError, match="train.max_timestep 5000: the model is trained on 1000"):
        objective.timestep_range(TrainConfig(max_timestep=5000))
    with pytest.raises(ValueError, match="max_timestep 100 must be above train.min_timestep 100"):
        TrainConfig(min_timestep=100, max_timestep=100)


def test_huber_is_quadratic_near_zero_and_linear_far_away():
    target = torch.zeros(5)
    prediction = torch.tensor([0.001, 0.01, 1.0, 10.0, 100.0])
    mse = elementwise_loss(prediction, target, TrainConfig(loss_type="l2"))
    huber = elementwise_loss(prediction, target, TrainConfig(loss_type="huber", huber_c=0.1))
    assert huber[0].item() == pytest.approx(mse[0].item(), rel=1e-3)
    assert huber[4].item() == pytest.approx(2 * 0.1 * (math.hypot(100, 0.1) - 0.1), rel=1e-6)
    assert huber[4] < mse[4] / 100
    smooth = elementwise_loss(prediction, target, TrainConfig(loss_type="smooth_l1", huber_c=0.1))
    assert torch.allclose(smooth, huber / 0.1)


def test_ema_update_warms_up_then_uses_the_decay():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA([param], decay=0.5)
    expected = torch.zeros(3)
    for step in range(4):
        with torch.no_grad():
            param.add_(1.0)
        decay = min(0.5, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * param.detach()
        ema.update()
        assert torch.allclose(ema.shadow[0], expected)
    with ema.swapped_in():
        assert torch.equal(param.detach(), ema.shadow[0])
    assert torch.equal(param.detach(), torch.full((3,), 4.0))
    copy = AdapterEMA([torch.nn.Parameter(torch.zeros(3))], decay=0.5)
    copy.load_state_dict(ema.state_dict())
    assert torch.equal(copy.shadow[0], ema.shadow[0]) and copy.updates == 4


def test_loraplus_puts_the_up_matrices_in_their_own_group(tiny_sd15_dir):
    family = load_family(str(tiny_sd15_dir))
    adapted = inject_adapters(family, AdapterConfig(rank=4, text_encoder=True))
    plain = parameter_groups(adapted, TrainConfig(learning_rate=1e-4, text_encoder_lr=5e-5))
    assert [(g["name"], g["lr"]) for g in plain] == [("lora_unet", 1e-4), ("lora_te", 5e-5)]
    plus = parameter_groups(
        adapted, TrainConfig(learning_rate=1e-4, text_encoder_lr=5e-5, loraplus_lr_ratio=16)
    )
    assert [(g["name"], g["lr"]) for g in plus] == [
        ("lora_unet", 1e-4),
        ("lora_unet_up", 1e-4 * 16),
        ("lora_te", 5e-5),
        ("lora_te_up", 5e-5 * 16),
    ]
    up_ids = {id(p) for g in plus if g["name"].endswith("_up") for p in g["params"]}
    names = {id(p): n for m in adapted.values() for n, p in m.named_parameters()}
    assert up_ids and all("lora_B" in names[i] for i in up_ids)
    assert sum(len(g["params"]) for g in plus) == sum(len(g["params"]) for g in plain)
