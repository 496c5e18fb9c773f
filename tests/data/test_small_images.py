"""Small images are upscaled into their bucket and reported; data.min_image_size skips them."""

import pytest
from PIL import Image

from stylelora.cli import main
from stylelora.config import DataConfig
from stylelora.data.dataset import ImageCaptionDataset
from stylelora.data.report import data_options, describe, scan_dataset
from stylelora.errors import UserError


def images(folder, sizes: dict[str, tuple[int, int]]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        Image.new("RGB", size, (200, 30, 30)).save(folder / name)
    return folder


def test_images_smaller_than_every_bucket_are_upscaled_and_reported(tmp_path):
    sizes = {"a.png": (96, 80), "b.png": (96, 80), "c.png": (96, 80), "d.png": (200, 150)}
    data = DataConfig(dir=images(tmp_path, sizes))  # 512 px: buckets are 256 to 1024 a side
    scan = scan_dataset(data)
    assert [r.path.name for r in scan.records] == ["a.png", "b.png", "c.png", "d.png"]
    assert scan.problems == []
    dataset = ImageCaptionDataset(scan.records, data_options(data, 0))
    assert dataset.buckets == [(576, 448)] * 4  # the bucket nearest 6:5 and 4:3
    assert dataset[(0, 0)]["pixel_values"].shape == (3, 448, 576)
    # 96x80 covers 576x448 at x6 (576/96); 200x150 at x2.99 (448/150)
    assert "4 images upscaled to fit their bucket (x3.0 to x6.0)" in describe(scan, dataset, data)


def test_min_image_size_skips_by_the_shorter_side_with_the_reason(tmp_path):
    sizes = {"small.png": (96, 80), "tall.png": (80, 300), "edge.png": (81, 400)}
    data = DataConfig(dir=images(tmp_path, sizes), min_image_size=81)
    scan = scan_dataset(data)
    assert [r.path.name for r in scan.records] == ["edge.png"]
    assert {path.name: str(why) for path, why in scan.problems} == {
        "small.png": "smaller than data.min_image_size 81 (96x80)",
        "tall.png": "smaller than data.min_image_size 81 (80x300)",
    }


def bad_dataset(folder):
    images(folder, {f"small{i}.png": (96, 80) for i in range(3)})
    (folder / "cut1.png").write_bytes((folder / "small0.png").read_bytes()[:60])
    (folder / "cut2.png").write_bytes((folder / "small0.png").read_bytes()[:60])
    (folder / "notes.jpg").write_text("not a picture")
    (folder / "zero.webp").write_bytes(b"")
    return folder


def test_nothing_usable_is_one_line_with_each_reason_counted(tmp_path):
    folder = bad_dataset(tmp_path / "my data")
    with pytest.raises(UserError) as info:
        scan_dataset(DataConfig(dir=folder, min_image_size=256))
    assert str(info.value) == (
        f"data.dir {folder}: no usable images: 3 smaller than data.min_image_size 256, "
        "2 truncated or damaged images, 1 empty file, 1 not an image; "
        f"stylelora dataset check '{folder}' --config CONFIG lists each file"
    )


def test_dataset_check_lists_each_unusable_file_then_the_one_line_error(tmp_path, capsys):
    folder = bad_dataset(tmp_path / "d")
    config = tmp_path / "c.toml"
    config.write_text('name = "x"\nmodel = "tiny:sd15"\n[data]\ndir = "d"\nmin_image_size = 256\n')
    assert main(["dataset", "check", str(folder), "--config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "skipped 7 files:"
    listed = {
        line.split(": ", 1)[0].strip(): line.split(": ", 1)[1] for line in out.splitlines()[1:]
    }
    assert listed[str(folder / "small1.png")] == "smaller than data.min_image_size 256 (96x80)"
    assert listed[str(folder / "notes.jpg")] == "not an image"
    assert listed[str(folder / "zero.webp")] == "empty file"
    assert listed[str(folder / "cut2.png")].startswith("truncated or damaged image (")
    assert len(listed) == 7
    assert err.splitlines() == [
        f"stylelora: error: data.dir {folder}: no usable images: 3 smaller than "
        "data.min_image_size 256, 2 truncated or damaged images, 1 empty file, 1 not an image; "
        "each file is listed above"
    ]
