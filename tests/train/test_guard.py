"""The NaN guard, shown with a real NaN: one image's cached latents are overwritten with NaN."""

from __future__ import annotations

import pytest
import torch
from conftest import training_config
from safetensors.torch import load_file, save_file

from stylelora.data.dataset import BucketBatchSampler, ImageCaptionDataset
from stylelora.data.report import data_options, scan_dataset
from stylelora.families import load_family
from stylelora.train.cache import entry_name, vae_identity
from stylelora.train.guard import NonFiniteStop
from stylelora.train.trainer import train


def config(tmp_path, name, model, data, *more):
    cfg = training_config(
        tmp_path / name,
        model,
        data,
        "data.cache_latents=true",
        f"data.cache_dir={str(tmp_path / 'cache')!r}",
        "train.batch_size=1",
        "train.lr_scheduler='constant'",
        "train.lr_warmup_steps=0",
        "train.log_with='none'",
        *more,
    )
    return cfg


def poison(cfg, model, index: int) -> None:
    """Replace image `index`'s cached latent mean with NaN."""
    dataset = ImageCaptionDataset(scan_dataset(cfg.data).records, data_options(cfg.data, cfg.seed))
    vae_id = vae_identity(load_family(str(model)).vae)
    path = cfg.data.cache_dir / entry_name(dataset, index, False, vae_id)
    tensors = load_file(str(path))
    tensors["latent_mean"] = torch.full_like(tensors["latent_mean"], float("nan"))
    save_file(tensors, str(path))


def batch_order(cfg, epochs: int) -> list[int]:
    dataset = ImageCaptionDataset(scan_dataset(cfg.data).records, data_options(cfg.data, cfg.seed))
    sampler = BucketBatchSampler(dataset, 1, cfg.seed)
    return [batch[0][0] for epoch in range(epochs) for batch in sampler.batches(epoch)]


def test_nan_steps_are_skipped_counted_and_stop_the_run_keeping_the_last_good_adapter(
    tiny_sd15_dir, demo_subset, tmp_path
):
    data = demo_subset(4)
    probe = config(tmp_path, "probe", tiny_sd15_dir, data)
    order = batch_order(probe, epochs=4)
    bad = order[2]  # the third batch of the run

    clean = train(config(tmp_path, "clean", tiny_sd15_dir, data, "train.max_steps=2"))
    poison(probe, tiny_sd15_dir, bad)

    # One non-finite step allowed in a row: the third batch stops the run.
    stopping = config(
        tmp_path, "stop", tiny_sd15_dir, data, "train.max_steps=10", "train.max_nonfinite_steps=1"
    )
    with pytest.raises(NonFiniteStop, match=r"1 step\(s\) in a row .* after step 2") as stop:
        train(stopping)
    assert "holds the last good weights" in str(stop.value)
    kept = load_file(stopping.output_dir / f"{stopping.name}.safetensors")
    reference = load_file(clean.adapter_path)
    assert kept.keys() == reference.keys()
    assert all(torch.equal(kept[k], reference[k]) for k in kept)  # exactly the step-2 weights

    # Three allowed: every visit to the image is skipped and counted, and the run completes.
    steps = 6
    expected = 0
    good = 0
    for index in order:
        if good == steps:
            break
        if index == bad:
            expected += 1
        else:
            good += 1
    assert expected >= 1
    going = config(
        tmp_path,
        "go",
        tiny_sd15_dir,
        data,
        f"train.max_steps={steps}",
        "train.max_nonfinite_steps=3",
    )
    result = train(going)
    assert result.steps == steps and result.skipped == expected
    assert len(result.losses) == steps and all(torch.isfinite(torch.tensor(result.losses)))
    tensors = load_file(result.adapter_path)
    assert all(torch.isfinite(t).all() for t in tensors.values())
