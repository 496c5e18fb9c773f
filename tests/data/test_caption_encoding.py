"""Captions that are not UTF-8 are read as cp1252 and reported, unless data.strict; the caption
extension may be written without its dot."""

import json

import pytest
from PIL import Image

from stylelora.config import DataConfig
from stylelora.data.dataset import ImageCaptionDataset
from stylelora.data.report import data_options, describe, scan_dataset
from stylelora.errors import UserError


def image(path):  # 64 px, as data.resolution in these tests: never upscaled
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)


def report(data: DataConfig) -> list[str]:
    scan = scan_dataset(data)
    return describe(scan, ImageCaptionDataset(scan.records, data_options(data, 0)), data)


def test_a_caption_that_is_not_utf8_is_read_as_cp1252_and_named(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9, \x93quoted\x94")
    image(tmp_path / "2_dog" / "b.png")
    (tmp_path / "2_dog" / "b.txt").write_bytes(b"na\xefve")
    image(tmp_path / "c.png")
    (tmp_path / "c.txt").write_bytes("\ufeffcafé".encode())  # UTF-8 with a byte order mark
    data = DataConfig(dir=tmp_path, resolution=64)
    scan = scan_dataset(data)
    captions = {r.path.name: r.caption for r in scan.records}
    assert captions == {"a.png": "café, “quoted”", "b.png": "naïve", "c.png": "café"}
    assert scan.problems == []
    assert "2 caption files were not UTF-8 and were read as cp1252: 2_dog/b.txt, a.txt" in (
        report(data)
    )


def test_strict_keeps_a_caption_that_is_not_utf8_an_error_naming_it(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match=r"data.strict: .*a.png: caption not UTF-8 \(a.txt\)"):
        scan_dataset(DataConfig(dir=tmp_path, resolution=64, strict=True))


def test_a_caption_that_is_neither_utf8_nor_cp1252_costs_its_image_with_the_reason(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    (tmp_path / "b.txt").write_bytes("café".encode("utf-16"))  # NUL bytes: not cp1252 text
    scan = scan_dataset(DataConfig(dir=tmp_path, resolution=64))
    assert [r.path.name for r in scan.records] == ["a.png"]
    assert [(p.name, str(why)) for p, why in scan.problems] == [
        ("b.png", "caption not text (b.txt)")
    ]


def test_metadata_jsonl_that_is_not_utf8_is_read_as_cp1252_unless_strict(tmp_path):
    image(tmp_path / "a.png")
    line = json.dumps({"file_name": "a.png", "text": "café"}, ensure_ascii=False)
    (tmp_path / "metadata.jsonl").write_bytes(line.encode("cp1252"))
    data = DataConfig(dir=tmp_path, resolution=64)
    assert scan_dataset(data).records[0].caption == "café"
    assert "1 caption file was not UTF-8 and was read as cp1252: metadata.jsonl" in report(data)
    with pytest.raises(
        UserError, match=r"metadata.jsonl: not UTF-8 \(data.strict = true\); save it as UTF-8"
    ):
        scan_dataset(DataConfig(dir=tmp_path, resolution=64, strict=True))


def test_a_caption_extension_without_its_dot_reads_the_captions(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("a red square")
    data = DataConfig(dir=tmp_path, resolution=64, caption_extension="caption")
    assert data.caption_extension == ".caption"
    assert scan_dataset(data).records[0].caption == "a red square"
