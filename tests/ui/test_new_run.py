"""The New run page as a first-time user meets it, in headless Chromium: the essentials first,
each with its help; a preset's values in its fields; only the fields the model's family takes;
a template loaded when chosen; a refused Start taken to its field; a run cloned, a failed one
fixed and finished; the page at 800 and 1600 px."""

from __future__ import annotations

import re
import shutil

import pytest
from ui_fixtures import ROOT, UIServer, run_settings

from stylelora.config import tomllib
from stylelora.ui import form


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A UI of its own over a root holding the demo's images and prompts."""
    root = tmp_path_factory.mktemp("new-run-root")
    shutil.copytree(ROOT / "datasets" / "demo-style", root / "style",
                    ignore=shutil.ignore_patterns(".*"))  # fmt: skip
    shutil.copy(ROOT / "samples" / "demo-prompts.txt", root / "prompts.txt")
    server = UIServer(root, root / ".ui", token="new-run-token").start()
    # A run that passes Start's checks and fails once its model is loaded: its timestep range
    # is beyond the schedule of the demo model, which has 1000 timesteps. It trains (and fails)
    # while the first tests run.
    settings = run_settings(
        "broken", 10, **{"train.max_timestep": "1200", "train.log_with": "none"}
    )
    status, reply = server.call("POST", "/api/runs", {"settings": settings})
    assert status == 200, reply
    server.broken = reply["id"]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def failed_run(ui) -> dict:
    return ui.wait_for(ui.broken, lambda r: r["status"] in ("failed", "finished"), timeout=120)


def field(key: str) -> str:
    return "#field-" + key.replace(".", "\\.")


def open_new(page, ui, path: str = "/new") -> None:
    page.goto(ui.url(path))
    page.wait_for_function("document.querySelector('#toml').value.includes('name')")


def set_field(page, key: str, value: str) -> None:
    """Open the sections the field is in, type or choose the value, leave the field."""
    tag = page.eval_on_selector(
        field(key),
        "i => { for (let d = i.closest('details'); d; d = d.parentElement.closest('details'))"
        " d.open = true; return i.tagName; }",
    )
    if tag == "SELECT":
        page.select_option(field(key), value)
    else:
        page.fill(field(key), value)
    page.dispatch_event(field(key), "change")


def visible(page, key: str) -> bool:
    return page.eval_on_selector(field(key), "input => !input.closest('.field').hidden")


def wait_shown(page, key: str, shown: bool) -> None:
    """Until the field's row is shown (or hidden)."""
    test = "!" if shown else ""
    page.wait_for_function(f"{test}document.getElementById('field-{key}').closest('.field').hidden")


def wait_value(page, key: str, value: str) -> None:
    page.wait_for_function(f"document.getElementById('field-{key}').value === '{value}'")


def test_the_essentials_come_first_each_named_in_words_with_its_help(ui, page):
    open_new(page, ui)
    essentials = page.eval_on_selector_all(
        "#essentials .field", "rows => rows.map(row => row.dataset.key)"
    )
    assert essentials == [
        "name", "model", "preset", "data.dir", "data.trigger_word", "data.resolution",
        "train.max_steps", "train.learning_rate", "adapter.rank", "sample.prompts_file",
        "output_dir",
    ]  # fmt: skip
    label = page.locator("#essentials label[for='field-train.max_steps']")
    assert label.inner_text().startswith("Steps")
    assert (
        page.locator("#essentials label[for='field-adapter.rank']").inner_text().startswith("Rank")
    )
    # every field says what it does, in the config model's words
    helps = page.eval_on_selector_all(
        ".field",
        "rows => rows.map(row => [row.dataset.key, row.querySelector('.help').textContent])",
    )
    assert len(helps) == len(form.FIELDS)
    assert [key for key, text in helps if not text.strip()] == []
    assert dict(helps)["train.max_steps"] == form.FIELDS["train.max_steps"].help
    # the rest waits, closed, under All settings; no key has two fields
    assert page.eval_on_selector("#all-settings", "d => !d.open")
    assert page.locator("#all-settings " + field("train.batch_size")).count() == 1
    for key in form.FIELDS:
        assert page.locator(f"[id='field-{key}']").count() == 1, key
    assert page.locator("#all-settings " + field("train.max_steps")).count() == 0
    assert page.is_visible(field("data.dir")) and not page.is_visible(field("train.batch_size"))
    assert page.errors == []


def test_a_presets_values_show_in_its_fields_and_follow_it(ui, page):
    open_new(page, ui)
    page.select_option("#template", "sd15-8gb")
    page.wait_for_function(
        "document.querySelector('#from-preset-train\\\\.batch_size').textContent"
        " === 'from preset sd15-8gb'"
    )
    assert page.input_value(field("preset")) == "sd15-8gb"
    assert page.get_attribute(field("train.batch_size"), "placeholder") == "2"
    assert page.get_attribute(field("train.lr_warmup_steps"), "placeholder") == "50"
    for key, value in (("train.lr_scheduler", "cosine"), ("train.optimizer", "adamw8bit"),
                       ("train.mixed_precision", "fp16")):  # fmt: skip
        first = page.eval_on_selector(field(key), "select => select.options[0].text")
        assert first == f"(preset: {value})", key
        assert page.text_content(f"[id='from-preset-{key}']") == "from preset sd15-8gb"
    assert page.get_attribute(field("adapter.rank"), "placeholder") == "16"
    # a value the user sets is theirs, not the preset's
    set_field(page, "train.batch_size", "3")
    page.wait_for_function(
        "!document.querySelector('#from-preset-train\\\\.batch_size').textContent"
    )
    # another preset: its values
    set_field(page, "preset", "sd15-4gb")
    page.wait_for_function(
        "document.querySelector('#from-preset-adapter\\\\.rank').textContent"
        " === 'from preset sd15-4gb'"
    )
    assert page.get_attribute(field("adapter.rank"), "placeholder") == "8"
    quantize = page.eval_on_selector(field("train.quantize_base"), "s => s.options[0].text")
    assert quantize == "(preset: nf4)"
    # no preset: the defaults, untagged
    set_field(page, "preset", "")
    page.wait_for_function("!document.querySelector('#from-preset-adapter\\\\.rank').textContent")
    assert page.get_attribute(field("adapter.rank"), "placeholder") == "16"
    assert page.eval_on_selector(field("train.optimizer"), "s => s.options[0].text") == (
        "(default: adamw)"
    )
    assert page.errors == []


def test_only_the_fields_the_models_family_takes_are_shown(ui, page):
    open_new(page, ui)  # the demo: an SD1.x UNet
    assert page.input_value(field("model")) == "demo:sd15"
    flow = ["train.timestep_sampling", "train.discrete_flow_shift", "train.flow_weighting"]
    for key in [*flow, "t5_max_length", "ae", "train.blocks_to_swap", "adapter.train_blocks"]:
        assert not visible(page, key), key
    for key in ["clip_skip", "train.min_snr_gamma", "train.down_lr_weight", "sample.scheduler"]:
        assert visible(page, key), key
    assert page.is_hidden("details[data-group='[train] flow matching']")
    # a flow-matching transformer: the other way round
    set_field(page, "model", "tiny:flux")
    wait_shown(page, "t5_max_length", True)
    for key in [*flow, "train.blocks_to_swap", "adapter.train_blocks"]:
        assert visible(page, key), key
    for key in ["clip_skip", "train.min_snr_gamma", "train.down_lr_weight", "sample.scheduler"]:
        assert not visible(page, key), key
    assert page.is_hidden("details[data-group='block-wise (UNets)']")
    # a family's key that is set stays, to be seen and removed
    set_field(page, "model", "demo:sd15")
    wait_shown(page, "t5_max_length", False)
    page.click("#tab-toml")
    toml = page.input_value("#toml").replace("[train]\n", '[train]\nflow_weighting = "cosmap"\n')
    page.fill("#toml", toml)
    page.click("#apply-toml")
    wait_shown(page, "train.flow_weighting", True)
    assert page.input_value(field("train.flow_weighting")) == "cosmap"
    # a model whose family cannot be told: every field
    set_field(page, "train.flow_weighting", "")
    set_field(page, "model", "someone/unknown-model")
    wait_shown(page, "t5_max_length", True)
    assert visible(page, "clip_skip") and visible(page, "train.timestep_sampling")
    assert page.errors == []


def test_choosing_a_template_loads_it_and_asks_before_discarding_edits(ui, page):
    open_new(page, ui)
    assert page.locator("#load-template").count() == 0
    set_field(page, "train.max_steps", "123")
    dialogs = []

    def dismiss(dialog):
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", dismiss)
    page.select_option("#template", "sd15-4gb")
    page.wait_for_function("document.querySelector('#template').value === 'demo'")
    assert dialogs == ["Discard your changes and start from sd15-4gb?"]
    assert page.input_value(field("train.max_steps")) == "123"
    page.once("dialog", lambda dialog: dialog.accept())
    page.select_option("#template", "sd15-4gb")
    wait_value(page, "preset", "sd15-4gb")
    assert page.input_value(field("train.max_steps")) == ""
    assert page.input_value(field("name")) == "sd15-4gb"
    assert page.input_value(field("output_dir")) == "runs/sd15-4gb"
    # unedited, another template loads without asking
    page.select_option("#template", "demo")
    wait_value(page, "name", "demo-style")
    assert page.errors == []
    # every template's paths resolve inside the root: only the images folder is left to choose
    _, reply = ui.call("GET", "/api/templates")
    for name, settings in reply["templates"].items():
        _, checked = ui.call("POST", "/api/config/check", {"settings": settings})
        assert set(checked["problems"]) <= {"data.dir"}, (name, checked["problems"])


def test_a_refused_start_takes_the_user_to_the_first_field_with_a_problem(ui, page):
    open_new(page, ui)
    set_field(page, "train.optimizer", "prodigy")
    set_field(page, "train.learning_rate", "1.0")
    # the demo's LoRA+ ratio stays: Prodigy takes one rate, which only Start's checks find
    page.evaluate(
        "for (const d of document.querySelectorAll('details')) d.open = false; scrollTo(0, 0)"
    )
    _, before = ui.call("GET", "/api/runs")
    page.click("#start")
    problem = page.locator("#problem-train\\.loraplus_lr_ratio")
    problem.filter(has_text="prodigy").wait_for()
    page.wait_for_function(
        "document.activeElement && document.activeElement.id === 'field-train.loraplus_lr_ratio'"
    )
    assert page.eval_on_selector("#all-settings", "d => d.open")
    box = page.eval_on_selector(
        field("train.loraplus_lr_ratio"),
        "input => { const r = input.getBoundingClientRect(); return [r.top, r.bottom]; }",
    )
    assert box[0] >= 0 and box[1] <= page.viewport_size["height"]
    assert page.is_visible(field("train.loraplus_lr_ratio"))
    _, after = ui.call("GET", "/api/runs")
    assert len(after["runs"]) == len(before["runs"])
    assert page.errors == []


def test_a_run_is_cloned_under_a_new_name_and_folder(ui, page, failed_run):
    open_new(page, ui, f"/new?clone={failed_run['id']}")
    wait_value(page, "name", "broken-2")
    assert page.input_value(field("output_dir")) == "runs/broken-2"
    assert page.input_value(field("data.dir")) == "style"
    assert page.input_value(field("train.max_steps")) == "10"
    assert page.input_value(field("train.max_timestep")) == "1200"
    assert "run " + str(failed_run["id"]) + " (broken, failed)" in page.inner_text("#template")
    assert "It failed:" in page.inner_text("#clone-note")
    status, reply = ui.call("GET", f"/api/runs/{failed_run['id']}/settings")
    assert status == 200 and reply["settings"]["name"] == "broken-2"
    assert ui.call("GET", "/api/runs/999999/settings")[0] == 404
    assert page.errors == []


def test_a_failed_run_is_cloned_from_its_page_fixed_and_finished(ui, page, failed_run):
    assert failed_run["status"] == "failed"
    assert "train.max_timestep 1200" in failed_run["message"]
    page.goto(ui.url(f"/runs/{failed_run['id']}"))
    page.wait_for_selector("body[data-status='failed']")
    if page.locator("#clone").count():
        page.click("#clone")
    else:  # the run page's Clone link opens this address
        page.goto(ui.url(f"/new?clone={failed_run['id']}"))
    # what it failed of, beside its field, in the command line's words, and the field in focus
    problem = page.locator("#problem-train\\.max_timestep")
    problem.filter(has_text="max_timestep can be at most 1000").wait_for()
    page.wait_for_function(
        "document.activeElement && document.activeElement.id === 'field-train.max_timestep'"
    )
    page.fill(field("train.max_timestep"), "700")
    page.dispatch_event(field("train.max_timestep"), "change")
    page.wait_for_function("!document.querySelector('#problem-train\\\\.max_timestep').textContent")
    page.wait_for_function("document.querySelector('#toml').value.includes('max_timestep = 700')")
    page.click("#start")
    page.wait_for_url(re.compile(r"/runs/\d+$"))
    run_id = int(page.url.rsplit("/", 1)[1])
    finished = ui.wait_for(run_id, lambda r: r["status"] in ("finished", "failed"), timeout=180)
    assert finished["status"] == "finished", finished
    written = tomllib.loads((ui.root / "runs" / "broken-2" / "config.toml").read_text())
    assert written["name"] == "broken-2" and written["train"]["max_timestep"] == 700
    assert (ui.root / "runs" / "broken-2" / "broken-2.safetensors").is_file()
    # a finished run clones too, under the next free name
    status, reply = ui.call("GET", f"/api/runs/{run_id}/settings")
    assert status == 200 and reply["settings"]["name"] == "broken-3", reply
    assert reply["settings"]["output_dir"] == "runs/broken-3" and reply["problems"] == {}
    assert page.errors == []


@pytest.mark.parametrize("width", [800, 1600])
def test_the_page_fits_its_width_with_labels_above_fields_when_narrow(ui, browser, width):
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    try:
        open_new(page, ui)
        page.evaluate("for (const d of document.querySelectorAll('details')) d.open = true")
        # problems beside their fields, one naming a long path
        set_field(page, "train.learning_rate", "-1")
        page.locator("#problem-train\\.learning_rate").filter(has_text="greater").wait_for()
        set_field(page, "output_dir", "/elsewhere/" + "x" * 100)
        page.locator("#problem-output_dir").filter(has_text="outside the folders").wait_for()
        fits = "document.documentElement.scrollWidth <= innerWidth"
        assert page.evaluate(fits), page.evaluate("document.documentElement.scrollWidth")
        label, input_ = (
            page.eval_on_selector(selector, "e => e.getBoundingClientRect().toJSON()")
            for selector in ("label[for='field-train.batch_size']", field("train.batch_size"))
        )
        if width == 800:
            assert label["bottom"] <= input_["top"]
        else:
            assert label["right"] <= input_["left"] and label["top"] < input_["bottom"]
        page.click("#tab-toml")
        assert page.evaluate(fits)
    finally:
        context.close()
