"""`stylelora caption` on a folder, with a tiny WD-layout tagger whose output is known."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from PIL import Image
from tiny_tagger import expected_probabilities, write_tiny_tagger

from stylelora.caption.command import stop_on_sigterm
from stylelora.caption.models import VLM_NAMES, CaptionOptions, load_captioner
from stylelora.caption.record import EDITED, ELSEWHERE, RECORD_FILE
from stylelora.caption.run import caption_images, images_to_caption
from stylelora.cli import main

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> Path:
    return write_tiny_tagger(tmp_path_factory.mktemp("tagger"))


def solid(folder: Path, name: str, rgb, size=(24, 24)) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


def shown(tag: str) -> str:
    return tag if tag == "^_^" else tag.replace("_", " ")


def expected_tags(rgb, general: float = 0.35, character: float = 0.85) -> list[str]:
    """The tags the tagger should keep, computed from the model's own formula."""
    categories = {"1girl": 0, "red_background": 0, "blue_theme": 0, "^_^": 0}
    categories |= {"simple_background": 0, "low_confidence_tag": 0}
    categories |= {"hatsune_miku": 4, "kirisame_marisa": 4}
    probabilities = expected_probabilities(rgb)
    kept = [
        (p, name)
        for name, p in probabilities.items()
        if name in categories and p >= (character if categories[name] == 4 else general)
    ]
    return [shown(name) for _, name in sorted(kept, key=lambda item: -item[0])]


def caption(*args: str) -> int:
    return main(["caption", *map(str, args)])


def test_tags_follow_the_thresholds_most_confident_first_with_kohya_spacing(tmp_path, tagger):
    solid(tmp_path, "red.png", RED)
    solid(tmp_path, "blue.png", BLUE)
    args = ("--general-threshold", "0.75", "--character-threshold", "0.8", "--batch-size", "2")
    assert caption(tmp_path, "--model", tagger, *args) == 0
    red = (tmp_path / "red.txt").read_text().strip().split(", ")
    blue = (tmp_path / "blue.txt").read_text().strip().split(", ")
    assert red == expected_tags(RED, 0.75, 0.8)
    assert blue == expected_tags(BLUE, 0.75, 0.8)
    # the thresholds bite: 1girl (0.73) is under 0.75, hatsune_miku (0.82) over 0.8
    assert "1girl" not in red and "hatsune miku" in red and "red background" in red
    assert "blue theme" in blue and "red background" not in blue
    assert not {"general", "sensitive"} & set(red)  # ratings dropped
    assert caption(tmp_path, "--model", tagger, "--overwrite") == 0  # default thresholds
    red = (tmp_path / "red.txt").read_text().strip().split(", ")
    assert red == expected_tags(RED)
    assert "^_^" in red and "1girl" in red and "hatsune miku" not in red


def test_the_whole_folder_trigger_first_failures_named_and_recorded(tmp_path, tagger, capsys):
    solid(tmp_path, "a.png", RED)
    solid(tmp_path, "sub/b.jpg", BLUE)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    solid(tmp_path, ".trash/gone.png", RED)
    wording = ("--trigger", "zqxstyle", "--prefix", "flat colours", "--suffix", "outlined")
    assert caption(tmp_path, "--model", tagger, *wording) == 0
    text = (tmp_path / "a.txt").read_text()
    assert text == "zqxstyle, flat colours, " + ", ".join(expected_tags(RED)) + ", outlined\n"
    assert (tmp_path / "sub" / "b.txt").read_text().startswith("zqxstyle, flat colours, blue")
    assert not (tmp_path / "broken.txt").exists()
    assert not (tmp_path / ".trash" / "gone.txt").exists()
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith("stylelora caption: 2 written in ")
    assert summary.endswith("1 failed (broken.png: not an image)")
    record = json.loads((tmp_path / RECORD_FILE).read_text())["files"]
    assert sorted(record) == ["a.txt", "sub/b.txt"]
    assert record["a.txt"]["captioner"] == f"WD tagger ({tagger})"
    assert record["a.txt"]["settings"] == {"general_threshold": 0.35, "character_threshold": 0.85}


def test_existing_captions_are_kept_unless_overwritten(tmp_path, tagger, capsys):
    solid(tmp_path, "a.png", RED)
    solid(tmp_path, "b.png", BLUE)
    (tmp_path / "a.txt").write_text("my own words\n")
    assert caption(tmp_path, "--model", tagger) == 0
    assert (tmp_path / "a.txt").read_text() == "my own words\n"
    assert (tmp_path / "b.txt").read_text().startswith("blue theme")
    err = capsys.readouterr().err
    assert "1 written" in err and "1 skipped (they have captions" in err
    assert caption(tmp_path, "--model", tagger, "--skip-existing") == 0
    assert "0 written, 2 skipped" in capsys.readouterr().err
    assert caption(tmp_path, "--model", tagger, "--overwrite", "--extension", ".caption") == 0
    assert (tmp_path / "a.caption").read_text().startswith("red background")
    assert (tmp_path / "a.txt").read_text() == "my own words\n"


def test_a_stop_between_batches_leaves_whole_files_and_the_rerun_continues(tmp_path, tagger):
    for i in range(6):
        solid(tmp_path, f"{i}.png", RED if i % 2 else BLUE)
    todo, _ = images_to_caption(tmp_path, ".txt", overwrite=False)
    captioner = load_captioner(str(tagger), CaptionOptions())
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop_on_sigterm()  # the UI's Cancel: a SIGTERM arrives after the second batch
        summary = caption_images(
            tmp_path,
            todo,
            captioner,
            str(tagger),
            batch_size=2,
            on_batch=lambda done: done == 4 and os.kill(os.getpid(), signal.SIGTERM),
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert summary.stopped and summary.written == 4
    assert sorted(p.name for p in tmp_path.glob("*.txt")) == [f"{i}.txt" for i in range(4)]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    record = json.loads((tmp_path / RECORD_FILE).read_text())["files"]
    assert sorted(record) == [f"{i}.txt" for i in range(4)]
    first = {p.name: p.read_text() for p in tmp_path.glob("*.txt")}
    assert caption(tmp_path, "--model", tagger, "--skip-existing") == 0
    assert len(list(tmp_path.glob("*.txt"))) == 6
    assert {name: (tmp_path / name).read_text() for name in first} == first
    assert len(json.loads((tmp_path / RECORD_FILE).read_text())["files"]) == 6


def test_dataset_check_counts_captions_by_captioner_and_edits(tmp_path, tagger, capsys):
    for i in range(3):
        solid(tmp_path, f"{i}.png", RED)
    solid(tmp_path, "3.png", BLUE)
    (tmp_path / "3.txt").write_text("by hand")
    assert caption(tmp_path, "--model", tagger) == 0
    (tmp_path / "0.txt").write_text("zqxstyle, edited\n")
    capsys.readouterr()
    assert main(["dataset", "check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "  caption files by author:" in out
    assert f"    2 WD tagger ({tagger})" in out
    assert f"    1 {EDITED}" in out and f"    1 {ELSEWHERE}" in out


@pytest.mark.parametrize("kind", ["florence2", "qwen2_5_vl", "qwen3_vl", "llava"])
def test_the_whole_command_with_each_vision_language_model(tmp_path, tiny_vlm, kind):
    solid(tmp_path, "a.png", RED, (40, 24))
    solid(tmp_path, "b.png", BLUE)
    solid(tmp_path, "c.png", RED)
    args = ("--trigger", "zqxstyle", "--suffix", "flat", "--max-tokens", "6", "--batch-size", "2")
    assert caption(tmp_path, "--model", tiny_vlm(kind), *args) == 0
    record = json.loads((tmp_path / RECORD_FILE).read_text())["files"]
    assert sorted(record) == ["a.txt", "b.txt", "c.txt"]
    for name in record:
        lines = (tmp_path / name).read_text().splitlines()
        # one line: the trigger word, whatever the random model wrote, the suffix
        assert len(lines) == 1 and lines[0].startswith("zqxstyle, ") and lines[0].endswith(", flat")
        assert len(lines[0]) > len("zqxstyle, , flat")
        assert record[name]["captioner"] == f"{VLM_NAMES[kind]} ({tiny_vlm(kind)})"
        assert record[name]["settings"]["max_tokens"] == 6


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--model", "someone/not-cached"], ["someone/not-cached is not in the local cache"]),
        (["--model", "/no/such/folder"], ["no folder and no hub id"]),
        (["--model", "{empty}"], ["neither a transformers config.json"]),
        (["--model", "{tagger}", "--style", "natural"], ["is a tagger and writes tags"]),
        (["--extension", ".png"], [".png' is an image extension"]),
        (["--general-threshold", "2"], ["expected a number from 0 to 1"]),
        (["--batch-size", "0"], ["expected a whole number from 1"]),
    ],
)
def test_bad_input_gets_one_line(tmp_path, tagger, capsys, monkeypatch, args, fragments):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = tmp_path / "images"
    solid(folder, "a.png", RED)
    (tmp_path / "empty").mkdir()
    args = [a.format(tagger=tagger, empty=tmp_path / "empty") for a in args]
    try:
        status = caption(folder, *args)
    except SystemExit as exc:  # argparse's refusal of a value
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert all(fragment in err[-1] for fragment in fragments), err
    assert not (folder / "a.txt").exists()


def test_an_empty_folder_or_no_folder_is_named(tmp_path, tagger, capsys):
    (tmp_path / "empty").mkdir()
    assert caption(tmp_path / "empty", "--model", tagger) == 2
    assert "empty: no images" in capsys.readouterr().err
    assert caption(tmp_path / "missing", "--model", tagger) == 2
    assert "missing: folder not found" in capsys.readouterr().err
