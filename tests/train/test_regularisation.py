"""Regularisation images (kohya's reg_data_dir and prior_loss_weight) and prior preservation
without images (ai-toolkit's differential output preservation)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import DEMO_DATA, training_config
from safetensors import safe_open

from stylelora.data.regularisation import regularisation_draws
from stylelora.errors import UserError
from stylelora.train.loss import draw_noise
from stylelora.train.prior import class_caption, preservation_loss
from stylelora.train.run import build_run, training_step
from stylelora.train.trainer import train


@pytest.mark.parametrize(
    "repeats, training_draws, expected",
    [([1, 1, 1], 10, [4, 3, 3]), ([5, 5, 5], 7, [5, 5, 0]), ([2], 5, [5]), ([1, 1], 1, [1, 0]),
     ([2, 3], 5, [2, 3]), ([], 5, [])],
)  # fmt: skip
def test_regularisation_images_are_drawn_as_kohya_draws_them(repeats, training_draws, expected):
    assert regularisation_draws(repeats, training_draws) == expected


def reg_folder(tmp_path, count: int = 3):
    """`N_class` folders as kohya lays them out: one captioned by its folder's name, one with
    caption files."""
    folder = tmp_path / "reg"
    (folder / "2_shape").mkdir(parents=True)
    (folder / "1_picture").mkdir()
    images = sorted(DEMO_DATA.glob("*.png"))[-count:]
    for image in images[:-1]:
        shutil.copy(image, folder / "2_shape")
    shutil.copy(images[-1], folder / "1_picture")
    (folder / "1_picture" / images[-1].with_suffix(".txt").name).write_text("a flat picture")
    return folder


def test_an_epoch_draws_the_class_images_as_often_as_the_training_images(
    tmp_path, tiny_sd15_dir, demo_subset
):
    data, reg = demo_subset(5), reg_folder(tmp_path)
    cfg = training_config(tmp_path, tiny_sd15_dir, data, f"data.reg_dir={str(reg)!r}",
                          "data.trigger_word='zqxstyle'", "train.batch_size=2")  # fmt: skip
    run = build_run(cfg)
    dataset = run.sampler.dataset
    drawn = [key for batch in run.sampler.batches(0) for key in batch]
    priors = [index for index, _ in drawn if dataset.is_prior(index)]
    assert len(priors) == len(drawn) - len(priors) == 5
    # the 2_shape images twice each, then the 1_picture one once: five draws as five images
    assert sorted(dataset.draws[dataset.first_prior :]) == [1, 2, 2]
    items = [dataset[key] for key in drawn]
    for item in items:
        assert ("zqxstyle" in item["caption"]) != item["prior"]
    assert {item["caption"] for item in items if item["prior"]} == {"shape", "a flat picture"}
    assert any("regularisation: 3 images, 5 draws per epoch" in line for line in run.dataset_lines)


def test_prior_loss_weight_weighs_the_class_images(tmp_path, tiny_sd15_dir, demo_subset):
    data, reg = demo_subset(4), reg_folder(tmp_path, 4)
    runs = {}
    for weight in (0.0, 0.5, 1.0):
        cfg = training_config(tmp_path / str(weight), tiny_sd15_dir, data, "train.max_steps=2",
                              "train.batch_size=4", f"data.reg_dir={str(reg)!r}",
                              f"train.prior_loss_weight={weight}")  # fmt: skip
        runs[weight] = train(cfg)
    first = {weight: result.losses[0] for weight, result in runs.items()}
    assert first[0.0] < first[1.0] - 1e-3  # the first batch holds class images
    assert first[0.5] == pytest.approx((first[0.0] + first[1.0]) / 2, rel=1e-5)
    with safe_open(runs[0.5].adapter_path, "pt") as f:
        meta = f.metadata()
    assert (
        meta["ss_num_reg_images"] == "7"
    )  # with repeats, as kohya counts and meta["ss_prior_loss_weight"] == "0.5"
    dirs = json.loads(meta["ss_reg_dataset_dirs"])
    assert dirs == {"2_shape": {"n_repeats": 2, "img_count": 3},
                    "1_picture": {"n_repeats": 1, "img_count": 1}}  # fmt: skip


def test_regularisation_mistakes_are_one_line_errors(tmp_path, tiny_sd15_dir, demo_subset):
    data = demo_subset(2)
    missing = str(tmp_path / "nowhere")
    cases = {
        (f"data.reg_dir={missing!r}",): f"data.reg_dir {missing}: folder not found",
        ("train.prior_loss_weight=0.5",): "train.prior_loss_weight weighs the regularisation",
        ("train.prior_preservation=true",): "train.prior_preservation replaces the trigger word",
    }
    for overrides, message in cases.items():
        with pytest.raises(UserError, match=message):
            train(training_config(tmp_path / str(len(message)), tiny_sd15_dir, data, *overrides))


def test_class_captions_replace_the_trigger_word():
    assert class_caption("zqxstyle, a fish, red", "zqxstyle", "") == "a fish, red"
    assert class_caption("a fish, zqxstyle", "zqxstyle", "illustration") == "a fish, illustration"
    assert class_caption("a zqxstyle-like fish, zqxstyle", "zqxstyle", "x") == (
        "a zqxstyle-like fish, x"
    )


def test_prior_preservation_keeps_the_class_prompt_near_the_base(
    tmp_path, tiny_sd15_dir, demo_subset
):
    """Zero while the adapter is zero; after training, the class prompts' predictions stay
    nearer the frozen model's with it than without it."""
    data = demo_subset(4)
    drift = {}
    for on in (False, True):
        cfg = training_config(tmp_path / str(on), tiny_sd15_dir, data,
                              "data.trigger_word='zqxstyle'", "train.batch_size=2",
                              "train.learning_rate=5e-3", "adapter.unet_targets='attention'",
                              "data.cache_text_encoder_outputs=false", "train.lr_warmup_steps=0",
                              f"train.prior_preservation={str(on).lower()}")  # fmt: skip
        run = build_run(cfg)
        batch = next(iter(run.loader))
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        noised = draw_noise(run.family, run.objective, batch, generators)
        with torch.no_grad():
            assert preservation_loss(run, noised, batch).item() == 0.0  # a zero adapter
        steps = 0
        while steps < 20:
            for batch_ in run.loader:
                training_step(run, batch_, steps)
                steps += 1
        with torch.no_grad():
            drift[on] = preservation_loss(run, noised, batch).item()
    assert 0 < drift[True] < drift[False]
