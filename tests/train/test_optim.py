"""Optimizers by name, their extra arguments, and the learning-rate schedules."""

import sys

import pytest
import torch
from conftest import demo_config
from tiny_runs import adapter_tensors, overfit, tiny_run

from stylelora.config import TrainConfig, load_config
from stylelora.errors import UserError
from stylelora.train.optim import (
    build_lr_scheduler,
    build_optimizer,
    check_optimizer,
    parameter_groups,
)

# 8-bit state for every tensor: the tiny adapters are below bitsandbytes' 4096-value default.
OPTIMIZERS = [
    ("adamw", "1e-3", "{}"),
    ("adamw8bit", "1e-3", "{min_8bit_size = 0}"),
    ("lion8bit", "1e-4", "{min_8bit_size = 0}"),
    ("adafactor", "1e-3", "{}"),
    ("prodigy", "1.0", "{d_coef = 0.5}"),
]


@pytest.mark.parametrize(("name", "lr", "args"), OPTIMIZERS)
def test_each_optimizer_lowers_the_loss(name, lr, args, tiny_sd15_dir, demo_subset, tmp_path):
    run = tiny_run(
        tmp_path,
        tiny_sd15_dir,
        demo_subset(2),
        f"train.optimizer={name!r}",
        f"train.learning_rate={lr}",
        f"train.optimizer_args={args}",
    )
    assert type(run.optimizer.optimizer).__name__.lower() == name
    before = adapter_tensors(run)
    losses = overfit(run, 8)
    print(name, [round(x, 4) for x in losses])
    assert losses[-1] < losses[0]
    after = adapter_tensors(run)
    assert all(t.dtype == torch.float32 for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_unknown_optimizer_argument_is_named():
    cfg = TrainConfig(optimizer="adafactor", optimizer_args={"betas": (0.9, 0.99)})
    with pytest.raises(UserError, match=r"optimizer_args: adafactor takes no argument 'betas'"):
        check_optimizer(cfg)


def test_bad_optimizer_argument_value_is_one_line():
    cfg = TrainConfig(optimizer="adamw", optimizer_args={"betas": "fast"})
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(UserError, match=r"^train.optimizer_args: adamw refused them") as err:
        build_optimizer([{"params": [param]}], cfg)
    assert "\n" not in str(err.value)


def test_prodigy_refuses_loraplus_before_training_in_one_line():
    """Prodigy itself would stop at the first step with a traceback from inside its package."""
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(
        LoraConfig(r=2, target_modules=["proj"]),
        torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 4)}),
    )
    loraplus = TrainConfig(optimizer="prodigy", learning_rate=1.0, loraplus_lr_ratio=4.0)
    groups = parameter_groups({"lora_unet": model}, loraplus)
    assert sorted(g["lr"] for g in groups) == [1.0, 4.0]
    refused = r"^train.optimizer = 'prodigy' takes one learning rate .*: remove train.loraplus_lr"
    with pytest.raises(UserError, match=refused) as err:
        build_optimizer(groups, loraplus)
    assert "\n" not in str(err.value)

    plain = TrainConfig(optimizer="prodigy", learning_rate=1.0)
    optimizer = build_optimizer(parameter_groups({"lora_unet": model}, plain), plain)
    for param in model.parameters():
        param.grad = torch.ones_like(param) if param.requires_grad else None
    optimizer.step()  # one rate: Prodigy steps


def test_missing_prodigy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # what an absent package imports as
    with pytest.raises(UserError, match=r"pip install 'stylelora\[prodigy\]'"):
        check_optimizer(TrainConfig(optimizer="prodigy"))


def test_unknown_optimizer_name_is_a_config_error(tmp_path):
    with pytest.raises(UserError, match=r"train.optimizer: Input should be 'adamw'"):
        demo_config(tmp_path, "train.optimizer='sgd'")


def learning_rates(**train) -> list[float]:
    cfg = TrainConfig(max_steps=100, learning_rate=1.0, **train)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, cfg)
    rates = []
    for _ in range(100):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_schedules_have_their_shapes():
    constant = learning_rates(lr_scheduler="constant", lr_warmup_steps=10)
    assert constant[0] == 0 and constant[5] == pytest.approx(0.5) and constant[50] == 1.0
    cosine = learning_rates(lr_scheduler="cosine")
    assert cosine[50] == pytest.approx(0.5) and cosine[-1] < 0.01
    restarts = learning_rates(lr_scheduler="cosine_with_restarts", lr_cycles=2)
    assert restarts[49] < 0.01 and restarts[50] == pytest.approx(1.0)
    linear = learning_rates(lr_scheduler="linear", lr_warmup_steps=20)
    assert linear[10] == pytest.approx(0.5) and linear[60] == pytest.approx(0.5)
    squared = learning_rates(lr_scheduler="polynomial", lr_power=2.0)
    assert squared[50] == pytest.approx(0.25, abs=1e-6)


def test_every_optimizer_and_schedule_loads_from_toml(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        'name = "x"\nmodel = "tiny:sd15"\n[data]\ndir = "."\n[train]\n'
        'optimizer = "adamw8bit"\nlr_scheduler = "cosine_with_restarts"\nlr_cycles = 3\n'
        "optimizer_args = { min_8bit_size = 0, is_paged = false }\n"
    )
    cfg = load_config(config)
    assert cfg.train.optimizer_args == {"min_8bit_size": 0, "is_paged": False}
