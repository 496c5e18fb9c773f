"""Exact resume: a run stopped by a signal or killed mid-checkpoint, then resumed, ends with
bit-for-bit the adapter of a run that was never stopped."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_CONFIG
from safetensors.torch import load_file

from stylelora.config import load_config
from stylelora.train.checkpoint import MANIFEST, complete_checkpoints
from stylelora.train.trainer import train

PROMPTS = "zqxstyle, a fish --d 1 --s 1 --l 1\n"


def overrides(model: Path, data: Path, prompts: Path) -> list[str]:
    """Every piece of state a resume must restore is in play: EMA, dropout (global RNG), random
    crops and flips, gradient accumulation across an epoch end, noise options, LoRA+,
    text-encoder adapters, previews and validation between the steps."""
    return [
        f"model={str(model)!r}",
        f"data.dir={str(data)!r}",
        f"sample.prompts_file={str(prompts)!r}",
        "sample.every_n_steps=3",
        "train.max_steps=7",
        "train.batch_size=2",
        "train.gradient_accumulation_steps=2",
        "train.lr_warmup_steps=2",
        "train.checkpoint_every_n_steps=2",
        "train.checkpoints_keep=3",
        "train.ema_decay=0.9",
        "train.noise_offset=0.05",
        "train.multires_noise_iterations=2",
        "train.min_snr_gamma=5.0",
        "train.loraplus_lr_ratio=4.0",
        "train.log_with='none'",
        "adapter.text_encoder=true",
        "adapter.dropout=0.1",
        "data.flip=true",
        "data.center_crop=false",
        "validation.split=0.25",
        "validation.every_n_steps=2",
        "validation.timesteps=[200, 700]",
        "validation.measure_prompts=1",  # measured at each checkpoint, and resumed with them
        "validation.measure_steps=2",
    ]


@pytest.fixture(scope="module")
def setup(tiny_sd15_dir, tmp_path_factory):
    """The overrides, and the adapter files of the same run never interrupted."""
    root = tmp_path_factory.mktemp("resume")
    data = root / "data"
    data.mkdir()
    for image in sorted((DEMO_CONFIG.parent.parent / "datasets" / "demo-style").glob("*.png"))[:8]:
        (data / image.name).write_bytes(image.read_bytes())
        (data / image.with_suffix(".txt").name).write_bytes(image.with_suffix(".txt").read_bytes())
    prompts = root / "prompts.txt"
    prompts.write_text(PROMPTS)
    items = overrides(tiny_sd15_dir, data, prompts)
    cfg = load_config(DEMO_CONFIG, items)
    cfg.output_dir = root / "reference"
    result = train(cfg)
    assert result.steps == 7 and result.ema_path is not None
    return items, root, result


def run_cli(items: list[str], output: Path, fault: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "stylelora", "train", str(DEMO_CONFIG)]
    command += ["--output-dir", str(output)]
    for item in items:
        command += ["--set", item]
    env = {**os.environ, "STYLELORA_FAULT": fault}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def resume_in_process(items: list[str], output: Path):
    cfg = load_config(DEMO_CONFIG, items)
    cfg.output_dir = output
    return train(cfg, resume="latest")


def assert_same_files(reference, resumed) -> float:
    worst = 0.0
    for ours, theirs in (
        (reference.adapter_path, resumed.adapter_path),
        (reference.ema_path, resumed.ema_path),
    ):
        a, b = load_file(ours), load_file(theirs)
        assert a.keys() == b.keys()
        worst = max(worst, max((a[k] - b[k]).abs().max().item() for k in a))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{theirs} differs from {ours}"
    return worst


def test_sigint_saves_a_checkpoint_and_the_resumed_run_is_bitwise_identical(setup):
    items, root, reference = setup
    output = root / "interrupted"
    stopped = run_cli(items, output, "interrupt:5")
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "SIGINT: stopping after this step" in stopped.stderr
    hint = stopped.stderr.split("resume with: ", 1)[1].strip()
    expected = ["stylelora", "train", str(DEMO_CONFIG)]
    expected += [arg for item in items for arg in ("--set", item)]
    assert shlex.split(hint) == [*expected, "--output-dir", str(output), "--resume", "latest"]
    assert [p.name for p in complete_checkpoints(output)] == [
        "step-000002",
        "step-000004",
        "step-000005",
    ]
    assert not (output / "demo-style.safetensors").exists()

    resumed = resume_in_process(items, output)
    worst = assert_same_files(reference, resumed)
    print(f"max abs difference after SIGINT + resume: {worst}")
    assert resumed.losses == reference.losses
    assert resumed.validation == reference.validation


def test_kill_during_checkpoint_write_resumes_from_the_previous_good_one(setup):
    items, root, reference = setup
    output = root / "killed"
    killed = run_cli(items, output, "kill-in-checkpoint:4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial = output / "checkpoints" / ".tmp-step-000004"
    assert (partial / "adapter.safetensors").is_file()  # it died mid-write ...
    assert not (partial / MANIFEST).exists()  # ... before the manifest
    assert [p.name for p in complete_checkpoints(output)] == ["step-000002"]
    assert not (output / "demo-style.safetensors").exists()

    resumed = resume_in_process(items, output)
    assert not partial.exists()  # the dead run's temporary folder is cleared, never read
    worst = assert_same_files(reference, resumed)
    print(f"max abs difference after SIGKILL + resume from step 2: {worst}")
    assert resumed.losses == reference.losses
