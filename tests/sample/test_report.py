"""A run with previews, validation and TensorBoard: the grids, the event file, and report.html
as a real browser shows it."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import DEMO_DATA, demo_config
from PIL import Image

from stylelora.train.trainer import train

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def run(tiny_sd15_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    data.mkdir()
    demo = sorted(DEMO_DATA.glob("*.png"))[:8]
    for image in demo:
        shutil.copy(image, data)
        shutil.copy(image.with_suffix(".txt"), data)
    prompts = root / "prompts.txt"
    prompts.write_text("zqxstyle, a fish --d 1 --s 2 --l 1\nzqxstyle, a house --d 2 --s 2 --l 1\n")
    cfg = demo_config(
        root,
        f"model={str(tiny_sd15_dir)!r}",
        f"data.dir={str(data)!r}",
        f"sample.prompts_file={str(prompts)!r}",
        "sample.every_n_steps=2",
        "train.max_steps=4",
        "train.learning_rate=1e-2",
        "train.lr_warmup_steps=0",
        "validation.split=0.25",
        "validation.every_n_steps=2",
    )
    return cfg, train(cfg)


def halves(path) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    width = pixels.shape[1] // 2
    return pixels[:, :width], pixels[:, width:]


def test_preview_grids_put_the_base_model_beside_the_adapter(run):
    cfg, result = run
    assert [p.name for p in result.previews] == ["demo-style_000002.png", "demo-style_000004.png"]
    assert Image.open(result.previews[-1]).size == (2 * 64, 2 * 64)  # 2 prompts x (base, tuned)
    base_early, _ = halves(result.previews[0])
    base_late, tuned_late = halves(result.previews[-1])
    assert np.array_equal(base_early, base_late)  # same seeds, same frozen model
    assert np.abs(tuned_late - base_late).max() > 0  # the adapter changes the image


def test_tensorboard_has_the_scalars_and_the_previews(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, result = run
    events = EventAccumulator(str(cfg.output_dir / "logs" / cfg.name), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss", "lr", "validation_loss"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("validation_loss")] == [0, 2, 4]
    assert [e.step for e in events.Images("preview")] == [2, 4]


def test_report_renders_in_a_headless_browser_with_every_image_loaded(run, tmp_path):
    browser = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    cfg, result = run
    report = cfg.output_dir / "report.html"
    url = report.resolve().as_uri()
    common = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    shot = tmp_path / "report.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1000,1400", url],
        capture_output=True,
        timeout=60,
        check=True,
    )
    pixels = np.asarray(Image.open(shot).convert("L")).astype(float)
    assert pixels.shape == (1400, 1000)
    assert pixels.std() > 20, "the screenshot is (nearly) blank"

    dom = subprocess.run(
        [*common, "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    # The curves and two preview grids, all decoded (naturalWidth > 0), none broken.
    assert 'data-images-loaded="3"' in body and 'data-images-broken="0"' in body, body
    assert "finished: step 4 of 4" in dom
    assert "validation loss" in dom and '"learning_rate": 0.01' in dom


def test_previews_every_n_epochs(tiny_sd15_dir, demo_subset, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fish --d 1 --s 1\n")
    cfg = demo_config(
        tmp_path,
        f"model={str(tiny_sd15_dir)!r}",
        f"data.dir={str(demo_subset(4))!r}",
        f"sample.prompts_file={str(prompts)!r}",
        "sample.every_n_steps=0",
        "sample.every_n_epochs=1",
        "train.batch_size=2",
        "train.max_steps=5",
        "train.log_with='none'",
    )
    result = train(cfg)
    # Two steps an epoch: after epochs 1 and 2, and at the end.
    assert [p.name[-10:-4] for p in result.previews] == ["000002", "000004", "000005"]
