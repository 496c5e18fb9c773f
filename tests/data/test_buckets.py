"""Aspect-ratio buckets: kohya's bucket set, closest-ratio assignment, batches within a bucket."""

import pytest
from conftest import DEMO_CONFIG
from PIL import Image

from stylelora.config import load_config
from stylelora.data.buckets import closest_bucket, make_buckets, no_upscale_bucket
from stylelora.data.dataset import BucketBatchSampler, ImageCaptionDataset
from stylelora.data.report import data_options
from stylelora.data.scan import scan_folder
from stylelora.errors import UserError


def test_buckets_match_kohya_at_512():
    buckets = make_buckets(512, 64, 256, 1024)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    assert (1024, 256) in buckets and (256, 1024) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(min(w, h) >= 256 and max(w, h) <= 1024 for w, h in buckets)
    step32 = make_buckets(512, 32, 256, 1024)
    assert (544, 480) in step32 and len(step32) > len(buckets)


def test_closest_ratio_and_no_upscale():
    buckets = make_buckets(512, 64, 256, 1024)
    assert closest_bucket((1920, 1080), buckets) == (640, 384)
    assert closest_bucket((1000, 1000), buckets) == (512, 512)
    assert closest_bucket((300, 900), buckets) == (256, 832)
    assert no_upscale_bucket((300, 200), 512, 64) == (256, 192)
    assert no_upscale_bucket((2000, 1000), 512, 64) == (704, 320)


def test_items_train_at_their_bucket_and_batches_never_mix(tmp_path):
    for i, size in enumerate([(256, 128), (260, 120), (128, 256), (200, 200), (180, 180)]):
        Image.new("RGB", size, (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    cfg = load_config(
        DEMO_CONFIG, [f"data.dir={str(tmp_path)!r}", "data.resolution=128", "data.bucket_step=32"]
    )
    dataset = ImageCaptionDataset(scan_folder(tmp_path).records, data_options(cfg.data, 0))
    # sides from 64 to 256 at 128 px: the nearest ratio to 2:1 is 160x96 (5:3), not 192x64
    assert dataset.buckets == [(160, 96), (160, 96), (96, 160), (128, 128), (128, 128)]
    assert dataset[(0, 0)]["pixel_values"].shape == (3, 96, 160)
    assert dataset[(2, 0)]["pixel_values"].shape == (3, 160, 96)
    for epoch in range(3):
        for batch in BucketBatchSampler(dataset, 2, seed=epoch).batches(epoch):
            assert len({dataset.bucket(i) for i, _ in batch}) == 1


def test_inconsistent_bucket_keys_are_named(tmp_path):
    with pytest.raises(UserError, match=r"data.min_bucket_side 128 <= data.resolution 64"):
        load_config(DEMO_CONFIG, ["data.min_bucket_side=128"])
    with pytest.raises(UserError, match=r"data.resolution 96 must be a multiple of data.bucket"):
        load_config(DEMO_CONFIG, ["data.resolution=96"])
    with pytest.raises(UserError, match=r"data.cache_latents needs data.center_crop"):
        load_config(DEMO_CONFIG, ["data.cache_latents=true", "data.center_crop=false"])
    assert load_config(DEMO_CONFIG, ["data.resolution=96", "data.bucket_step=32"])
