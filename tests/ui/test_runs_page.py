"""The Runs page in headless Chromium: the machine's load, the queue's order shown and changed
(and kept in the store, whichever UI reads it), the table at 1280 px, and the Tools page on a
finished run's adapter: merge, resize, combine."""

from __future__ import annotations

import re
import threading
import time

import pytest
from safetensors import safe_open
from ui_fixtures import run_settings, server_over_demo_style

from stylelora.ui.store import Store

WIDTHS = (800, 1280, 1600)


def tiny_settings(name: str, steps: int) -> dict[str, str]:
    return run_settings(name, steps, model="tiny:sd15", **{"train.learning_rate": "1e-2"})


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    server = server_over_demo_style(tmp_path_factory, "runs-root")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def queue(ui) -> dict[str, int]:
    """A long run that holds the slot, and two short ones queued behind it."""
    ids = {}
    for name, steps in (("blocker", 100_000), ("first-in-the-queue", 10), ("second-in-queue", 10)):
        status, reply = ui.call("POST", "/api/runs", {"settings": tiny_settings(name, steps)})
        assert status == 200, reply
        ids[name] = reply["id"]
    ui.wait_for(ids["blocker"], lambda run: run["status"] == "running")
    return ids


def test_the_machine_is_shown_and_refreshed(ui, page):
    page.goto(ui.url("/"))
    page.wait_for_function("/^\\d+% of \\d+$/.test(document.querySelector('#cpu').textContent)")
    assert re.fullmatch(r"\d+\.\d / \d+\.\d GiB", page.inner_text("#ram"))
    try:
        import pynvml  # noqa: F401

        has_nvml = True
    except ImportError:
        has_nvml = False
    if not has_nvml:  # no GPU line at all where NVIDIA's library is missing
        assert page.locator("#gpus .gpu").count() == 0
    with page.expect_request("**/api/machine", timeout=10_000):
        pass  # the page asks again by itself
    assert page.errors == []


def test_the_queue_shows_each_place_and_a_new_order_is_kept_and_followed(ui, page, queue):
    first, second = queue["first-in-the-queue"], queue["second-in-queue"]
    page.goto(ui.url("/"))
    page.wait_for_selector(f"tr[data-run='{second}'][data-place='2']")
    assert "#1 in queue" in page.inner_text(f"tr[data-run='{first}'] td.status")
    assert page.locator(f"tr[data-run='{first}'] [data-action='up']").count() == 0
    page.click(f"tr[data-run='{second}'] [data-action='front']")
    page.wait_for_selector(f"tr[data-run='{second}'][data-place='1']")
    assert "#2 in queue" in page.inner_text(f"tr[data-run='{first}'] td.status")
    # kept in the store: what another UI over the same folder reads
    assert [run.id for run in Store(ui.data / "ui.db").queued()] == [second, first]
    page.click(f"tr[data-run='{second}'] [data-action='down']")
    page.wait_for_selector(f"tr[data-run='{second}'][data-place='2']")
    page.click(f"tr[data-run='{second}'] [data-action='up']")
    page.wait_for_selector(f"tr[data-run='{second}'][data-place='1']")
    status, reply = ui.call("POST", f"/api/runs/{queue['blocker']}/move", {"to": "up"})
    assert (
        status == 400
        and reply["error"] == f"run {queue['blocker']} is running: only a queued run moves"
    )

    # the slot frees: the queue starts in its new order
    assert ui.call("POST", f"/api/runs/{queue['blocker']}/stop")[0] == 200
    ui.wait_for(second, lambda r: r["status"] != "queued", 120)
    assert ui.wait_for(first, lambda r: True)["status"] == "queued"
    assert ui.call("POST", f"/api/runs/{first}/stop")[0] == 200  # out of the queue
    page.wait_for_selector(f"tr[data-run='{first}'] .status.stopped")
    assert page.locator(f"tr[data-run='{first}'] .place").count() == 0
    ui.wait_for(second, lambda r: r["status"] == "finished", 300)
    assert page.errors == []


def test_two_stores_over_one_folder_move_without_losing_a_run(ui, tmp_path):
    stores = [Store(tmp_path / "ui.db"), Store(tmp_path / "ui.db")]
    ids = [stores[0].add(f"r{i}", tmp_path / "c.toml", tmp_path).id for i in range(6)]
    moves = [("front", ids[5]), ("down", ids[0]), ("up", ids[3]), ("front", ids[2])] * 5

    def mover(store: Store) -> None:
        for to, run_id in moves:
            assert store.move(run_id, to)

    threads = [threading.Thread(target=mover, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    order = [run.id for run in stores[1].queued()]
    assert sorted(order) == ids  # every run still queued once
    assert stores[0].next_queued().id == order[0]


def test_the_runs_table_keeps_names_and_steps_on_one_line(ui, browser, queue):
    ui.call("POST", f"/api/runs/{queue['blocker']}/stop")  # (stopped by the queue's test)
    ui.wait_for(queue["blocker"], lambda r: r["status"] == "stopped", 120)
    # a run that failed as one does at start, with the trainer's line beside it
    store = Store(ui.data / "ui.db")
    folder = ui.root / "runs" / "failed-at-start"
    failed = store.add("failed-at-start", folder / "config.toml", folder)
    message = (
        f"stylelora: error: data.dir {ui.root / 'empty'}: no images found "
        "(supported: .png, .jpg, .jpeg, .webp, .bmp); add images or fix data.dir"
    )
    store.update(failed.id, status="failed", started_at=time.time(), message=message)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(ui.url("/"))
    page.wait_for_selector(f"tr[data-run='{queue['blocker']}'] .status.stopped")
    lines = page.evaluate("""() => [...document.querySelectorAll('#runs tbody tr')].flatMap(tr =>
        [2, 3, 4].map(n => { const range = document.createRange();
          range.selectNodeContents(tr.querySelector(`td:nth-child(${n})`).firstChild);
          return range.getClientRects().length; }))""")
    assert lines and set(lines) == {1}, lines
    context.close()


def test_merge_into_the_base_model_from_the_tools_page(ui, page, queue):
    run_id = queue["second-in-queue"]
    page.goto(ui.url(f"/runs/{run_id}"))
    page.click("#tools")
    page.wait_for_url(re.compile(rf"/tools\?run={run_id}$"))
    page.select_option("#merge-dtype", "fp32")
    page.click("#merge")
    page.wait_for_selector("body[data-job='done']", timeout=180_000)
    item = page.locator("#results li[data-name='second-in-queue-merged.safetensors']")
    assert "a model: runs/second-in-queue/tools/second-in-queue-merged.safetensors" in (
        item.inner_text()
    )
    merged = ui.root / "runs" / "second-in-queue" / "tools" / "second-in-queue-merged.safetensors"
    download = page.request.get(ui.url(item.locator("a").first.get_attribute("href")))
    assert download.ok and download.body() == merged.read_bytes()
    with safe_open(str(merged), "pt") as handle:
        keys = list(handle.keys())
        assert any("attn2.to_k" in key for key in keys)
        assert handle.get_tensor(keys[0]).dtype.is_floating_point
    assert page.errors == []


def test_resize_from_the_tools_page_with_its_rank_checked(ui, page, queue):
    run_id = queue["second-in-queue"]
    page.goto(ui.url(f"/tools?run={run_id}"))
    page.wait_for_function("document.querySelector('#rank').textContent === '16'")
    page.fill("#resize-rank", "0")
    page.click("#resize")
    page.wait_for_function("document.querySelector('#error').textContent")
    assert page.inner_text("#error") == "rank: must be between 1 and 4096 (got '0')"
    page.fill("#resize-rank", "4")
    page.click("#resize")
    page.wait_for_selector("body[data-job='done']", timeout=180_000)
    path = ui.root / "runs" / "second-in-queue" / "tools" / "second-in-queue-rank4.safetensors"
    with safe_open(str(path), "pt") as handle:
        downs = [handle.get_tensor(k) for k in list(handle.keys()) if k.endswith("down.weight")]
    assert downs and {down.shape[0] for down in downs} == {4}
    link = page.locator("#results li[data-name='second-in-queue-rank4.safetensors'] a").nth(1)
    assert link.inner_text() == "try it"
    assert "adapter=runs%2Fsecond-in-queue%2Ftools%2Fsecond-in-queue-rank4.safetensors" in (
        link.get_attribute("href")
    )
    assert page.errors == []


def test_combine_with_another_adapter_from_the_tools_page(ui, page, queue):
    run_id = queue["second-in-queue"]
    page.goto(ui.url(f"/tools?run={run_id}"))
    page.wait_for_selector("#combine-other option", state="attached")
    labels = page.eval_on_selector_all("#combine-other option", "os => os.map(o => o.textContent)")
    # what the tools wrote and the runs' adapters, not this one
    assert "second-in-queue-rank4.safetensors" in labels and "second-in-queue (final)" not in labels
    page.select_option("#combine-other", label="second-in-queue-rank4.safetensors")
    page.fill("#combine-other-strength", "0.5")
    page.click("#combine")
    page.wait_for_selector("body[data-job='done']", timeout=180_000)
    name = "second-in-queue+second-in-queue-rank4.safetensors"
    page.wait_for_selector(f"#results li[data-name='{name}']")
    path = ui.root / "runs" / "second-in-queue" / "tools" / name
    with safe_open(str(path), "pt") as handle:
        downs = [handle.get_tensor(k) for k in list(handle.keys()) if k.endswith("down.weight")]
    assert downs and {down.shape[0] for down in downs} == {20}  # the two ranks side by side
    assert page.errors == []


@pytest.mark.parametrize("width", [800, 1600])
def test_runs_try_and_tools_pages_fit_the_width(ui, browser, queue, width):
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    tools = f"/tools?run={queue['second-in-queue']}"
    pages = (("/", "#runs tbody tr"), ("/try", "#choice option"), (tools, "#combine-other option"))
    for path, ready in pages:
        page.goto(ui.url(path))
        page.wait_for_selector(ready, state="attached")
        fits = page.evaluate("document.documentElement.scrollWidth <= innerWidth")
        assert fits, (path, width)
    context.close()
