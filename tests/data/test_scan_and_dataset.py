from collections import Counter

import pytest
import torch
from PIL import Image

from stylelora.data.dataset import BucketBatchSampler, DataOptions, ImageCaptionDataset
from stylelora.data.images import load_rgb
from stylelora.data.scan import scan_folder
from stylelora.errors import UserError


def image(path, size=(80, 60), color=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def test_repeats_folders_captions_and_fallbacks(tmp_path):
    image(tmp_path / "3_cat" / "a.png")
    (tmp_path / "3_cat" / "a.txt").write_text("a cat,  sitting\n")
    image(tmp_path / "3_cat" / "b.jpg")
    image(tmp_path / "c.PNG")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    scan = scan_folder(tmp_path)
    by_name = {r.path.name: r for r in scan.records}
    assert set(by_name) == {"a.png", "b.jpg", "c.PNG"}
    assert by_name["a.png"].caption == "a cat, sitting"
    assert (by_name["a.png"].repeats, by_name["a.png"].concept) == (3, "cat")
    assert by_name["b.jpg"].caption == "cat"  # no caption: the concept name
    assert by_name["c.PNG"].repeats == 1
    assert scan.missing_captions == 2
    assert dict((p.name, str(why)) for p, why in scan.problems) == {
        "broken.png": "not an image",
        "empty.jpg": "empty file",
    }


def test_a_folder_with_nothing_usable_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"no usable images: no .bmp, .jpeg, .jpg, .png, .webp"):
        scan_folder(tmp_path)
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"no usable images: 1 not an image; stylelora dataset"):
        scan_folder(tmp_path)
    with pytest.raises(UserError, match="folder not found"):
        scan_folder(tmp_path / "missing")


def test_sampler_covers_every_repeat_and_depends_only_on_seed_and_epoch(tmp_path):
    image(tmp_path / "2_a" / "x.png")
    image(tmp_path / "2_a" / "y.png")
    image(tmp_path / "z.png")
    dataset = ImageCaptionDataset(scan_folder(tmp_path).records, DataOptions(resolution=32))
    sampler = BucketBatchSampler(dataset, batch_size=2, seed=5)
    epoch0 = sampler.batches(0)
    drawn = Counter(index for batch in epoch0 for index, _ in batch)
    names = {i: r.path.name for i, r in enumerate(dataset.records)}
    assert {names[i]: n for i, n in drawn.items()} == {"x.png": 2, "y.png": 2, "z.png": 1}
    assert BucketBatchSampler(dataset, 2, seed=5).batches(0) == epoch0
    assert any(sampler.batches(e) != epoch0 for e in range(1, 6))


def test_items_are_cropped_to_the_bucket_in_range(tmp_path):
    image(tmp_path / "wide.png", size=(120, 40))
    dataset = ImageCaptionDataset(scan_folder(tmp_path).records, DataOptions(resolution=32))
    item = dataset[(0, 0)]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert item["original_size"] == (40, 120)
    assert item["crop_top_left"] == (0, 32)  # scaled to 96x32, centre crop starts at x=32
    assert item["target_size"] == (32, 32)


def test_the_target_size_is_the_bucket_as_height_and_width(tmp_path):
    """SDXL's size conditioning reads it; a cached item has no pixels to measure."""
    image(tmp_path / "wide.png", size=(120, 40))
    options = DataOptions(resolution=32, buckets=((48, 16), (32, 32)))
    item = ImageCaptionDataset(scan_folder(tmp_path).records, options)[(0, 0)]
    assert item["pixel_values"].shape == (3, 16, 48)
    assert item["target_size"] == (16, 48)


def test_transparency_is_composited_on_white(tmp_path):
    path = image(tmp_path / "t.png", color=(255, 0, 0, 0), mode="RGBA")
    assert load_rgb(path).getpixel((0, 0)) == (255, 255, 255)


def test_flip_is_seeded_per_item_and_epoch(tmp_path):
    img = Image.new("RGB", (32, 32))
    img.paste((255, 255, 255), (0, 0, 16, 32))
    img.save(tmp_path / "half.png")
    records = scan_folder(tmp_path).records
    dataset = ImageCaptionDataset(records, DataOptions(resolution=32, flip=True, seed=1))
    left_white = [dataset[(0, e)]["pixel_values"][0, 0, 0].item() > 0 for e in range(20)]
    assert 0 < sum(left_white) < 20
    again = ImageCaptionDataset(records, DataOptions(resolution=32, flip=True, seed=1))
    assert torch.equal(dataset[(0, 3)]["pixel_values"], again[(0, 3)]["pixel_values"])
