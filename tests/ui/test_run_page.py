"""A run's page in headless Chromium, as a first-time user watches it: the phase and its
progress, the queue, a stopped run's state, the loss chart, the whole log, labelled previews,
downloads of every checkpoint's adapter, the links onwards, a run that does not exist, and the
layout at 800 and 1600 px.

One UI and two short demo runs for the module: `watched` (finished, with previews, validation
and checkpoints) is followed from its start by a page that records what it showed; `stopper`
waits in the queue behind it, then trains until the last test stops it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from ui_fixtures import ROOT, UIServer, run_settings

from stylelora.adapters.state import read_header
from stylelora.train.progress import PROGRESS_FILE, read_events
from stylelora.ui.runner import LOG_FILE, whole_log

PROMPTS = ["a fish, zqxstyle --d 1", "a house, zqxstyle --d 2", "a ghost, zqxstyle --d 3"]
WIDTHS = (800, 1600)

# Before the page's scripts: every text #phase showed, and every log chunk the server sent.
RECORDER = """
window.recorded = { phases: [], logLines: [] };
const Original = window.EventSource;
window.EventSource = function (...args) {
  const source = new Original(...args);
  source.addEventListener("message", (message) => {
    const log = JSON.parse(message.data).log;
    if (log) window.recorded.logLines.push(...log.lines);
  });
  return source;
};
new MutationObserver(() => {
  const phase = document.getElementById("phase");
  const text = phase && !phase.hidden ? phase.textContent : "";
  const seen = window.recorded.phases;
  if (text && seen[seen.length - 1] !== text) seen.push(text);
}).observe(document, { subtree: true, childList: true, characterData: true, attributes: true });
"""


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("run-page")
    shutil.copytree(ROOT / "datasets" / "demo-style", root / "style",
                    ignore=shutil.ignore_patterns(".*"))  # fmt: skip
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    server = UIServer(root, root / ".ui", token="t").start()
    yield server
    server.stop()


def start(ui: UIServer, name: str, steps: int, **extra: str) -> int:
    status, reply = ui.call("POST", "/api/runs", {"settings": run_settings(name, steps, **extra)})
    assert status == 200, reply
    return reply["id"]


@pytest.fixture(scope="module")
def runs(ui, browser):
    """`watched` started and followed by a recording page; `stopper` queued behind it."""
    watched = start(ui, "watched", 20, **{
        "sample.prompts_file": "prompts.txt", "sample.every_n_steps": "10",
        "sample.num_inference_steps": "6", "train.checkpoint_every_n_steps": "10",
        "validation.split": "0.2", "validation.every_n_steps": "10",
        "validation.measure": "true", "validation.measure_prompts": "2",
        "validation.measure_steps": "4",
    })  # fmt: skip
    stopper = start(ui, "stopper", 3000)  # its checkpoint: the one a stop writes
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.add_init_script(RECORDER)
    page = context.new_page()
    page.goto(ui.url(f"/runs/{watched}"))
    yield {"watched": watched, "stopper": stopper, "recorder": page}
    context.close()


@pytest.fixture(scope="module")
def finished(ui, runs) -> dict:
    """The recording page once `watched` finished, and what it recorded."""
    page = runs["recorder"]
    page.wait_for_selector("body[data-status='finished']", timeout=180_000)
    return {**runs, "recorded": page.evaluate("window.recorded")}


def open_page(browser, url: str, width: int = 1600):
    page = browser.new_page(viewport={"width": width, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors
    page.goto(url)
    return page


def fits(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_a_queued_run_shows_its_place_and_leaves_the_queue_with_a_confirmed_remove(
    ui, runs, browser
):
    first, second = start(ui, "queued-a", 10), start(ui, "queued-b", 10)
    ui.wait_for(runs["watched"], lambda r: r["status"] == "running")
    page = open_page(browser, ui.url(f"/runs/{second}"))
    page.wait_for_selector("body[data-status='queued']")
    # behind `stopper` and `first`
    assert page.inner_text("#status") == "queued, 3rd"
    assert page.inner_text("#stop") == "Remove from queue"
    for hidden in ("#remove", "#resume", "#speed-box", "#left-box", "#phase", "#clone"):
        assert not page.is_visible(hidden), hidden
    assert ui.call("POST", f"/api/runs/{first}/stop")[0] == 200
    page.wait_for_function("document.querySelector('#status').textContent === 'queued, 2nd'")
    page.click("#stop")
    page.wait_for_selector("body[data-status='stopped']")
    assert "taken out of the queue" in page.inner_text("#message")
    assert page.inner_text("#resume") == "Start again"
    assert fits(page)

    # Remove asks first: dismissed, the run stays; accepted, it goes (its folder stays)
    asked: list[str] = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    page.click("#remove")
    assert asked and "stays on disk" in asked[0]
    assert ui.call("GET", f"/api/runs/{second}")[0] == 200
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#remove")
    page.wait_for_url(ui.url("/"))
    assert ui.call("GET", f"/api/runs/{second}")[0] == 404

    # and on the Runs list
    row = page.locator(f"tr[data-run='{first}']")
    page.once("dialog", lambda dialog: dialog.dismiss())
    row.locator("[data-action='remove']").click()
    page.wait_for_timeout(300)
    assert row.count() == 1
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("[data-action='remove']").click()
    row.wait_for(state="detached")
    assert page.errors == []
    page.close()


def test_the_phase_shows_with_its_progress(finished):
    phases = finished["recorded"]["phases"]
    assert "training" in phases, phases
    rendering = [re.fullmatch(r"rendering previews (\d+)/(\d+)", text) for text in phases]
    counts = [(int(m[1]), int(m[2])) for m in rendering if m]
    # the first grid draws both columns (6 images), the second only the adapted one
    assert any(total == 6 and 0 < done < total for done, total in counts), phases
    page = finished["recorder"]
    assert not page.is_visible("#phase")  # nothing is going on once it finished


def test_style_and_content_are_drawn_as_they_are_measured_and_the_pick_named(finished):
    page = finished["recorder"]
    assert page.is_visible("#measure-curves")
    for kind in ("style", "content", "copying"):  # measured at both checkpoints
        assert page.locator(f"#measure-curves .{kind}-dot").count() == 2
    assert page.locator("#measure-curves .picked").count() == 1
    assert re.match(
        r"picked: step (10|20) \(the first measured step whose style ",
        page.inner_text("#measure-pick"),
    )
    assert "watched-best.safetensors" in page.inner_text("#downloads")


def test_the_whole_log_is_shown_sent_once_and_downloadable(ui, finished, tmp_path):
    page = finished["recorder"]
    folder = ui.root / "runs" / "watched"
    whole = whole_log(folder / LOG_FILE)
    shown = page.inner_text("#log")
    assert shown.strip() == whole.strip()
    assert shown.startswith("$ ") and "dataset: 24 images" in shown
    assert "validation: 5 held-out image(s)" in shown
    assert "training: 100%" in shown and "\r" not in shown
    # each line came once, as it was written (not the log's tail again at every change)
    assert finished["recorded"]["logLines"] == whole.rstrip("\n").split("\n")

    with page.expect_download() as download:
        page.click("#log-download")
    saved = tmp_path / "watched.log"
    download.value.save_as(saved)
    assert download.value.suggested_filename == "watched.log"
    assert saved.read_text().strip() == whole.strip()


def test_previews_are_labelled_and_open_full_size(finished):
    page = finished["recorder"]
    figures = page.locator("#gallery figure")
    assert figures.count() == 2
    latest = figures.first
    text = latest.inner_text()
    assert "step 20" in text and "without the adapter" in text and "with it" in text
    for prompt in PROMPTS:
        assert prompt.split(" --")[0] in text
    image = latest.locator("img")
    image.evaluate("img => img.decode()")
    assert image.bounding_box()["width"] >= 300
    image.click()
    page.wait_for_selector("#lightbox:not([hidden])")
    assert page.get_attribute("#lightbox-img", "src") == image.get_attribute("src")
    assert page.evaluate("document.querySelector('#lightbox-img').naturalWidth") > 0
    page.keyboard.press("Escape")
    page.wait_for_selector("#lightbox", state="hidden")


def debiased_ema(values: list[float], weight: float = 0.9) -> list[float]:
    average, result = 0.0, []
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        result.append(average / (1 - weight**index))
    return result


def test_the_loss_chart_has_axes_hover_the_learning_rate_and_the_pages_width(ui, finished, browser):
    page = open_page(browser, ui.url(f"/runs/{finished['watched']}"), 1600)
    page.wait_for_selector("#curves .line.smooth")
    assert page.locator("#curves text.tick.x").count() >= 3
    assert page.locator("#curves text.tick.y").count() >= 3
    assert page.locator("#curves text.tick.lr").count() >= 2
    assert (
        page.locator("#curves .line.lr").count() == page.locator("#curves .line.val").count() == 1
    )
    chart_width = page.locator("#curves").bounding_box()["width"]
    main_width = page.evaluate("document.querySelector('main').clientWidth")
    assert chart_width > 1000 and chart_width > main_width - 80

    events, _ = read_events(ui.root / "runs" / "watched" / PROGRESS_FILE)
    losses = [e["loss"] for e in events if e["event"] == "step"]
    box = page.locator("#curves").bounding_box()
    plot_left, plot_right = 58, box["width"] - 66  # the chart's margins
    page.mouse.move(box["x"] + plot_left + (plot_right - plot_left) * 5 / 20, box["y"] + 100)
    tip = page.locator("#chart-tip")
    tip.wait_for()
    found = re.search(
        r"step (\d+) · loss ([\d.]+) · smoothed ([\d.]+) · lr ([\d.e+-]+)", tip.inner_text()
    )
    assert found, tip.inner_text()
    step = int(found[1])
    assert 4 <= step <= 6
    assert float(found[2]) == pytest.approx(losses[step - 1], abs=6e-5)
    # smoothing starts right (TensorBoard's bias correction), not from step 1's loss
    assert float(found[3]) == pytest.approx(debiased_ema(losses)[step - 1], abs=6e-5)
    assert float(found[4]) == pytest.approx(1e-3)
    assert "validation" in tip.inner_text()

    page.set_viewport_size({"width": 800, "height": 900})
    page.wait_for_function("document.querySelector('#curves').getBoundingClientRect().width < 800")
    assert fits(page)
    assert page.errors == []
    page.close()


def test_downloads_hold_every_checkpoints_adapter_and_links_lead_on(ui, finished, tmp_path):
    page, run_id = finished["recorder"], finished["watched"]
    page.wait_for_selector("#checkpoints li")
    steps = [int(s) for s in page.locator("#checkpoints li").evaluate_all(
        "items => items.map(item => item.dataset.step)")]  # fmt: skip
    assert steps == [20, 10]  # newest first
    for step in steps:
        item = page.locator(f"#checkpoints li[data-step='{step}']")
        assert item.locator("a", has_text="try it").get_attribute("href") == (
            f"/try?run={run_id}&step={step}"
        )
        with page.expect_download() as download:
            item.locator("a", has_text=".safetensors").click()
        saved = tmp_path / download.value.suggested_filename
        download.value.save_as(saved)
        assert saved.name == f"watched-step-{step:06d}.safetensors"
        names, metadata = read_header(saved)
        assert metadata["ss_steps"] == str(step) and any(n.startswith("lora_unet_") for n in names)
    downloads = page.inner_text("#downloads")
    for name in ("watched.safetensors", "report.html", "watched.log"):
        assert name in downloads
    assert page.get_attribute("#try", "href") == f"/try?run={run_id}"
    assert page.get_attribute("#clone", "href") == f"/new?clone={run_id}"
    assert page.get_attribute("#tools", "href") == f"/tools?run={run_id}"
    assert page.inner_text("#tools") == "Merge, resize, combine"
    for link in ("#try", "#clone", "#tools"):
        assert page.is_visible(link)
    assert not page.is_visible("#speed-box") and not page.is_visible("#left-box")


@pytest.mark.parametrize("width", WIDTHS)
def test_no_sideways_scroll_and_nothing_for_a_run_that_does_not_exist(ui, finished, browser,
                                                                      width):  # fmt: skip
    page = open_page(browser, ui.url(f"/runs/{finished['watched']}"), width)
    page.wait_for_selector("#gallery img")
    page.wait_for_function("document.querySelector('#log').textContent.includes('training: 100%')")
    assert fits(page), page.evaluate("document.documentElement.scrollWidth")

    page.goto(ui.url("/runs/99"))
    page.wait_for_selector("#missing:not([hidden])")
    assert page.inner_text("main").strip() == "no run 99"
    assert page.locator("button:visible, h2:visible, pre:visible").count() == 0
    assert fits(page)
    assert page.errors == []
    page.close()


def test_a_stopped_run_shows_no_speed_nor_time_left_and_its_checkpoint_downloads(
    ui, finished, browser, tmp_path
):
    run_id = finished["stopper"]
    page = open_page(browser, ui.url(f"/runs/{run_id}"))
    page.wait_for_function("Number(document.body.dataset.step) >= 3", timeout=120_000)
    page.wait_for_function("document.querySelector('#speed').textContent !== '-'")
    assert "time left" in page.inner_text(".stats") and not page.is_visible("#clone")
    page.click("#stop")
    page.wait_for_selector("body[data-status='stopped']", timeout=60_000)
    stats = page.inner_text(".stats")
    assert "time left" not in stats and "speed" not in stats
    assert re.search(r"trained for \d+", stats), stats
    assert page.inner_text("#resume") == "Resume" and page.is_visible("#clone")
    assert not page.is_visible("#try") and not page.is_visible("#tools")
    page.wait_for_selector("#checkpoints li a:has-text('.safetensors')")
    link = page.locator("#checkpoints li a", has_text=".safetensors").first
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    names, _ = read_header(saved)
    assert saved.name.startswith("stopper-step-") and names
    _, detail = ui.call("GET", f"/api/runs/{run_id}")
    assert detail["status"] == "stopped" and detail["checkpoints"]
    assert fits(page) and page.errors == []
    page.close()


def test_the_log_follower_reads_only_what_is_new(tmp_path: Path):
    from stylelora.ui.runner import LogFollower

    log = tmp_path / "train.log"
    log.write_bytes(b"dataset: 3 images\ntraining:  10%|#\r")
    follower = LogFollower(log)
    assert follower.read() == {"lines": ["dataset: 3 images"], "partial": "training:  10%|#",
                               "restarted": False}  # fmt: skip
    assert follower.read() is None
    with open(log, "ab") as handle:
        handle.write(b"training:  20%|##\r" * 1000 + b"\r   \rstep 2: validation 0.1\n")
    assert follower.read() == {"lines": ["step 2: validation 0.1"], "partial": "",
                               "restarted": False}  # fmt: skip
    assert len(follower.pending) < 40
