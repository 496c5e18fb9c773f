"""Every file and folder stylelora writes has the mode the umask gives, so that a UI running as
another user can read it (safetensors' save_file makes 0600 files, mkdtemp 0700 folders)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import demo_config
from lora_helpers import adapted_family

from stylelora.cli import main
from stylelora.data.dataset import ImageCaptionDataset
from stylelora.data.report import data_options
from stylelora.data.scan import scan_folder
from stylelora.export.lora_file import save_lora_file
from stylelora.families.tiny import tiny_model_path
from stylelora.train.cache import cache_latents
from stylelora.train.checkpoint import Checkpointer, TrainState
from stylelora.train.ema import AdapterEMA


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def modes_under(root: Path) -> dict[str, int]:
    """The permission bits of `root` and of everything under it."""
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(p): p.stat().st_mode & 0o777 for p in paths}


def wrong_modes(roots: list[Path], mask: int) -> dict[str, str]:
    wrong = {}
    for root in roots:
        for path, mode in modes_under(root).items():
            expected = (0o777 if Path(path).is_dir() else 0o666) & ~mask
            if mode != expected:
                wrong[path] = f"{mode:o} (want {expected:o})"
    return wrong


def tool_outputs(tmp_path: Path, adapter: Path) -> list[Path]:
    """Run every tool that writes a file or folder; their outputs."""
    tiny = str(tiny_model_path("sd15"))
    outputs = {
        "resized": ["resize", adapter, "--rank", "1"],
        "combined": ["combine", f"{adapter}:0.5", adapter],
        "diffusers": ["export", adapter, "--model", tiny, "--format", "diffusers"],
        "peft": ["export", adapter, "--model", tiny, "--format", "peft"],
        "merged": ["merge", "--model", tiny, "--adapter", adapter],
        "single": ["merge", "--model", tiny, "--adapter", adapter],
    }
    paths = []
    for name, args in outputs.items():
        suffix = "" if name in ("peft", "merged") else ".safetensors"
        out = tmp_path / f"{name}{suffix}"
        assert main([*map(str, args), "--out", str(out)]) == 0, name
        paths.append(out)
    return paths


def checkpoint_folder(tmp_path: Path, family, adapted) -> Path:
    params = {
        name: param
        for prefix, module in adapted.items()
        for name, param in module.named_parameters(prefix=prefix)
        if param.requires_grad
    }
    ema = AdapterEMA(list(params.values()), 0.9)
    checkpointer = Checkpointer(Accelerator(cpu=True), tmp_path / "run", 2, params, ema)
    return checkpointer.save(TrainState(step=1), {}, {})


def latents_cache(tmp_path: Path, family, demo_subset) -> Path:
    data = demo_subset(1)
    cfg = demo_config(tmp_path, f"data.dir={str(data)!r}")
    dataset = ImageCaptionDataset(scan_folder(data).records, data_options(cfg.data, cfg.seed))
    cache_latents(family, dataset, tmp_path / "cache", 1, False)
    return tmp_path / "cache"


def test_everything_written_has_the_umasks_mode(tmp_path, umask, demo_subset):
    family, adapted = adapted_family("sd15", rank=2)
    adapter = save_lora_file(tmp_path / "a.safetensors", family, adapted, {})
    written = [adapter, *tool_outputs(tmp_path, adapter)]
    written.append(checkpoint_folder(tmp_path, family, adapted))
    with torch.no_grad():
        cache = latents_cache(tmp_path, family, demo_subset)
    assert any(cache.glob("*.safetensors"))
    assert wrong_modes(written + [cache], umask) == {}


def test_a_tiny_model_and_a_skeleton_have_the_umasks_mode(tmp_path, umask):
    from stylelora.families.skeletons import skeleton_dir

    assert main(["make-tiny-model", "--family", "sd15", str(tmp_path / "tiny")]) == 0
    skeleton = skeleton_dir("sd15", cache_dir=tmp_path / "cache")
    assert wrong_modes([tmp_path / "tiny", skeleton], umask) == {}
