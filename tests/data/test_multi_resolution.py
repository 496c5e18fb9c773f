"""Several resolutions in one run (data.resolution as a list): each image at every resolution it
fills, batches of one bucket, caches per resolution, the file's metadata."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import DEMO_CONFIG, training_config
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors import safe_open

from stylelora.config import DataConfig, load_config
from stylelora.data.buckets import closest_bucket, make_buckets
from stylelora.data.dataset import BucketBatchSampler, ImageCaptionDataset
from stylelora.data.report import data_options, describe, scan_dataset
from stylelora.data.scan import scan_folder
from stylelora.errors import UserError
from stylelora.export.metadata import training_metadata
from stylelora.families import detect_family
from stylelora.train.cache import cache_latents
from stylelora.train.run import build_run
from stylelora.train.trainer import train

# 64 px needs 4096 pixels: the first three fill it, the last two only 32 px (1024 pixels)
SIZES = {"wide.png": (96, 64), "tall.png": (64, 80), "square.png": (72, 72),
         "small.png": (40, 40), "thin.png": (30, 100)}  # fmt: skip
BIG = {"wide.png", "tall.png", "square.png"}


def image_folder(folder: Path, sizes: dict[str, tuple[int, int]] = SIZES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, (name, size) in enumerate(sizes.items()):
        Image.new("RGB", size, (40 * index, 90, 200)).save(folder / name)
        (folder / name).with_suffix(".txt").write_text(f"picture {index}, zqxstyle")
    return folder


def dataset_of(data: DataConfig, priors: Path | None = None) -> ImageCaptionDataset:
    prior_records = scan_folder(priors).records if priors else ()
    return ImageCaptionDataset(scan_dataset(data).records, data_options(data, 0), prior_records)


def multi(folder: Path, **options) -> DataConfig:
    return DataConfig(dir=folder, resolution=[64, 32], bucket_step=16, **options)


def draws_per_resolution(dataset: ImageCaptionDataset, epoch: int = 0) -> Counter:
    """(image name, resolution) -> how often an epoch draws it."""
    keys = [key for batch in BucketBatchSampler(dataset, 2, seed=0).batches(epoch) for key in batch]
    return Counter(
        (dataset.records[index].path.name, dataset.resolutions[index]) for index, _ in keys
    )


def test_big_images_train_at_each_resolution_and_small_ones_at_the_smallest(tmp_path):
    dataset = dataset_of(multi(image_folder(tmp_path / "d"), repeats=2))
    for epoch in (0, 1):
        expected = {(name, 32): 2 for name in SIZES} | {(name, 64): 2 for name in BIG}
        assert draws_per_resolution(dataset, epoch) == expected
    for index in range(len(dataset)):
        width, height = dataset.bucket(index)
        side = dataset.resolutions[index]
        assert width * height <= side * side and width * height > (side // 2) ** 2
        assert dataset[(index, 0)]["pixel_values"].shape == (3, height, width)


def test_every_batch_holds_one_bucket_size(tmp_path):
    dataset = dataset_of(multi(image_folder(tmp_path / "d"), flip=True))
    batches = BucketBatchSampler(dataset, 3, seed=0).batches(0)
    sides = set()
    for batch in batches:
        shapes = {tuple(dataset[key]["pixel_values"].shape) for key in batch}
        assert len(shapes) == 1
        sides |= {dataset.resolutions[index] for index, _ in batch}
    assert sides == {32, 64}


def test_the_report_lists_buckets_per_resolution_and_who_skips_one(tmp_path):
    data = multi(image_folder(tmp_path / "d"))
    lines = describe(scan_dataset(data), dataset_of(data), data)
    assert lines[0].startswith("dataset: 5 images, 8 draws per epoch")
    assert "  at 32 px: 5 images" in lines and "  at 64 px: 3 images" in lines
    assert "at 64 px, 2 images have fewer pixels than 64x64 and train only below it: " in "\n".join(
        lines
    )
    skipped = next(line for line in lines if line.startswith("at 64 px, 2 images"))
    assert set(skipped.split(": ")[1].split(", ")) == {"small.png", "thin.png"}


def test_one_resolution_gives_the_items_and_buckets_of_a_plain_number(tmp_path):
    folder = image_folder(tmp_path / "d")
    plain, listed = (DataConfig(dir=folder, resolution=r, bucket_step=16) for r in (64, [64]))
    records = scan_dataset(plain).records
    # the bucket each image got before several resolutions existed
    buckets = make_buckets(64, 16, *plain.bucket_sides())
    before = [closest_bucket(record.size, buckets) for record in records]
    for data in (plain, listed):
        dataset = dataset_of(data)
        assert dataset.buckets == before and dataset.records == records
        assert dataset.draws == [1] * len(records)
    same = [BucketBatchSampler(dataset_of(d), 2, seed=3).batches(1) for d in (plain, listed)]
    assert same[0] == same[1]
    assert describe(scan_dataset(plain), dataset_of(plain), plain) == describe(
        scan_dataset(listed), dataset_of(listed), listed
    )


def test_class_images_are_drawn_at_each_resolution_as_the_training_images(tmp_path):
    reg = image_folder(tmp_path / "reg" / "1_picture", {"big.png": (80, 80), "tiny.png": (33, 33)})
    dataset = dataset_of(multi(image_folder(tmp_path / "d")), reg.parent)
    for side in (32, 64):
        at = dataset.at_resolution(side)
        training = sum(dataset.draws[i] for i in at if not dataset.is_prior(i))
        priors = sum(dataset.draws[i] for i in at if dataset.is_prior(i))
        assert priors == training == (5 if side == 32 else 3)
    prior_sides = {
        (dataset.records[i].path.name, dataset.resolutions[i])
        for i in range(dataset.first_prior, len(dataset))
    }
    assert prior_sides == {("big.png", 32), ("big.png", 64), ("tiny.png", 32)}


@pytest.mark.parametrize(
    "value, extra, message",
    [("[]", (), "data.resolution: expected a side such as 512, or a list of them such as [512"),
     ("[0, 64]", (), "data.resolution: expected a side such as 512, or a list of them"),
     ("[64, 128, 64]", (), "data.resolution: lists 64 twice; give each side once"),
     ("[64, 96]", (), "data.resolution 96 must be a multiple of data.bucket_step 64"),
     ("[64, 256]", ("data.max_bucket_side=128",),
      "data.min_bucket_side 128 <= data.resolution 256 <= data.max_bucket_side 128 must hold")],
)  # fmt: skip
def test_resolution_mistakes_are_one_line_errors(value, extra, message):
    with pytest.raises(UserError) as info:
        load_config(DEMO_CONFIG, [f"data.resolution={value}", *extra])
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def family(tiny_sd15_dir):
    return detect_family(DiffusionPipeline.from_pretrained(tiny_sd15_dir))


def test_the_latents_cache_holds_each_resolution_apart_and_is_reused(tmp_path, family):
    data, cache = multi(image_folder(tmp_path / "d")), tmp_path / "cache"
    dataset = dataset_of(data)
    first = cache_latents(family, dataset, cache, 4, show_progress=False)
    assert (first.encoded, first.reused) == (8, 0)  # 5 images at 32 px, 3 at 64 px
    assert len(list(cache.glob("*.safetensors"))) == 8
    scale = family.pipe.vae_scale_factor
    for index in range(len(dataset)):
        width, height = dataset.bucket(index)
        assert dataset[(index, 0)]["latent_mean"].shape[-2:] == (height // scale, width // scale)
    again = cache_latents(family, dataset_of(data), cache, 4, show_progress=False)
    assert (again.encoded, again.reused) == (0, 8)


def batch_area(batch: dict, scale: int) -> int:
    """Pixels of a batch's bucket, from its pixels or its cached latents."""
    if "latent_mean" in batch:
        return batch["latent_mean"].shape[-2] * batch["latent_mean"].shape[-1] * scale * scale
    return batch["pixel_values"].shape[-2] * batch["pixel_values"].shape[-1]


def test_a_run_trains_at_both_resolutions_and_its_file_records_them(tmp_path, tiny_sd15_dir):
    data = image_folder(tmp_path / "d")
    options = ("data.resolution=[32, 64]", "data.bucket_step=16", "train.max_steps=5")
    cfg = training_config(tmp_path, tiny_sd15_dir, data, "train.batch_size=2", *options)
    run = build_run(cfg)
    areas = {batch_area(batch, run.family.pipe.vae_scale_factor) for batch in run.loader}
    # batches of 32 px buckets (up to 32x32) and of 64 px buckets (above it)
    assert min(areas) <= 32 * 32 < max(areas)
    result = train(cfg)
    with safe_open(result.adapter_path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"
    assert meta["ss_resolutions"] == "(32, 32), (64, 64)" and meta["ss_steps"] == "5"


def test_one_resolution_writes_the_header_a_plain_number_writes(tmp_path, tiny_sd15_dir, family):
    data = image_folder(tmp_path / "d")
    headers = []
    for value in ("64", "[64]", "[32, 64]"):
        options = (f"data.resolution={value}", "data.bucket_step=16")
        cfg = training_config(tmp_path, tiny_sd15_dir, data, *options)
        scan = scan_dataset(cfg.data)
        headers.append(training_metadata(cfg, scan, family, 5, 1, 1.0, 2.0, True))
    assert headers[0] == headers[1] and "ss_resolutions" not in headers[0]
    assert headers[0]["ss_resolution"] == headers[2]["ss_resolution"] == "(64, 64)"
    assert headers[2]["ss_resolutions"] == "(32, 32), (64, 64)"
