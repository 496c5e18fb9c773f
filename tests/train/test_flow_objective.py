"""The flow-matching objective against its formulas and diffusers' own flow-match scheduler."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from stylelora.config import TrainConfig
from stylelora.errors import UserError
from stylelora.families.objective import DDPMObjective, FlowMatchObjective, NoisedBatch
from stylelora.families.skeletons import source_dir

# Flux.1 dev's scheduler config, as the package bundles it.
FLUX_SCHEDULER = FlowMatchEulerDiscreteScheduler.load_config(source_dir("flux") / "scheduler")
OBJECTIVE = FlowMatchObjective(FLUX_SCHEDULER)


def sigmas(options: TrainConfig, count: int = 4000, side: int = 8) -> torch.Tensor:
    """`count` sigmas for latents of `side` x `side` (one channel: the noise is not looked at)."""
    _, drawn = OBJECTIVE.draw((count, 1, side, side), torch.Generator().manual_seed(0), options)
    return drawn


def test_noising_and_target_match_diffusers_flow_match_scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    latents, noise = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8)
    timesteps = scheduler.timesteps[[0, 400, 999]]
    sigma = timesteps / 1000
    noised = NoisedBatch(latents, noise, sigma)
    theirs = scheduler.scale_noise(latents, timesteps, noise)
    assert torch.allclose(OBJECTIVE.noisy(noised), theirs, atol=1e-6)
    assert torch.equal(OBJECTIVE.target(noised), noise - latents)
    ends = NoisedBatch(latents[:2], noise[:2], torch.tensor([0.0, 1.0]))
    assert torch.equal(OBJECTIVE.noisy(ends)[0], latents[0])
    assert torch.equal(OBJECTIVE.noisy(ends)[1], noise[1])


def test_uniform_sigmas_fill_the_asked_timestep_range():
    drawn = sigmas(TrainConfig(timestep_sampling="uniform", min_timestep=200, max_timestep=400))
    assert drawn.min() >= 0.2 and drawn.max() < 0.4
    assert drawn.mean().item() == pytest.approx(0.3, abs=0.005)


def test_logit_normal_sigmas_have_the_sigmoid_of_the_mean_as_median():
    drawn = sigmas(TrainConfig(timestep_sampling="logit_normal", logit_mean=1.0, logit_std=0.5))
    assert drawn.median().item() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.01)


@pytest.mark.parametrize("shift", [1.0, 3.1582])
def test_shift_moves_the_median_as_kohyas_formula(shift):
    drawn = sigmas(TrainConfig(timestep_sampling="shift", discrete_flow_shift=shift))
    assert drawn.median().item() == pytest.approx(shift * 0.5 / (1 + (shift - 1) * 0.5), abs=0.01)


def test_auto_is_kohyas_shift_for_flow_models():
    assert torch.equal(sigmas(TrainConfig()), sigmas(TrainConfig(timestep_sampling="shift")))


def test_flux_shift_follows_diffusers_time_shift_and_grows_with_the_image():
    u = torch.linspace(0.05, 0.95, 19)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    for tokens in (256, 1024, 4096):
        mu = (1.15 - 0.5) / (4096 - 256) * (tokens - 256) + 0.5
        theirs = scheduler.time_shift(mu, 1.0, u)
        assert torch.allclose(OBJECTIVE.resolution_shift(u, tokens), theirs, atol=1e-6)
    options = TrainConfig(timestep_sampling="flux_shift")
    small, large = sigmas(options, 1000, side=32).median(), sigmas(options, 1000, 128).median()
    assert 0.5 < small < large  # 256 tokens: mu 0.5; 4096 tokens: mu 1.15


def test_weighting_schemes_are_diffusers():
    t = torch.tensor([0.25, 0.5])
    assert OBJECTIVE.loss_weights(t, TrainConfig()) is None
    weights = OBJECTIVE.loss_weights(t, TrainConfig(flow_weighting="sigma_sqrt"))
    assert torch.allclose(weights, torch.tensor([16.0, 4.0]))


def test_each_objective_refuses_the_others_options():
    with pytest.raises(UserError, match="train.min_snr_gamma is for DDPM models"):
        OBJECTIVE.check(TrainConfig(min_snr_gamma=5.0))
    ddpm = DDPMObjective(DDPMScheduler())
    with pytest.raises(UserError, match="timestep_sampling = 'shift' is for flow-matching"):
        ddpm.check(TrainConfig(timestep_sampling="shift"))
    with pytest.raises(UserError, match="flow_weighting = 'cosmap' is for flow-matching"):
        ddpm.check(TrainConfig(flow_weighting="cosmap"))
    ddpm.check(TrainConfig(timestep_sampling="uniform"))
