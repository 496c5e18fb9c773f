"""Trying an adapter in headless Chromium and on the command line: only the adapters that exist
are offered (a run's final one and its checkpoints', with the run's model), a checkpoint's
adapter renders, a strength sweep comes back as one labelled row at the asked size, a render
shows its progress and Cancel ends it."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from ui_fixtures import run_settings, server_over_demo_style

from stylelora.cli import main

RUN = "tiny-try"


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    server = server_over_demo_style(tmp_path_factory, "try-root")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def runs(ui) -> dict[str, int]:
    """A finished tiny run with checkpoints at steps 5 and 10, and a run that wrote nothing
    (imported from a folder that holds only its config)."""
    settings = run_settings(RUN, 10, model="tiny:sd15", **{
        "train.learning_rate": "1e-2", "train.checkpoint_every_n_steps": "5"})  # fmt: skip
    status, reply = ui.call("POST", "/api/runs", {"settings": settings})
    assert status == 200, reply
    ghost = ui.root / "runs" / "ghost"
    ghost.mkdir(parents=True)
    config = {"name": "ghost", "model": "tiny:sd15", "data": {"dir": str(ui.root / "style")}}
    (ghost / "config.json").write_text(json.dumps(config))
    status, imported = ui.call("POST", "/api/runs/import", {"folder": "runs/ghost"})
    assert status == 200, imported
    ui.wait_for(reply["id"], lambda run: run["status"] == "finished", timeout=300)
    return {"tiny": reply["id"], "ghost": imported["id"]}


def checkpoint(ui, step: int, exported: bool = True) -> Path:
    """A checkpoint's adapter as the run exported it, or its training state's adapter."""
    name = f"{RUN}-step-{step:06d}.safetensors" if exported else "adapter.safetensors"
    return ui.root / "runs" / RUN / "checkpoints" / f"step-{step:06d}" / name


def test_the_list_holds_the_adapters_there_are_each_with_its_model(ui, page, runs):
    page.goto(ui.url("/try"))
    page.wait_for_selector("#choice option:nth-child(2)", state="attached")
    labels = page.eval_on_selector_all("#choice option", "os => os.map(o => o.textContent)")
    assert labels[1:] == [f"{RUN} (final)", f"{RUN} step 10", f"{RUN} step 5"]
    offered = page.eval_on_selector_all("#adapters option", "os => os.map(o => o.value)")
    assert offered and all((ui.root / path).is_file() for path in offered), offered
    assert not any("ghost" in path for path in offered)
    page.select_option("#choice", label=f"{RUN} step 5")
    assert ui.root / page.input_value("#adapter") == checkpoint(ui, 5)
    assert page.input_value("#model") == "tiny:sd15"
    assert page.input_value("#width") == page.input_value("#height") == "64"
    assert page.errors == []


def test_a_checkpoint_from_its_run_page_renders_a_labelled_strength_sweep(ui, page, runs):
    page.goto(ui.url(f"/runs/{runs['tiny']}"))
    page.click("#checkpoints li[data-step='5'] a:has-text('try it')")
    page.wait_for_url(re.compile(rf"/try\?run={runs['tiny']}&step=5$"))
    page.wait_for_function("document.querySelector('#adapter').value")
    assert ui.root / page.input_value("#adapter") == checkpoint(ui, 5)
    assert page.input_value("#model") == "tiny:sd15" and page.input_value("#width") == "64"
    page.fill("#steps", "4")
    page.fill("#scales", "0, 0.5, 1")
    page.fill("#negative", "blurry")
    page.click("#render")
    page.wait_for_selector("body[data-render='done']", timeout=180_000)
    page.wait_for_function("document.querySelector('#result').naturalWidth > 0")
    assert page.eval_on_selector_all("#labels span", "s => s.map(x => x.textContent)") == [
        "strength 0", "strength 0.5", "strength 1"]  # fmt: skip
    src = page.get_attribute("#result", "src")
    image = np.asarray(Image.open(ui.data / "try" / Path(src).name).convert("RGB"), float)
    assert image.shape == (64, 192, 3)  # three images at the run's 64 px, side by side
    assert np.abs(image[:, :64] - image[:, 128:]).mean() > 0.01
    assert page.errors == []


def test_a_render_shows_its_progress_and_cancel_ends_its_processes(ui, page, runs):
    page.goto(ui.url(f"/try?run={runs['tiny']}"))
    page.wait_for_function("document.querySelector('#adapter').value")
    page.fill("#width", "256")
    page.fill("#height", "256")
    page.fill("#steps", "500")
    page.click("#render")
    page.wait_for_function(
        "/step \\d+\\/\\d+/.test(document.querySelector('#busy').textContent)", timeout=120_000
    )
    # a second render while one runs: refused in one line
    status, reply = ui.call("POST", "/api/try", {"adapter": f"runs/{RUN}/{RUN}.safetensors",
                                                 "model": "tiny:sd15", "prompt": "a"})  # fmt: skip
    assert status == 409 and reply["error"].startswith("one render at a time:"), reply
    name = Path(ui.call("GET", "/api/try/status")[1]["image"]).name
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#busy').textContent === 'cancelled'")
    assert page.is_enabled("#render") and page.is_hidden("#cancel")
    assert rendering(name) == [] and not (ui.data / "try" / name).exists()
    assert page.errors == []


def rendering(name: str) -> list[str]:
    """The pids of processes whose command line names `name`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if name.encode() in cmdline.read_bytes():
                found.append(cmdline.parent.name)
        except OSError:
            continue
    return found


def test_sample_renders_a_checkpoint_as_its_run_would_have_exported_it(ui, runs, tmp_path):
    """The checkpoint of the last step renders what the run's final adapter renders."""
    common = ["sample", "--model", "tiny:sd15", "--prompt", "a fish, zqxstyle", "--steps", "4"]
    final = ui.root / "runs" / RUN / f"{RUN}.safetensors"
    for adapter, out in (
        (checkpoint(ui, 10, exported=False), "checkpoint.png"),
        (final, "final.png"),
    ):
        assert main([*common, "--adapter", str(adapter), "--out", str(tmp_path / out)]) == 0
    images = [
        np.asarray(Image.open(tmp_path / name), float) for name in ("checkpoint.png", "final.png")
    ]
    assert np.abs(images[0] - images[1]).max() == 0


def test_sample_refuses_a_file_that_is_no_adapter_before_loading_the_model(tmp_path, capsys):
    weights = tmp_path / "weights.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(weights))
    started = time.time()
    code = main(["sample", "--model", str(tmp_path / "no-such-model"), "--adapter", str(weights),
                 "--prompt", "a", "--out", str(tmp_path / "x.png")])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1, error
    assert error.startswith(f"stylelora: error: {weights}: not an adapter"), error
    assert time.time() - started < 30
