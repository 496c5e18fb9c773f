"""The `stylelora` command as a user runs it: a real subprocess, exit codes, one-line errors.
The errors that come before any work are checked through the same `main` in this process: a
fresh interpreter would only add the libraries' import time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_CONFIG, ROOT, run_main
from PIL import Image
from safetensors import safe_open

STYLELORA = [sys.executable, "-m", "stylelora"]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*STYLELORA, *args], cwd=cwd, capture_output=True, text=True, env=os.environ, timeout=300
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The demo config, shortened, run once through the CLI into a temporary folder."""
    out = tmp_path_factory.mktemp("demo") / "run"
    result = run(
        "train", str(DEMO_CONFIG), "--output-dir", str(out),
        "--set", "train.max_steps=6", "--set", "sample.every_n_steps=3",
        "--set", "sample.num_inference_steps=2", "--set", "validation.measure=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def test_train_writes_adapter_with_metadata(demo_run):
    adapter = demo_run / "demo-style.safetensors"
    with safe_open(str(adapter), "pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
    assert all(k.startswith("lora_unet_") for k in keys)
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "8"
    assert metadata["ss_network_alpha"] == "8"  # configs/demo.toml
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_output_name"] == "demo-style"
    assert metadata["ss_steps"] == "6"
    assert float(metadata["ss_learning_rate"]) == 1e-3
    assert float(metadata["ss_training_finished_at"]) >= float(metadata["ss_training_started_at"])
    assert json.loads(metadata["ss_tag_frequency"])["1_demo-style"]["zqxstyle"] == 24
    assert len(metadata["sshs_model_hash"]) == 64
    assert not list(demo_run.glob(".*.tmp")), "temporary files left behind"


def test_train_writes_a_preview_grid_per_preview_step(demo_run):
    grids = sorted(p.name for p in (demo_run / "samples").glob("*.png"))
    assert grids == ["demo-style_000003.png", "demo-style_000006.png"]
    prompts = [
        line for line in (ROOT / "samples" / "demo-prompts.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    with Image.open(demo_run / "samples" / grids[-1]) as sheet:  # per prompt: base | tuned
        assert sheet.size == (64 * 2, 64 * len(prompts))


def test_sample_compare_puts_base_and_adapted_side_by_side(demo_run, tmp_path):
    out = tmp_path / "cmp.png"
    result = run(
        "sample", "--model", "demo:sd15", "--adapter", str(demo_run / "demo-style.safetensors"),
        "--prompt", "zqxstyle, a fish", "--scale", "3", "--seed", "1", "--steps", "3",
        "--out", str(out), "--compare",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    pixels = np.asarray(Image.open(out), dtype=np.int16)
    assert pixels.shape == (64, 128, 3)
    assert np.abs(pixels[:, :64] - pixels[:, 64:]).max() > 0


@pytest.mark.parametrize(
    ("family", "pipeline"),
    [
        ("sd15", "StableDiffusionPipeline"),  # sd2's tiny model: tests/families (tiny:sd2)
        ("sdxl", "StableDiffusionXLPipeline"),
    ],
)
def test_make_tiny_model_writes_a_loadable_diffusers_folder(tmp_path, family, pipeline):
    folder = tmp_path / "tiny"
    result = run("make-tiny-model", "--family", family, str(folder))
    assert result.returncode == 0, result.stderr
    parts = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json"]
    parts += ["tokenizer/vocab.json", "scheduler/scheduler_config.json"]
    if family == "sdxl":
        parts += ["text_encoder_2/config.json", "tokenizer_2/vocab.json"]
    for part in parts:
        assert (folder / part).is_file(), part
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == pipeline


def test_make_tiny_model_names_the_families_it_knows(tmp_path, capsys):
    result = run_main(capsys, "make-tiny-model", "--family", "sd3", str(tmp_path / "tiny"))
    assert_one_line_error(result, "'sd3'", "sd15, sd2, sdxl")


def assert_one_line_error(result: tuple[int, str, str], *fragments: str) -> None:
    code, _, err = result
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_value_is_one_line_naming_the_key(capsys):
    result = run_main(capsys, "train", str(DEMO_CONFIG), "--set", "train.lr_scheduler=step")
    assert_one_line_error(result, "train.lr_scheduler", "'linear' or 'polynomial' (got 'step')")


def test_unknown_key_is_one_line_naming_the_key(capsys):
    result = run_main(capsys, "train", str(DEMO_CONFIG), "--set", "adapter.rnak=4")
    assert_one_line_error(result, "adapter.rnak", "unknown key")


def test_missing_dataset_folder_is_one_line_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    result = run_main(
        capsys, "train", str(DEMO_CONFIG), "--output-dir", str(tmp_path / "run"),
        "--set", f"data.dir={str(missing)!r}",
    )  # fmt: skip
    assert_one_line_error(result, "data.dir", str(missing), "not found")


def test_missing_adapter_file_is_one_line(tmp_path, capsys):
    result = run_main(
        capsys, "sample", "--model", "tiny:sd15", "--adapter", str(tmp_path / "gone.safetensors"),
        "--prompt", "x", "--out", str(tmp_path / "x.png"),
    )  # fmt: skip
    assert_one_line_error(result, "gone.safetensors", "not found")
    assert not (tmp_path / "x.png").exists()
