"""No run lost to a side task: a failing preview, report or log costs one line, a signal during
the export lets it finish, an earlier run's adapter is not replaced unasked, and the leftovers
of a killed write are cleaned up by the next run."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_CONFIG, TEST_RUN, training_config
from PIL import Image
from safetensors.torch import load_file

from stylelora.cli import main
from stylelora.errors import UserError
from stylelora.train.run import fitted_prompts, read_sample_prompts
from stylelora.train.trainer import train

QUICK = [
    "train.max_steps=2",
    "train.batch_size=2",
    "train.lr_warmup_steps=0",
    "train.log_with='none'",
    "train.checkpoint_every_n_steps=0",
    "sample.num_inference_steps=2",
]


def cli_items(model: Path, data: Path, *more: str) -> list[str]:
    return [f"model={str(model)!r}", f"data.dir={str(data)!r}", *QUICK, *more]


def run_cli(items: list[str], output: Path, env: dict | None = None, **kwargs):
    command = [sys.executable, "-m", "stylelora", "train", str(DEMO_CONFIG)]
    command += ["--output-dir", str(output)]
    for item in (*TEST_RUN, *items):  # as `training_config` does
        command += ["--set", item]
    return subprocess.run(
        command,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def test_preview_sides_off_the_grid_are_rounded_down_as_kohya_does(
    tiny_sd15_dir, demo_subset, tmp_path
):
    cfg = training_config(tmp_path, tiny_sd15_dir, demo_subset(4), *QUICK, "sample.width=100")
    cfg.sample.prompts = ["zqxstyle, a red fish"]
    cfg.sample.height = 70
    result = train(cfg)
    sheet = Image.open(result.previews[-1])
    assert sheet.size == (2 * 96, 64)  # base and adapted side by side
    assert result.adapter_path.is_file()

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a house --w 500 --h 513\na tree --w 512 --h 512\n")
    cfg.sample.prompts, cfg.sample.prompts_file = [], prompts_file
    prompts, notes = fitted_prompts(read_sample_prompts(cfg), 8)
    assert [(p.width, p.height) for p in prompts] == [(496, 512), (512, 512)]
    assert notes == [
        "sample size 500x513 rounded to 496x512 (sides are multiples of 8, at least 64) "
        "for 'a house'"
    ]


def limit_file_size() -> None:
    """In the child: no file may grow past 200 kB (a 384 px preview of the random model's noise
    is more, the adapter far less); a write past that fails with EFBIG, as on a full disk."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_a_preview_that_cannot_be_written_costs_one_line_not_the_adapter(
    tiny_sd15_dir, demo_subset, tmp_path
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zqxstyle, a red fish --w 384 --h 384\n")
    items = cli_items(
        tiny_sd15_dir, demo_subset(4), f"sample.prompts_file={str(prompts)!r}"
    )  # one preview, at the end
    done = run_cli(items, tmp_path / "run", preexec_fn=limit_file_size)
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in done.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, done.stdout
    assert warnings[0].startswith("warning: the preview at step 2 failed, training goes on:")
    assert "File too large" in warnings[0]
    adapter = tmp_path / "run" / "demo-style.safetensors"
    assert len(load_file(adapter)) > 0
    assert not list((tmp_path / "run").glob("samples/*.png"))
    assert "no previews yet" in (tmp_path / "run" / "report.html").read_text()


def test_sigterm_during_the_export_finishes_it_and_exits_130(tiny_sd15_dir, demo_subset, tmp_path):
    data = demo_subset(4)
    reference = train(training_config(tmp_path / "reference", tiny_sd15_dir, data, *QUICK))

    items = cli_items(tiny_sd15_dir, data)
    done = run_cli(items, tmp_path / "run", env={"STYLELORA_FAULT": "term-in-export:2"})
    assert done.returncode == 130, done.stderr[-2000:]
    assert "SIGTERM: stopping once the adapter is written" in done.stderr
    adapter = tmp_path / "run" / "demo-style.safetensors"
    assert done.stderr.strip().splitlines()[-1] == f"stylelora: stopped after writing {adapter}"
    ours, theirs = load_file(adapter), load_file(reference.adapter_path)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_new_run_keeps_an_earlier_runs_adapter_unless_told_to_overwrite(
    tiny_sd15_dir, demo_subset, tmp_path, capsys
):
    cfg = training_config(tmp_path, tiny_sd15_dir, demo_subset(4), *QUICK)
    cfg.output_dir.mkdir(parents=True)
    earlier = cfg.output_dir / "demo-style.safetensors"
    earlier.write_bytes(b"an earlier run's adapter")
    with pytest.raises(UserError, match="an earlier run's adapter is there; add --overwrite"):
        train(cfg)
    assert earlier.read_bytes() == b"an earlier run's adapter"

    items = cli_items(tiny_sd15_dir, demo_subset(4, start=4))
    argv = ["train", str(DEMO_CONFIG), "--output-dir", str(cfg.output_dir)]
    argv += [arg for item in items for arg in ("--set", item)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"stylelora: error: {earlier}: an earlier run's adapter is there; add --overwrite to "
        "replace it, or choose another output_dir (--output-dir)"
    )
    assert main([*argv, "--overwrite"]) == 0
    assert len(load_file(earlier)) > 0


def test_the_next_run_removes_what_a_killed_write_left(tiny_sd15_dir, demo_subset, tmp_path):
    cfg = training_config(tmp_path, tiny_sd15_dir, demo_subset(4), *QUICK)
    out = cfg.output_dir
    (out / "samples").mkdir(parents=True)
    stale = [
        out / ".demo-style.safetensors.k3j_9x2a.tmp",
        out / "samples" / ".demo-style_000040.png.ab12cd34.tmp",
        out / ".report.abcdefgh.tmp",  # atomic_dir's folder
        out / ".report.old-.report.qwertyui.tmp",
    ]
    kept = [out / "notes.tmp", out / ".hidden", out / "samples" / "mine.png.tmp"]
    for path in stale[:2] + kept:
        path.write_bytes(b"x")
    for path in stale[2:]:
        (path / "curves").mkdir(parents=True)
    train(cfg)
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)


def test_a_full_disk_while_caching_latents_is_one_line(tiny_sd15_dir, demo_subset, tmp_path):
    """At 256 px an entry is about 64 kB; files may not grow past 16 kB here."""

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    cache = tmp_path / "cache"
    items = cli_items(
        tiny_sd15_dir,
        demo_subset(4),
        "data.resolution=256",
        "data.cache_latents=true",
        f"data.cache_dir={str(cache)!r}",
    )
    done = run_cli(items, tmp_path / "run", preexec_fn=small_files)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    assert last.startswith(f"stylelora: error: {cache}/"), last
    assert "File too large" in last and "data.cache_dir" in last, last
    assert not list(cache.glob("*.safetensors"))
