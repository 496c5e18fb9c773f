"""What the UI refuses: requests without the token off 127.0.0.1, paths outside its roots,
changes from other sites; and a run that crashes leaves the UI answering."""

from __future__ import annotations

import os
import signal
import urllib.request

import pytest
from ui_fixtures import UIServer, run_settings


@pytest.fixture(scope="module")
def exposed(workspace):
    """The UI on every address, where every request needs the token."""
    ui = UIServer(workspace, workspace / ".ui-exposed", host="0.0.0.0", token="s3cret-token")
    ui.start()
    yield ui
    ui.stop()


def test_off_localhost_a_request_without_the_token_gets_401(exposed):
    status, reply = exposed.call("GET", "/api/runs", headers={"X-Stylelora-Token": ""})
    assert status == 401 and "token" in reply["error"]
    assert exposed.call("GET", "/api/runs", headers={"X-Stylelora-Token": "wrong"})[0] == 401
    assert exposed.call("GET", "/api/runs")[0] == 200
    # the printed address carries it: the page then keeps it in a same-site cookie
    with urllib.request.urlopen(exposed.url("/?token=s3cret-token")) as response:
        cookie = response.headers["set-cookie"]
    assert "stylelora_token=s3cret-token" in cookie and "SameSite=Strict" in cookie
    assert "open http://0.0.0.0:" in exposed.log.read_text()


def test_paths_outside_the_roots_are_refused_with_the_path_named(server, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (server.root / "link-out").symlink_to(outside)
    for path in ("../", str(outside), "link-out", "style/../../"):
        status, reply = server.call("GET", f"/api/dataset?path={path}")
        assert status == 403, (path, reply)
        assert path in reply["error"] and "outside the folders" in reply["error"]
    status, reply = server.call("GET", "/api/thumb?path=/etc/passwd")
    assert status == 403 and "/etc/passwd" in reply["error"]
    settings = run_settings("out", 10, **{"data.dir": str(outside)})
    status, reply = server.call("POST", "/api/runs", {"settings": settings})
    assert status == 400 and str(outside) in reply["problems"]["data.dir"]
    status, reply = server.call("POST", "/api/caption", {"path": "../x.png", "caption": "x"})
    assert status == 403


def test_a_cross_origin_post_is_refused(server):
    foreign = {"X-Stylelora-Token": "", "Origin": "http://evil.example"}
    settings = run_settings("cross", 10)
    status, reply = server.call("POST", "/api/runs", {"settings": settings}, headers=foreign)
    assert status == 403 and "cross-origin" in reply["error"]
    _, runs = server.call("GET", "/api/runs")
    assert all(run["name"] != "cross" for run in runs["runs"])
    # another name pointed at 127.0.0.1 (DNS rebinding) gets nothing, not even a read
    status, _ = server.call("GET", "/api/runs", headers={"Host": "evil.example"})
    assert status == 403
    # the UI's own pages pass the same-origin check
    same = {"X-Stylelora-Token": "", "Origin": server.url("").rstrip("/")}
    status, _ = server.call("POST", "/api/config/check", {"settings": {}}, headers=same)
    assert status == 200


def test_a_run_that_crashes_leaves_the_ui_answering(server):
    # (what can be checked before a run starts is refused at Start: tests/ui/test_checks.py)
    settings = run_settings("crash", 10, **{"train.max_timestep": "1500"})
    status, reply = server.call("POST", "/api/runs", {"settings": settings})
    assert status == 200, reply
    run = server.wait_for(reply["id"], lambda r: r["status"] not in ("queued", "running"))
    assert run["status"] == "failed"
    assert "train.max_timestep 1500: the model is trained on 1000" in run["message"]
    assert server.call("GET", "/api/runs")[0] == 200


def test_a_run_that_dies_shows_as_interrupted_with_a_resume(server):
    settings = run_settings("killed", 300, **{"train.checkpoint_every_n_steps": "5"})
    status, reply = server.call("POST", "/api/runs", {"settings": settings})
    assert status == 200, reply
    running = server.wait_for(reply["id"], lambda r: r["step"] >= 7)
    os.kill(running["pid"], signal.SIGKILL)
    run = server.wait_for(reply["id"], lambda r: r["status"] != "running")
    assert run["status"] == "interrupted" and "exit status -9" in run["message"]
    assert run["can_resume"]
