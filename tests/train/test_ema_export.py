"""The EMA adapter is exported beside the raw one, or instead of it."""

from __future__ import annotations

import torch
from conftest import training_config
from safetensors import safe_open
from safetensors.torch import load_file

from stylelora.train.trainer import train


def run(tmp_path, name, model, data, export):
    cfg = training_config(
        tmp_path / name,
        model,
        data,
        "train.max_steps=3",
        "train.learning_rate=1e-2",
        "train.log_with='none'",
        "train.ema_decay=0.5",
        f"train.ema_export={export!r}",
    )
    return train(cfg)


def test_ema_beside_and_instead(tiny_sd15_dir, demo_subset, tmp_path):
    data = demo_subset(4)
    beside = run(tmp_path, "beside", tiny_sd15_dir, data, "beside")
    instead = run(tmp_path, "instead", tiny_sd15_dir, data, "instead")
    assert beside.ema_path.name == "demo-style-ema.safetensors" and instead.ema_path is None
    raw, ema = load_file(beside.adapter_path), load_file(beside.ema_path)
    only = load_file(instead.adapter_path)
    up = [k for k in raw if k.endswith("lora_up.weight")]
    assert any(not torch.equal(raw[k], ema[k]) for k in up)  # the average lags the weights
    assert all(torch.equal(ema[k], only[k]) for k in raw)  # "instead" writes the same average
    with safe_open(str(beside.ema_path), "pt") as handle:
        assert handle.metadata()["ss_network_module"] == "networks.lora"  # a full kohya file
