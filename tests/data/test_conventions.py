"""Captions from metadata.jsonl, caption shuffle and dropout, every PIL mode, EXIF orientation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stylelora.data.captions import CaptionOptions, process_caption
from stylelora.data.dataset import derived_generator
from stylelora.data.images import load_rgb
from stylelora.data.scan import scan_folder
from stylelora.errors import UserError


def test_metadata_jsonl_captions_and_caption_files_win(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("from the caption file")
    lines = [{"file_name": "a.png", "text": "ignored"}, {"file_name": "b.png", "text": "a  dog"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    scan = scan_folder(tmp_path)
    captions = {r.path.name: r.caption for r in scan.records}
    assert captions["a.png"] == "from the caption file"
    assert captions["b.png"] == "a dog"
    assert captions["c.png"] == tmp_path.name  # no caption anywhere: the concept name
    assert scan.missing_captions == 1


def test_a_missing_caption_falls_back_to_concept_then_trigger_word(tmp_path):
    (tmp_path / "2_dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "2_dog" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    scan = scan_folder(tmp_path, trigger_word="zqx")
    assert [r.caption for r in scan.records] == ["dog", "zqx"]
    assert scan.missing_captions == 2


def test_a_broken_metadata_line_names_the_file_and_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{oops\n')
    with pytest.raises(UserError, match=r"metadata.jsonl:2: expected a JSON object"):
        scan_folder(tmp_path)


CAPTION = "the style, a, b, c, d, e, f, g"


def draws(options: CaptionOptions, count: int = 200, caption: str = CAPTION) -> list[str]:
    return [process_caption(caption, options, derived_generator(7, i)) for i in range(count)]


def test_shuffle_keeps_the_trigger_and_the_first_keep_tokens_in_place():
    out = draws(CaptionOptions(trigger_word="zqx", shuffle=True, keep_tokens=1))
    assert all(c.startswith("zqx, the style, ") for c in out)
    assert all(sorted(c.split(", ")[2:]) == list("abcdefg") for c in out)
    assert len(set(out)) > 50
    assert draws(CaptionOptions(trigger_word="zqx", shuffle=True, keep_tokens=1)) == out


def test_caption_and_tag_dropout_rates():
    whole = draws(CaptionOptions(dropout_rate=0.25), 400)
    assert 60 < whole.count("") < 140 and set(whole) == {"", CAPTION}
    tags = draws(CaptionOptions(tag_dropout_rate=0.5, keep_tokens=1), 400)
    assert all(c.startswith("the style") for c in tags)
    kept = np.mean([len(c.split(", ")) - 1 for c in tags])
    assert 3.0 < kept < 4.0  # half of the 7 droppable tags on average


def test_options_off_draw_nothing_from_the_generator():
    rng = derived_generator(1)
    assert process_caption("a, b", CaptionOptions(trigger_word="t"), rng) == "t, a, b"
    assert torch.equal(rng.get_state(), derived_generator(1).get_state())


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("L", 100, (100, 100, 100)),
        ("LA", (100, 0), (10, 20, 30)),
        ("RGBA", (255, 0, 0, 0), (10, 20, 30)),
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ],
)
def test_every_mode_becomes_rgb_with_alpha_on_the_background(tmp_path, mode, value, expected):
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    Image.new(mode, (4, 4), value).save(path)
    assert load_rgb(path, background=(10, 20, 30)).getpixel((1, 1)) == expected


def test_palette_with_transparency_is_composited(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.save(tmp_path / "p.png", transparency=0)
    rgb = load_rgb(tmp_path / "p.png", background=(0, 255, 0))
    assert rgb.getpixel((0, 0)) == (0, 255, 0) and rgb.getpixel((1, 1)) == (200, 0, 0)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64), (4, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    grey = np.asarray(load_rgb(tmp_path / "deep.png"))[..., 0]
    assert grey[0, 0] == 0 and grey[0, -1] == 255
    assert 120 <= grey[0, 32] <= 135  # mid-range stays mid-grey, not white
    assert len(np.unique(grey)) > 60


def test_exif_orientation_is_honoured_in_scan_and_load(tmp_path):
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    image.save(tmp_path / "r.jpg", exif=exif, quality=95)
    record = scan_folder(tmp_path).records[0]
    assert record.size == (20, 60)
    upright = load_rgb(record.path)
    assert upright.size == (20, 60)
    r, g, b = upright.getpixel((10, 2))  # the left edge is now the top
    assert b > 200 and r < 60


def test_a_caption_that_has_the_trigger_word_anywhere_keeps_it_once():
    rng = derived_generator(1)
    at_end = "a circle, mustard circle, zqxstyle"
    assert process_caption(at_end, CaptionOptions(trigger_word="zqxstyle"), rng) == at_end
    # a word that merely contains it does not count
    assert process_caption("zqxstyles, a", CaptionOptions(trigger_word="zqxstyle"), rng) == (
        "zqxstyle, zqxstyles, a"
    )
    dropped = draws(CaptionOptions(trigger_word="zqxstyle", tag_dropout_rate=0.9), 50, at_end)
    assert all("zqxstyle" in caption for caption in dropped)
