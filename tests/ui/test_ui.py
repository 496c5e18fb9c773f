"""The UI end to end in headless Chromium: a run started from the form and watched to its end,
previews in the gallery, a caption edited, a run stopped and resumed, the UI restarted under
a run, and trying the adapter."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from ui_fixtures import UIServer, run_settings, screenshot

from stylelora.config import tomllib
from stylelora.train.progress import PROGRESS_FILE, read_events

FINISHED = '[data-status="finished"]'


def test_a_first_time_user_trains_the_demo_tries_it_and_downloads_it(server, page, tmp_path):
    """The UI as the README starts it (`stylelora ui --root DIR`), used as someone new to it
    would: from the Runs page to New run, the demo started from the essentials without a path
    typed, watched to its end, its adapter tried at full and half strength from the run's page,
    and downloaded."""
    page.goto(server.url("/"))
    page.click("header a:has-text('New run')")
    page.wait_for_url(re.compile(r"/new$"))
    # the demo loads by itself: every path already inside the root, the rest of the config
    # closed under All settings
    page.wait_for_function("document.querySelector('#field-name')?.value === 'demo-style'")
    assert page.is_visible("#essentials") and not page.eval_on_selector(
        "#all-settings", "d => d.open"
    )
    assert page.input_value("#field-data\\.dir") == "demo-style"
    assert (server.root / "demo-style" / "00-circle.png").is_file()
    assert (server.root / "demo-prompts.txt").is_file()
    # a value the CLI refuses is named beside its field, in the CLI's words
    set_field(page, "train.learning_rate", "-1")
    page.locator("#problem-train\\.learning_rate").filter(has_text="greater than 0").wait_for()
    set_field(page, "train.learning_rate", "1e-3")
    # fewer steps, in the essentials; shorter previews, under All settings (the suite's time)
    assert page.locator("#essentials #field-train\\.max_steps").count() == 1
    for key, value in {
        "train.max_steps": "40",
        "sample.every_n_steps": "20",
        "sample.num_inference_steps": "8",
    }.items():
        set_field(page, key, value)
    page.wait_for_function("!document.querySelector('#problem-output_dir').textContent")
    page.eval_on_selector("#all-settings", "d => { d.open = false; }")
    screenshot(page, "new-run", tmp_path)
    page.click("#start")
    page.wait_for_url(re.compile(r"/runs/\d+$"))
    page.wait_for_selector("body[data-status='running'], body" + FINISHED, timeout=60_000)
    page.wait_for_selector("body" + FINISHED, timeout=240_000)
    assert page.inner_text("#step") == page.inner_text("#max") == "40"
    # both previews in the gallery, each loaded as an image and labelled with its prompts
    page.wait_for_function(
        "[...document.querySelectorAll('#gallery img')].filter(i => i.naturalWidth > 0).length"
        " === 2"
    )
    assert "a fish, zqxstyle" in page.inner_text("#gallery")
    assert page.is_hidden("#speed-box") and page.is_hidden("#left-box")  # nothing stale
    screenshot(page, "run", tmp_path)
    run_dir = server.root / "runs" / "demo-style"
    written = tomllib.loads((run_dir / "config.toml").read_text())
    assert written["train"]["max_steps"] == 40
    assert written["data"]["dir"] == str(server.root / "demo-style")

    # the adapter downloads as the file the run wrote
    with page.expect_download() as download:
        page.click("#downloads a:text-is('demo-style.safetensors')")
    saved = tmp_path / "downloaded.safetensors"
    download.value.save_as(saved)
    assert saved.read_bytes() == (run_dir / "demo-style.safetensors").read_bytes()

    # tried from the run's page: model, adapter and size come with it; strengths 0, 0.5 and 1
    page.click("#try")
    page.wait_for_url(re.compile(r"/try\?run=\d+$"))
    page.wait_for_function("document.querySelector('#adapter').value.endsWith('.safetensors')")
    assert page.input_value("#model") == "demo:sd15" and page.input_value("#width") == "64"
    page.fill("#scales", "0, 0.5, 1")
    page.fill("#steps", "8")
    page.click("#render")
    page.wait_for_selector("body[data-render='done']", timeout=180_000)
    page.wait_for_function("document.querySelector('#result').naturalWidth > 0")
    assert page.eval_on_selector_all("#labels span", "s => s.map(x => x.textContent)") == [
        "strength 0",
        "strength 0.5",
        "strength 1",
    ]
    src = page.get_attribute("#result", "src")
    row = np.asarray(Image.open(server.data / "try" / Path(src).name).convert("RGB"), float)
    base, half, full = np.split(row, 3, axis=1)
    moved_half, moved_full = np.abs(half - base).mean(), np.abs(full - base).mean()
    print(f"mean change from the base: strength 0.5 {moved_half:.1f}, 1 {moved_full:.1f}")
    assert moved_full > 2.0 and 0 < moved_half < moved_full
    screenshot(page, "try", tmp_path)
    assert page.errors == []


def set_field(page, key: str, value: str) -> None:
    """Open the field's sections, type the value, leave the field (the form checks on change)."""
    selector = "#field-" + key.replace(".", "\\.")
    page.eval_on_selector(
        selector,
        "i => { for (let d = i.closest('details'); d; d = d.parentElement.closest('details'))"
        " d.open = true; }",
    )
    page.fill(selector, value)
    page.dispatch_event(selector, "change")


def test_a_caption_edited_in_place_is_written_to_disk(server, page, tmp_path):
    page.goto(server.url("/datasets?path=style&resolution=64"))
    card = page.locator(".card").filter(has_text="03-star.png")
    card.locator("img").evaluate("img => img.decode()")
    assert "bucket 64x64" in card.inner_text()
    card.locator("textarea").fill("a star, a new caption, zqxstyle")
    card.locator("button").click()
    card.get_by_text("saved").wait_for()
    assert (server.root / "style" / "03-star.txt").read_text() == (
        "a star, a new caption, zqxstyle\n"
    )
    leftovers = [p for p in (server.root / "style").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    screenshot(page, "datasets", tmp_path)

    # the files `dataset check` cannot use, each named with why
    mixed = server.root / "mixed"
    mixed.mkdir()
    shutil.copy(server.root / "style" / "00-circle.png", mixed)
    (mixed / "broken.png").write_bytes(b"not a png")
    page.goto(server.url("/datasets?path=mixed&resolution=64"))
    page.wait_for_selector(".card")
    assert "1 file cannot be used" in page.inner_text("#problems")
    assert "mixed/broken.png: " in page.inner_text("#problems")
    assert page.locator(".card").count() == 1
    status, reply = server.call("GET", "/api/dataset?path=mixed&resolution=100")
    assert status == 400 and "data.resolution 100 must be a multiple" in reply["error"]


def test_a_run_passes_between_the_command_line_and_the_ui(server, page):
    """Started on the command line and interrupted; imported, resumed and stopped in the UI;
    finished on the command line with the command the UI shows."""
    folder = server.root / "runs" / "relay"
    config = server.root / "relay.toml"
    config.write_text(
        f'name = "relay"\nmodel = "demo:sd15"\noutput_dir = "{folder}"\n'
        f'[data]\ndir = "{server.root / "style"}"\nresolution = 64\n'
        "[train]\nmax_steps = 60\nlearning_rate = 1e-3\n"
    )
    cli = subprocess.Popen(
        [sys.executable, "-m", "stylelora", "train", str(config)],
        cwd=server.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = wait_for_step(folder, 5)
    cli.send_signal(signal.SIGINT)
    assert cli.wait(timeout=60) == 130
    first = last_step(folder)

    status, reply = server.call("POST", "/api/runs/import", {"folder": "runs/relay"})
    assert status == 200, reply
    run_id = reply["id"]
    page.goto(server.url(f"/runs/{run_id}"))
    page.wait_for_selector("body[data-status='stopped']")
    page.click("#resume")
    page.wait_for_function(f"Number(document.body.dataset.step) >= {first + 5}", timeout=120_000)
    page.click("#stop")
    page.wait_for_selector("body[data-status='stopped']", timeout=60_000)
    stopped = server.wait_for(run_id, lambda r: r["status"] == "stopped")
    second = stopped["step"]
    assert stopped["can_resume"] and first + 5 <= second < 60
    assert re.search(rf"interrupted at step {second}", page.inner_text("#message"))
    log = (folder / "train.log").read_text(errors="replace")
    assert f"resuming from {folder / 'checkpoints' / f'step-{first:06d}'}: step {first}" in log

    _, detail = server.call("GET", f"/api/runs/{run_id}")
    command = detail["resume_command"].split()
    assert command[0] == "stylelora"
    done = subprocess.run([sys.executable, "-m", "stylelora", *command[1:]], cwd=server.root,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {folder / 'checkpoints' / f'step-{second:06d}'}" in done.stdout
    finished = server.wait_for(run_id, lambda r: r["status"] == "finished", timeout=30)
    assert finished["step"] == 60 and "command line" in finished["message"]
    page.wait_for_selector("body" + FINISHED, timeout=30_000)
    assert page.inner_text("#step") == "60"


def wait_for_step(folder: Path, step: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if last_step(folder) >= step:
            return last_step(folder)
        time.sleep(0.2)
    raise AssertionError(f"{folder} never reached step {step}")


def last_step(folder: Path) -> int:
    events, _ = read_events(folder / PROGRESS_FILE)
    return max((e["step"] for e in events if e["event"] == "step"), default=0)


def test_the_ui_finds_a_run_again_after_a_restart(workspace, browser, tmp_path):
    """The queue holds the second run while the first trains; the UI stops (as Ctrl-C does) and
    starts again: the first run went on and is stopped from the new UI's page, and the queue
    goes on in order."""
    data = tmp_path / "ui-data"
    first = UIServer(workspace, data, token="t").start()
    ids = []
    # far more steps than it is given time for (one thread trains about 20 a second)
    for name, steps in (("restart", 20_000), ("queued", 20)):
        status, reply = first.call("POST", "/api/runs", {"settings": run_settings(name, steps)})
        assert status == 200, reply
        ids.append(reply["id"])
    running = first.wait_for(ids[0], lambda r: r["step"] >= 5)
    assert first.wait_for(ids[1], lambda r: True)["status"] == "queued"  # one run at a time
    first.stop(end_runs=False)
    os.kill(running["pid"], 0)  # the run goes on without the UI

    second = UIServer(workspace, data, token="t").start()
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(second.url(f"/runs/{ids[0]}"))
        page.wait_for_selector("body[data-status='running']", timeout=30_000)
        step = int(page.inner_text("#step"))
        page.wait_for_function(f"Number(document.querySelector('#step').textContent) > {step}")
        page.click("#stop")
        page.wait_for_selector("body[data-status='stopped']", timeout=60_000)
        assert int(page.inner_text("#step")) > running["step"]  # it trained on without the UI
        done = second.wait_for(ids[1], lambda r: r["status"] == "finished")
        assert done["started_at"] >= second.wait_for(ids[0], lambda r: True)["ended_at"]
        page.goto(second.url("/"))
        page.wait_for_selector(f"tr[data-run='{ids[1]}'] .status.finished")
        screenshot(page, "runs", tmp_path)
        page.close()
    finally:
        second.stop()
