"""Checkpoint folders: only complete ones count; a full or unwritable disk is a clear error;
signals ask for a stop instead of killing the run."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import pytest
from conftest import DEMO_CONFIG, demo_config

from stylelora.config import load_config
from stylelora.errors import UserError
from stylelora.train.checkpoint import (
    MANIFEST,
    check_free_space,
    check_fresh_start,
    complete_checkpoints,
    config_changes,
    find_checkpoint,
    is_complete,
)
from stylelora.train.guard import StopRequest
from stylelora.train.trainer import train


def fake_checkpoint(root, step: int, files: dict[str, bytes], manifest: dict | None = None):
    folder = root / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if manifest is not None:
        (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_latest_is_the_newest_checkpoint_whose_manifest_matches_its_files(tmp_path):
    good = fake_checkpoint(tmp_path, 2, {"a": b"12"}, {"files": {"a": 2}})
    fake_checkpoint(tmp_path, 4, {"a": b"12"})  # no manifest: died before sealing
    fake_checkpoint(tmp_path, 6, {"a": b"1"}, {"files": {"a": 2}})  # truncated file
    fake_checkpoint(tmp_path, 8, {}, {"files": {"a": 2}})  # file missing
    (tmp_path / "checkpoints" / ".tmp-step-000010").mkdir()
    assert complete_checkpoints(tmp_path) == [good]
    assert find_checkpoint(tmp_path, "latest") == good
    assert not is_complete(tmp_path / "checkpoints" / "step-000004")
    with pytest.raises(UserError, match="not a complete checkpoint folder"):
        find_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step-000006"))
    with pytest.raises(UserError, match="no complete checkpoint in"):
        find_checkpoint(tmp_path / "elsewhere", "latest")


def test_a_new_run_refuses_to_mix_with_an_earlier_runs_checkpoints(tmp_path):
    check_fresh_start(tmp_path, [], overwrite=False)
    fake_checkpoint(tmp_path, 2, {"a": b"12"}, {"files": {"a": 2}})
    with pytest.raises(UserError, match="continue it with --resume latest"):
        check_fresh_start(tmp_path, [], overwrite=True)


def test_not_enough_free_space_is_refused_at_the_start(tmp_path):
    check_free_space(tmp_path / "not" / "yet", 1)
    with pytest.raises(
        UserError, match=r"MiB free, but the checkpoints and measured adapters need about .* MiB"
    ):
        check_free_space(tmp_path / "not" / "yet", 2**62)


def test_an_unwritable_output_folder_stops_before_any_model_is_loaded(demo_subset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = demo_config(tmp_path, f"data.dir={str(demo_subset(2))!r}", "model='no/such-model'")
    cfg.output_dir = blocker / "run"
    with pytest.raises(UserError, match=r"a-file/run: cannot write here"):
        train(cfg)


def test_sigterm_asks_for_a_stop_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) in (before, signal.SIG_DFL)
    assert signal.getsignal(signal.SIGTERM) == before


def limit_file_size() -> None:
    """In the child: files may not grow past 80 kB (the optimizer state is about 100 kB), and a
    write past that fails with EFBIG instead of killing the process."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (80_000, 80_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_a_failing_checkpoint_write_is_one_line_and_keeps_the_previous_one(
    tiny_sd15_dir, demo_subset, tmp_path
):
    items = [
        f"model={str(tiny_sd15_dir)!r}",
        f"data.dir={str(demo_subset(4))!r}",
        "sample.every_n_steps=0",
        "train.checkpoint_every_n_steps=2",
        "train.log_with='none'",
    ]
    cfg = load_config(DEMO_CONFIG, [*items, "train.max_steps=2"])
    cfg.sample.prompts_file = None
    cfg.output_dir = tmp_path / "run"
    train(cfg)
    good = complete_checkpoints(cfg.output_dir)
    assert [p.name for p in good] == ["step-000002"]
    before = {p.name: p.read_bytes() for p in good[0].iterdir()}

    command = [sys.executable, "-m", "stylelora", "train", str(DEMO_CONFIG)]
    command += ["--output-dir", str(cfg.output_dir), "--resume", "latest"]
    for item in [*items, "train.max_steps=6"]:
        command += ["--set", item]
    failed = subprocess.run(
        command, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size
    )
    assert failed.returncode == 2, failed.stderr[-2000:]
    print(failed.stderr.strip().splitlines()[-1])
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("stylelora: error: could not write the checkpoint of step 4"), last
    assert last.endswith("step-000002 is kept"), last
    assert complete_checkpoints(cfg.output_dir) == good
    assert {p.name: p.read_bytes() for p in good[0].iterdir()} == before
    assert not list((cfg.output_dir / "checkpoints").glob(".tmp-*"))


def test_a_resume_names_the_settings_changed_since_the_checkpoint():
    cfg = load_config(DEMO_CONFIG)
    saved = cfg.model_dump(mode="json")
    assert config_changes(saved, cfg) == []
    changed = load_config(DEMO_CONFIG, ["train.learning_rate=5e-4", "data.flip=true"])
    changed.output_dir = cfg.output_dir / "elsewhere"  # where it writes is no change
    assert config_changes(saved, changed) == ["data.flip", "train.learning_rate"]
