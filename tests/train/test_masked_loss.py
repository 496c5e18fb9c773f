"""Masked loss (kohya's `masked_loss`): masks from a folder or the images' transparency, cropped
and flipped with their image, cached with the latents, and weighing the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import demo_config, training_config
from PIL import Image
from safetensors import safe_open

from stylelora.data.dataset import ImageCaptionDataset
from stylelora.data.report import data_options
from stylelora.data.scan import scan_folder
from stylelora.errors import UserError
from stylelora.train.trainer import train

RED, BLUE = (220, 30, 30), (30, 30, 220)


def pattern(seed: int, width: int = 96, height: int = 64) -> np.ndarray:
    """A boolean pattern of blocks, different per seed."""
    rng = np.random.default_rng(seed)
    blocks = rng.random((height // 16, width // 16)) < 0.5
    return np.kron(blocks, np.ones((16, 16), bool))


def write_pictures(folder, masks=None, alpha=False, count=3):
    """Red where the pattern is set, blue elsewhere; its mask as a file, or as transparency."""
    folder.mkdir()
    if masks:
        masks.mkdir()
    for i in range(count):
        where = pattern(i)
        pixels = np.where(where[..., None], RED, BLUE).astype(np.uint8)
        if alpha:
            rgba = np.dstack([pixels, np.where(where, 255, 0).astype(np.uint8)])
            Image.fromarray(rgba, "RGBA").save(folder / f"{i}.png")
        else:
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=95)
        if masks:
            Image.fromarray(np.where(where, 255, 0).astype(np.uint8)).save(masks / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"zqxstyle, picture {i}")
    return folder


def dataset(tmp_path, folder, *overrides):
    cfg = demo_config(tmp_path, f"data.dir={str(folder)!r}", "data.enable_buckets=false",
                      "train.masked_loss=true", *overrides)  # fmt: skip
    return ImageCaptionDataset(scan_folder(folder).records, data_options(cfg.data, cfg.seed))


@pytest.mark.parametrize("source", ["folder", "alpha"])
def test_masks_are_cropped_and_flipped_with_their_image(tmp_path, source):
    masks = tmp_path / "masks"
    folder = write_pictures(tmp_path / "data", masks if source == "folder" else None,
                            alpha=source == "alpha")  # fmt: skip
    given = f"data.mask_dir={str(masks)!r}" if source == "folder" else "data.alpha_mask=true"
    data = dataset(tmp_path, folder, given, "data.center_crop=false", "data.flip=true",
                   "data.alpha_background=[30, 30, 220]")  # fmt: skip
    for index in range(3):
        drawn = set()
        for epoch in range(6):
            item = data[(index, epoch)]
            red = item["pixel_values"][0] > 0  # red is +0.7, blue -0.76 in [-1, 1]
            mask = item["mask"][0] > 0.5
            assert item["mask"].shape == (1, 64, 64)
            assert (red == mask).float().mean() > 0.97  # edges resample differently
            drawn.add(mask.numpy().tobytes())
        assert len(drawn) > 1  # the crops and flips did move


def test_a_missing_mask_and_a_mask_without_masked_loss_are_one_line_errors(tmp_path):
    masks = tmp_path / "masks"
    folder = write_pictures(tmp_path / "data", masks)
    (masks / "1.png").unlink()
    with pytest.raises(UserError, match=r"1.jpg: no mask for it in data.mask_dir .*masks"):
        dataset(tmp_path, folder, f"data.mask_dir={str(masks)!r}")
    with pytest.raises(UserError, match="train.masked_loss needs masks: set data.mask_dir"):
        demo_config(tmp_path, "train.masked_loss=true")
    with pytest.raises(UserError, match="only train.masked_loss = true uses"):
        demo_config(tmp_path, "data.alpha_mask=true")


def masked_run(tmp_path, tiny_sd15_dir, data, masks, *overrides):
    cfg = training_config(tmp_path, tiny_sd15_dir, data, "train.max_steps=3",
                          "train.batch_size=2", f"data.mask_dir={str(masks)!r}",
                          "train.masked_loss=true", *overrides)  # fmt: skip
    return train(cfg)


def up_weights(path) -> list[torch.Tensor]:
    with safe_open(path, "pt") as f:
        return [f.get_tensor(k) for k in f.keys() if "lora_up" in k]  # noqa: SIM118


def test_what_the_mask_hides_does_not_train(tiny_sd15_dir, demo_subset, tmp_path):
    """All black: the loss is zero and the adapter's up matrices stay at their zero start;
    with an unmasked weight, or a white mask, they move."""
    data = demo_subset(4)
    black, white = tmp_path / "black", tmp_path / "white"
    for folder, value in ((black, 0), (white, 255)):
        folder.mkdir()
        for image in data.glob("*.png"):
            Image.new("L", Image.open(image).size, value).save(folder / image.name)
    hidden = masked_run(tmp_path / "a", tiny_sd15_dir, data, black)
    assert hidden.losses == [0.0, 0.0, 0.0]
    assert all(not up.any() for up in up_weights(hidden.adapter_path))
    with safe_open(hidden.adapter_path, "pt") as f:
        assert f.metadata()["ss_masked_loss"] == "True"
    half = masked_run(tmp_path / "b", tiny_sd15_dir, data, black, "train.unmasked_weight=0.5")
    assert all(up.any() for up in up_weights(half.adapter_path))
    plain = train(training_config(tmp_path / "c", tiny_sd15_dir, data, "train.max_steps=3",
                                  "train.batch_size=2"))  # fmt: skip
    seen = masked_run(tmp_path / "d", tiny_sd15_dir, data, white)
    assert seen.losses == plain.losses  # a white mask weighs every pixel 1
    assert half.losses[0] == pytest.approx(plain.losses[0] / 2, rel=1e-6)


def test_cached_latents_keep_their_masks(tiny_sd15_dir, tmp_path):
    masks = tmp_path / "masks"
    data = write_pictures(tmp_path / "data", masks, count=4)
    cache = tmp_path / "cache"
    square = ("data.flip=true", "data.enable_buckets=false")
    cached = masked_run(tmp_path / "a", tiny_sd15_dir, data, masks, *square,
                        f"data.cache_dir={str(cache)!r}")  # fmt: skip
    uncached = masked_run(tmp_path / "b", tiny_sd15_dir, data, masks, *square,
                          "data.cache_latents=false")  # fmt: skip
    assert cached.losses == uncached.losses
    for a, b in zip(up_weights(cached.adapter_path), up_weights(uncached.adapter_path),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)
    entries = list(cache.iterdir())
    assert len(entries) == 8  # four images, each also flipped
    with safe_open(entries[0], "pt") as f:
        assert f.get_tensor("mask").shape == (1, 8, 8)  # on the latents
    Image.new("L", (96, 64), 255).save(masks / "0.png")  # a changed mask is encoded again
    masked_run(tmp_path / "c", tiny_sd15_dir, data, masks, *square,
               f"data.cache_dir={str(cache)!r}")  # fmt: skip
    assert len(list(cache.iterdir())) == 10
