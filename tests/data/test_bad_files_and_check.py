"""Unusable files are found at scan time, reported with why, and `dataset check` reports them."""

import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from conftest import DEMO_CONFIG, DEMO_DATA, ROOT
from PIL import Image

from stylelora.cli import main
from stylelora.data.images import MAX_PIXELS
from stylelora.data.scan import scan_folder
from stylelora.errors import UserError


def encoded(fmt: str, size=(96, 96)) -> bytes:
    rng = np.random.default_rng(0)  # noise: compresses badly, so a cut loses real image data
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A valid small PNG whose header claims `width` x `height` (IHDR rewritten, CRC fixed)."""
    data = bytearray(encoded("PNG", (8, 8)))
    ihdr = bytearray(data[12:29])  # chunk type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def write_bad_dataset(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "good.png").write_bytes(encoded("PNG"))
    (folder / "good.txt").write_text("fine")
    (folder / "empty.png").write_bytes(b"")
    (folder / "half.jpg").write_bytes(encoded("JPEG")[: len(encoded("JPEG")) // 2])
    (folder / "half.png").write_bytes(encoded("PNG")[: len(encoded("PNG")) // 2])
    (folder / "text.webp").write_text("I am not a picture")
    (folder / "bomb.png").write_bytes(huge_png_header(20_000, 20_000))
    (folder / "tiny.png").write_bytes(encoded("PNG", (16, 16)))
    (folder / "latin.png").write_bytes(encoded("PNG"))
    (folder / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    return folder


def test_every_kind_of_bad_file_is_skipped_with_its_reason(tmp_path):
    assert MAX_PIXELS < 20_000 * 20_000
    scan = scan_folder(write_bad_dataset(tmp_path / "d"), min_image_size=32)
    assert [r.path.name for r in scan.records] == ["good.png", "latin.png"]
    reasons = {path.name: str(why) for path, why in scan.problems}
    assert reasons["empty.png"] == "empty file"
    assert reasons["half.jpg"].startswith("truncated or damaged image (")
    assert reasons["half.png"].startswith("truncated or damaged image (")
    assert reasons["text.webp"] == "not an image"
    assert reasons["bomb.png"].startswith("too large")
    assert reasons["tiny.png"] == "smaller than data.min_image_size 32 (16x16)"
    assert len(reasons) == 6


def test_strict_turns_any_bad_file_into_an_error(tmp_path):
    folder = write_bad_dataset(tmp_path / "d")
    with pytest.raises(UserError, match=r"data.strict: .*bomb.png: too large.*\(and 6 more\)"):
        scan_folder(folder, strict=True, min_image_size=32)


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stylelora", "dataset", "check", *args],
        cwd=ROOT, capture_output=True, text=True, env=os.environ, timeout=120,
    )  # fmt: skip


def test_dataset_check_reports_counts_buckets_and_problems(tmp_path):
    folder = write_bad_dataset(tmp_path / "d")
    sub = folder / "3_dog"
    sub.mkdir()
    (sub / "wide.png").write_bytes(encoded("PNG", (192, 64)))
    result = check(str(folder), "--config", str(DEMO_CONFIG))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "dataset: 4 images, 6 draws per epoch" in out
    assert "concept 'dog': 1 images x 3 repeats" in out
    assert "captions: 2/4 images have one" in out
    assert "  64x64: 4" in out  # at 64 px with step 64, the one bucket is the square
    assert "1 image upscaled to fit its bucket (x4.0)" in out  # tiny.png, 16x16
    assert "1 caption file was not UTF-8 and was read as cp1252: latin.txt" in out
    assert "skipped 5 files:" in out
    assert "half.jpg: truncated or damaged image" in out and "bomb.png: too large" in out


def test_dataset_check_of_the_demo_and_of_nothing_usable(tmp_path, capsys):
    """Through the command's `main` in this process (the test above runs it as a process)."""
    assert main(["dataset", "check", str(DEMO_DATA), "--config", str(DEMO_CONFIG)]) == 0
    out = capsys.readouterr().out
    assert "dataset: 24 images" in out and "64x64: 24" in out
    (tmp_path / "junk.png").write_bytes(b"junk")
    assert main(["dataset", "check", str(tmp_path)]) == 2
    nothing = capsys.readouterr()
    assert nothing.out.splitlines() == [
        "skipped 1 files:",
        f"  {tmp_path / 'junk.png'}: not an image",
    ]
    assert nothing.err.strip().splitlines() == [
        f"stylelora: error: data.dir {tmp_path}: no usable images: 1 not an image; "
        "each file is listed above"
    ]
