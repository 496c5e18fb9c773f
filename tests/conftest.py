"""Shared fixtures: a private model cache (tiny models are built once per session), the demo."""

from __future__ import annotations

import compileall
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# the web UI's fixtures (a server, headless Chromium) for tests/ui; the tiny captioners
pytest_plugins = ["ui_fixtures", "caption_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.toml"
DEMO_DATA = ROOT / "datasets" / "demo-style"

# Set before stylelora is imported anywhere, and inherited by CLI subprocesses. Under
# pytest-xdist the workers inherit the controller's cache (tiny models are built atomically),
# and each torch process takes one thread: two processes of two threads each on two cores run
# several times slower than two of one.
os.environ.setdefault("STYLELORA_CACHE", tempfile.mkdtemp(prefix="stylelora-test-cache-"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    """Compile the package once, before the workers start: with PYTHONDONTWRITEBYTECODE set
    (as on some CI machines) each of the suite's `stylelora` processes would otherwise compile
    the modules it imports again, about 2 s each."""
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        compileall.compile_dir(ROOT / "stylelora", quiet=1)


def run_main(capsys: pytest.CaptureFixture, *args) -> tuple[int, str, str]:
    """The `stylelora` command's `main` in this process: (exit status, stdout, stderr)."""
    from stylelora.cli import main

    try:
        code = main([str(arg) for arg in args])
    except SystemExit as exc:  # argparse's errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def tiny_sd15_dir() -> Path:
    """The tiny SD1.5 diffusers folder, saved once and loaded by `from_pretrained` in tests."""
    from stylelora.families.tiny import tiny_model_path

    return tiny_model_path("sd15")


@pytest.fixture()
def demo_subset(tmp_path: Path):
    """Copy the first `count` demo images (and captions) into a fresh folder."""

    def copy(count: int, start: int = 0) -> Path:
        folder = tmp_path / f"data-{start}-{count}"
        folder.mkdir()
        for image in sorted(DEMO_DATA.glob("*.png"))[start : start + count]:
            shutil.copy(image, folder)
            shutil.copy(image.with_suffix(".txt"), folder)
        return folder

    return copy


# The short run the tests were written for, on top of the demo config (which trains the demo
# base for 1000 steps): tests that train the tiny model stay quick and keep their figures.
TEST_RUN = (
    "train.max_steps=120",
    "train.lr_warmup_steps=10",
    "adapter.alpha=4.0",
    "adapter.unet_targets='cross-attn'",
    "train.max_timestep=''",
    "train.loraplus_lr_ratio=''",
    "sample.every_n_steps=40",
    "sample.num_inference_steps=12",
    "sample.guidance_scale=5.0",
    "validation.measure=false",  # tests/train/test_measuring.py turns it on
)


def demo_config(tmp_path: Path, *overrides: str):
    """The demo config, shortened (`TEST_RUN`), writing into `tmp_path`, with `key=value`
    overrides."""
    from stylelora.config import load_config

    cfg = load_config(DEMO_CONFIG, [*TEST_RUN, *overrides])
    cfg.output_dir = tmp_path / "run"
    return cfg


def training_config(tmp_path: Path, model, data: Path, *overrides: str):
    """The demo config training `model` on the images in `data`, without preview prompts."""
    cfg = demo_config(tmp_path, f"model={str(model)!r}", f"data.dir={str(data)!r}", *overrides)
    cfg.sample.prompts_file = None
    return cfg


# After the web UI's, the longest other files (a minute or more of one worker each, measured)
LONG_FILES = (
    "test_cli.py",
    "test_presets.py",
    "families/test_demo_base.py",
    "train/test_demo_style.py",
    "train/test_run_not_lost.py",
    "train/test_resume.py",
)


def file_order(item: pytest.Item) -> int:
    path = item.nodeid.split("::")[0]
    if "tests/ui/" in path or path.startswith("ui/"):
        return 0
    return 1 if path.endswith(LONG_FILES) else 2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The web UI's test files first, then the other long ones: under pytest-xdist a long file
    handed out last keeps one worker busy while the other has nothing left."""
    items.sort(key=file_order)
