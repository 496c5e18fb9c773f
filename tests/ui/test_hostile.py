"""The UI against hostile and careless requests: every route the app defines gets null bytes,
`..`, absolute paths, `~`, links out, huge ids, wrong types and an oversized body, and answers
each with a 4xx and one line; nothing outside the roots is read into a reply or written; a run
is never started twice; a Stop at any moment of start-up is a clean stop."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from PIL import Image
from ui_fixtures import ROOT, UIServer, run_settings

from stylelora.ui.app import create_app
from stylelora.ui.dataset_edits import UPLOAD_LIMIT
from stylelora.ui.http import MAX_BODY

SECRET = "SECRET-OUTSIDE-THE-ROOT"
HUGE_ID = "9" * 23


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    """A root (a few demo images, prompts, a preset, run folders) and, beside it, a folder
    outside the root holding a secret, a model and a preset, with links into it."""
    base = tmp_path_factory.mktemp("hostile")
    root, outside = base / "root", base / "outside"
    style = root / "style"
    style.mkdir(parents=True)
    for image in sorted((ROOT / "datasets" / "demo-style").glob("*.png"))[:4]:
        shutil.copy(image, style)
        shutil.copy(image.with_suffix(".txt"), style)
    shutil.copy(ROOT / "samples" / "demo-prompts.txt", root / "prompts.txt")
    (outside / "home" / "x").mkdir(parents=True)
    (outside / "secret.txt").write_text(SECRET)
    (outside / "tinymodel").mkdir()
    (outside / "tinymodel" / "model_index.json").write_text("{}")
    (outside / "p.toml").write_text('[train]\nmax_steps = 5\n[data]\ncache_dir = "cache"\n')
    (root / "link-model").symlink_to(outside / "tinymodel")
    (root / "link-out").symlink_to(outside)
    linked = root / "linked"
    linked.mkdir()
    shutil.copy(next(style.glob("*.png")), linked / "a.png")
    (linked / "a.txt").symlink_to(outside / "secret.txt")
    (root / "inner.toml").write_text('[data]\ncache_dir = "../outside/cache"\n')
    Image.new("1", (20000, 20000)).save(root / "bomb.png")  # 400 M pixels in a small file
    return {"base": base, "root": root, "outside": outside, "home": outside / "home"}


@pytest.fixture(scope="module")
def ui(places):
    server = UIServer(places["root"], places["base"] / "ui-data", token="t0ken",
                      env={"HOME": str(places["home"])})  # fmt: skip
    server.start()
    yield server
    server.stop()


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` with what it holds (links as their target)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            found[str(path)] = f"-> {path.readlink()}"
        elif path.is_file():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[str(path)] = "folder"
    return found


HOSTILE = [
    "\x00", "a\x00b", "..", "../", "../outside/secret.txt", "../../..", "/etc/passwd",
    "SECRET_PATH", "~", "~/x", "~root", "link-out", "link-out/secret.txt", "link-model",
    "style/../../outside", HUGE_ID, "-1", "", " ", "[1]", "{}", "true", "1e309", "x" * 5000,
]  # fmt: skip
QUERY_NAMES = ("path", "resolution", "caption_extension", "download")
BODY_NAMES = (
    "folder", "path", "caption", "caption_extension", "adapter", "model", "prompt", "seed",
    "scale", "steps", "guidance", "toml",
)  # fmt: skip


def hostile_values(places) -> list[str]:
    return [
        value.replace("SECRET_PATH", str(places["outside"] / "secret.txt")) for value in HOSTILE
    ]


def defined_routes(tmp_path: Path) -> list[tuple[str, set[str]]]:
    """(path template, methods) of every route the app defines."""
    app = create_app([tmp_path], data=tmp_path / ".ui")
    return [(route.path, set(getattr(route, "methods", None) or {"GET"})) for route in app.routes]


def filled(template: str, value: str) -> str:
    """The route with each parameter set to `value` (an id: a huge one); under a mount (the
    static files), `value` as the file."""
    path = template.replace("{id:int}", HUGE_ID)
    for name in ("{path:path}", "{name}"):
        path = path.replace(name, quote(value, safe="") or "x")
    return f"{path}/{quote(value, safe='') or 'x'}" if template == "/static" else path


def hostile_settings(value: str) -> dict[str, str]:
    keys = ("model", "data.dir", "output_dir", "preset", "sample.prompts_file", "data.cache_dir",
            "data.dir.x", "model.x", "name")  # fmt: skip
    return {**{key: value for key in keys}, value: value}


def assert_refused_in_one_line(status: int, reply: dict, what: str) -> None:
    assert status < 500, (what, status, reply)
    if status >= 400:
        # the API's error, a form's problems by key, or a static file's plain "Not Found"
        errors = list(reply.get("problems", {}).values()) or [
            reply.get("error", reply.get("bytes", b"").decode(errors="replace"))
        ]
        for error in errors:
            assert isinstance(error, str) and error and "\n" not in error, (what, reply)
            assert "Traceback" not in error, (what, reply)
    assert SECRET not in json.dumps(reply, default=repr), (what, reply)


def test_every_route_answers_hostile_values_with_a_4xx_and_nothing_outside_is_touched(
    ui, places, tmp_path
):
    routes = defined_routes(tmp_path)
    assert len(routes) >= 20  # pages, static files and the API
    before = snapshot(places["outside"])
    values = hostile_values(places)
    asked = 0
    for template, methods in routes:
        for value in values:
            path = filled(template, value)
            if "GET" in methods:
                if template.endswith("/events") and value:
                    continue  # an event stream of run 0 (below) is a 404; a huge id also
                status, reply = ui.call("GET", path)
                assert_refused_in_one_line(status, reply, f"GET {path}")
                for name in QUERY_NAMES:
                    query = f"{path}?{name}={quote(value, safe='')}"
                    status, reply = ui.call("GET", query)
                    assert_refused_in_one_line(status, reply, f"GET {query}")
                asked += 1 + len(QUERY_NAMES)
            for method in methods & {"POST", "DELETE"}:
                body = {**{name: value for name in BODY_NAMES}, "settings": hostile_settings(value)}
                for sent in (body, {"settings": value, "caption": 5, "path": ["x"]}):
                    status, reply = ui.call(method, path, sent)
                    assert_refused_in_one_line(status, reply, f"{method} {path} {sent}")
                    asked += 1
        for method in methods & {"POST", "DELETE"}:
            path = filled(template, "x")
            for raw in (b"not json", b"[1]", b'"x"', b"", b"{" * 10000, b'{"a": "\\u0000"}'):
                status, reply = ui.call(method, path, raw)
                assert_refused_in_one_line(status, reply, f"{method} {path} {raw[:20]!r}")
                if template.startswith("/api/"):
                    assert 400 <= status < 500 or template == "/api/config/check", (path, raw)
            asked += 6
            if "{id" not in template:  # (a run's route answers 404 before reading the body)
                limit = UPLOAD_LIMIT if template == "/api/dataset/upload" else MAX_BODY
                big = json.dumps({"caption": "x" * (limit + 2**20), "path": "style"}).encode()
                status, reply = ui.call(method, path, big)
                assert status == 413, (path, status, reply)
                asked += 1
    assert asked > 2000
    assert snapshot(places["outside"]) == before
    assert not (places["base"] / "cache").exists() and not (places["outside"] / "cache").exists()
    assert "Traceback" not in ui.log.read_text()


def test_null_bytes_huge_ids_and_odd_values_are_4xx(ui, places):
    for path in ("/api/dataset?path=style%00", "/api/thumb?path=%00", "/api/folders?path=a%00"):
        status, reply = ui.call("GET", path)
        assert status == 400 and "null byte" in reply["error"], (path, reply)
    assert ui.call("GET", f"/api/runs/{HUGE_ID}") == (404, {"error": f"no run {HUGE_ID}"})
    status, reply = ui.call("GET", "/api/thumb?path=bomb.png")
    assert status == 400 and "bomb.png" in reply["error"], reply
    # a TOML datetime is a value like any other: it reaches the form as text
    status, reply = ui.call("POST", "/api/config/parse", {"toml": "seed = 1979-05-27T07:32:00Z"})
    assert status == 200 and reply["settings"] == {"seed": "1979-05-27T07:32:00+00:00"}
    settings = run_settings("odd", 10, **{"data.dir.x": "1"})
    status, reply = ui.call("POST", "/api/runs", {"settings": settings})
    assert status == 400 and "data.dir.x" in reply["problems"], reply
    status, reply = ui.call("POST", "/api/runs", {"settings": {**settings, "data.dir": "st\x00"}})
    assert status == 400 and "null byte" in reply["error"]


def test_a_preset_and_the_paths_in_it_stay_inside_the_roots(ui, places):
    outside = places["outside"]
    for preset in (str(outside / "p.toml"), "../outside/p.toml", "link-out/p.toml"):
        settings = run_settings("preset-out", 10, preset=preset)
        status, reply = ui.call("POST", "/api/runs", {"settings": settings})
        assert status == 400 and "outside the folders" in reply["problems"]["preset"], reply
    settings = run_settings("preset-in", 10, preset="inner.toml")
    status, reply = ui.call("POST", "/api/runs", {"settings": settings})
    assert status == 400, reply
    assert "from the preset" in reply["problems"]["data.cache_dir"]
    assert str(outside / "cache") in reply["problems"]["data.cache_dir"]
    # a preset by name is the package's own file, not a path
    settings = run_settings("preset-name", 10, preset="sd15-8gb")
    status, reply = ui.call("POST", "/api/config/check", {"settings": settings})
    assert status == 200 and "preset" not in reply["problems"], reply


@pytest.mark.parametrize("model", ["../outside/tinymodel", "~/x", "link-model", "style/../../x"])
def test_a_model_path_is_checked_where_it_is_loaded(ui, model):
    settings = run_settings("model-out", 10, model=model)
    status, reply = ui.call("POST", "/api/config/check", {"settings": settings})
    assert "outside the folders" in reply["problems"]["model"], reply
    status, reply = ui.call("POST", "/api/try", {"adapter": "style", "model": model, "prompt": "a"})
    assert status == 403 and "outside the folders" in reply["error"], reply


def test_a_model_inside_the_root_is_written_as_an_absolute_path(ui, places):
    (places["root"] / "models" / "mine").mkdir(parents=True)
    (places["root"] / "models" / "mine" / "model_index.json").write_text("{}")
    for model, expected in (("models/mine", str(places["root"] / "models" / "mine")),
                            ("demo:sd15", "demo:sd15"), ("org/name", "org/name")):  # fmt: skip
        settings = run_settings("model-in", 10, model=model)
        status, reply = ui.call("POST", "/api/config/check", {"settings": settings})
        assert status == 200 and "model" not in reply["problems"], reply
        assert f'model = "{expected}"' in reply["toml"]
    settings = run_settings("bad", 10, model="not a model!")
    status, reply = ui.call("POST", "/api/config/check", {"settings": settings})
    assert "not a hub id" in reply["problems"]["model"]


def test_an_imported_folder_or_an_edited_config_cannot_point_outside(ui, places):
    root, outside = places["root"], places["outside"]
    pointing_out = {
        "imp-out": {"data": {"dir": str(outside)}},
        "imp-model": {"model": "../../../outside/tinymodel"},
        "imp-cache": {"data": {"dir": "../style", "cache_dir": str(outside)}},
    }
    for name, config in pointing_out.items():
        folder = root / "runs" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"name": name, **config}))
        status, reply = ui.call("POST", "/api/runs/import", {"folder": f"runs/{name}"})
        assert status == 403 and "outside the folders" in reply["error"], reply
        assert not (folder / "config.toml").exists()
    folder = root / "runs" / "imp-list"
    folder.mkdir()
    (folder / "config.json").write_text("[1, 2]")
    status, reply = ui.call("POST", "/api/runs/import", {"folder": "runs/imp-list"})
    assert status == 400 and "not a config" in reply["error"], reply
    # a sound import, then its config.toml edited to point out: Resume refuses
    folder = root / "runs" / "imp-ok"
    folder.mkdir()
    config = {"name": "imp-ok", "model": "demo:sd15", "data": {"dir": str(root / "style")}}
    (folder / "config.json").write_text(json.dumps(config))
    status, reply = ui.call("POST", "/api/runs/import", {"folder": "runs/imp-ok"})
    assert status == 200, reply
    text = (folder / "config.toml").read_text()
    assert str(root / "style") in text
    (folder / "config.toml").write_text(text.replace(str(root / "style"), str(outside)))
    status, reply = ui.call("POST", f"/api/runs/{reply['id']}/resume")
    assert status == 403 and "data.dir" in reply["error"], reply


def test_the_dataset_listing_does_not_follow_a_caption_out_of_the_root(ui):
    status, reply = ui.call("GET", "/api/dataset?path=linked")
    assert status == 200
    assert reply["items"] == []
    assert [p["path"] for p in reply["problems"]] == ["linked/a.txt"]
    assert "link out of the folders" in reply["problems"][0]["problem"]
    assert SECRET not in json.dumps(reply)


@pytest.mark.parametrize("extension", [".png", ".sh", ".json", ".", ".a/../../x", "/../../x"])
def test_a_caption_write_never_touches_an_image_or_another_kind_of_file(ui, places, extension):
    style = places["root"] / "style"
    image = sorted(style.glob("*.png"))[0]
    before = snapshot(style)
    body = {"path": f"style/{image.name}", "caption": "#!/bin/sh", "caption_extension": extension}
    status, reply = ui.call("POST", "/api/caption", body)
    assert 400 <= status < 500 and "\n" not in reply["error"], reply
    assert snapshot(style) == before


def test_a_caption_over_the_body_limit_is_refused_and_the_caption_kept(ui, places):
    style = places["root"] / "style"
    image = sorted(style.glob("*.png"))[0]
    before = image.with_suffix(".txt").read_text()
    body = {"path": f"style/{image.name}", "caption": "x" * (100 * 2**20)}
    status, reply = ui.call("POST", "/api/caption", body)
    assert status == 413 and "MiB" in reply["error"]
    assert image.with_suffix(".txt").read_text() == before
    status, reply = ui.call("POST", "/api/caption", {**body, "caption": "a star, zqxstyle"})
    assert status == 200 and image.with_suffix(".txt").read_text() == "a star, zqxstyle\n"


def test_a_host_header_with_a_local_name_and_more_is_refused(ui):
    for host in ("[::1]evil.example", "127.0.0.1.evil.example", "localhost:80x", "[::1]:1:2"):
        status, _ = ui.call("GET", "/api/runs", headers={"Host": host})
        assert status == 403, host
    assert ui.call("GET", "/api/runs", headers={"Host": "[::1]:7870"})[0] == 200


def trainers(config: str) -> int:
    """How many `stylelora train` processes read `config` now."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in args and config.encode() in args:
            count += 1
    return count


def most_trainers(config: str, seconds: float) -> int:
    most, deadline = 0, time.time() + seconds
    while time.time() < deadline:
        most = max(most, trainers(config))
        time.sleep(0.05)
    return most


def at_once(calls) -> list[tuple[int, dict]]:
    """The calls made together, each on a thread of its own released at the same moment."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def make(index, call):
        barrier.wait()
        results[index] = call()

    threads = [threading.Thread(target=make, args=item) for item in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_a_run_is_never_started_twice_by_concurrent_starts_and_resumes(ui, places):
    settings = run_settings("twice", 400, **{"train.checkpoint_every_n_steps": "2"})
    status, reply = ui.call("POST", "/api/runs", {"settings": settings})
    assert status == 200, reply
    run_id = reply["id"]
    config = str(places["root"] / "runs" / "twice" / "config.toml")
    ui.wait_for(run_id, lambda r: r["step"] >= 3)
    assert ui.call("POST", f"/api/runs/{run_id}/stop")[0] == 200
    ui.wait_for(run_id, lambda r: r["status"] == "stopped")
    replies = at_once([lambda: ui.call("POST", f"/api/runs/{run_id}/resume")] * 8)
    assert sorted(status for status, _ in replies) == [200] + [400] * 7, replies
    assert most_trainers(config, 3.0) == 1
    ui.wait_for(run_id, lambda r: r["step"] > 0 and r["status"] == "running")
    assert ui.call("POST", f"/api/runs/{run_id}/stop")[0] == 200
    ui.wait_for(run_id, lambda r: r["status"] == "stopped", timeout=120)
    assert trainers(config) == 0
    headers = [line for line in (Path(config).parent / "train.log").read_text().splitlines()
               if line.startswith("$ ")]  # fmt: skip
    assert len(headers) == 2  # the start and the resume, once


@pytest.mark.parametrize("delay", [0.0, 1.4])
def test_a_stop_during_start_up_is_a_clean_stop(ui, places, delay):
    """A Stop while the run's Python loads its libraries (at 1.4 s a KeyboardInterrupt once
    went through pybind11 and aborted the process) waits for the loop: one step, a checkpoint,
    stopped."""
    name = f"early-{delay:g}"
    status, reply = ui.call("POST", "/api/runs", {"settings": run_settings(name, 400)})
    assert status == 200, reply
    time.sleep(delay)
    status, stopped = ui.call("POST", f"/api/runs/{reply['id']}/stop")
    assert status == 200, stopped
    run = ui.wait_for(reply["id"], lambda r: r["status"] not in ("running", "stopping"))
    assert run["status"] == "stopped", run
    log = (places["root"] / "runs" / name / "train.log").read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
