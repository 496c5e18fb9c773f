"""What `stylelora train` would refuse before its first step is refused at Start, by key, in the
command line's words, and no run is queued: a run does not fail when its turn comes."""

from __future__ import annotations

import pytest
from ui_fixtures import run_settings

from stylelora.train.placement import has_accelerator


def start(server, settings: dict[str, str]) -> tuple[int, dict]:
    _, before = server.call("GET", "/api/runs")
    status, reply = server.call("POST", "/api/runs", {"settings": settings})
    if status != 200:
        _, after = server.call("GET", "/api/runs")
        assert len(after["runs"]) == len(before["runs"])  # nothing queued
    return status, reply


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ({"data.dir": "no-such-folder"}, "data.dir", "folder not found"),
        ({"data.dir": "empty"}, "data.dir", "no usable images"),
        ({"model": "demo:sd16"}, "model", "demo model 'sd16': choose one of sd15, "),
        ({"model": "models/missing.safetensors"}, "model", "not found"),
        ({"sample.prompts_file": "style"}, "sample.prompts_file", "is a folder"),
        ({"train.optimizer": "prodigy", "train.learning_rate": "1.0",
          "train.loraplus_lr_ratio": "16"}, "train.loraplus_lr_ratio", "prodigy"),
    ],
)  # fmt: skip
def test_what_train_would_refuse_is_named_at_start(server, extra, key, words):
    (server.root / "empty").mkdir(exist_ok=True)
    status, reply = start(server, run_settings("refused", 10, **extra))
    assert status == 400, reply
    assert words in reply["problems"][key], reply


@pytest.mark.skipif(has_accelerator(), reason="fp16 runs where there is a GPU")
def test_fp16_on_a_machine_without_a_gpu_is_named_at_start(server):
    status, reply = start(server, run_settings("fp16", 10, **{"train.mixed_precision": "fp16"}))
    assert status == 400 and "needs a GPU" in reply["problems"]["train.mixed_precision"]


def test_a_new_run_does_not_reuse_an_earlier_runs_folder(server):
    settings = run_settings("reused", 10, **{"data.dir": "no-images-here"})
    (server.root / "no-images-here").mkdir(exist_ok=True)
    status, reply = start(server, settings)  # refused: the folder is still free
    assert status == 400 and "output_dir" not in reply["problems"]
    status, reply = start(server, run_settings("reused", 300))
    assert status == 200, reply
    first = reply["id"]
    server.wait_for(first, lambda r: r["status"] == "running")
    assert server.call("POST", f"/api/runs/{first}/stop")[0] == 200
    server.wait_for(first, lambda r: r["status"] not in ("running", "stopping"))
    config = (server.root / "runs" / "reused" / "config.toml").read_text()
    status, reply = start(server, run_settings("again", 10, output_dir="runs/reused"))
    assert status == 400, reply
    assert f"run {first} (reused, stopped) used this folder" in reply["problems"]["output_dir"]
    assert (server.root / "runs" / "reused" / "config.toml").read_text() == config
