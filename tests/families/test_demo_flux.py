"""The demo base's Flux twin: its pretraining script runs (tiny sizes, a few steps), resumes,
and writes the twin's own parts, which with the SD1.5 base's VAE and CLIP make a FluxPipeline
that diffusers loads and samples; the shipped `demo:flux` loads as the Flux family."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline
from safetensors.torch import load_file

from stylelora.families import load_family
from stylelora.families.demo import demo_model_path, packaged_demo
from stylelora.families.flux import Flux

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "datasets"))
import pretrain_demo_flux  # noqa: E402

TINY_RUN = ["--tiny", "--images", "16", "--batch", "2", "--save-every", "1", "--processes", "1"]


def pretrain(tmp_path: Path, name: str, steps: int, *extra: str) -> Path:
    out = tmp_path / name
    work = tmp_path / "work" if "--resume" in extra else tmp_path / f"work-{name}"
    pretrain_demo_flux.main(
        [*TINY_RUN, "--steps", str(steps), "--out", str(out), "--work", str(work), *extra]
    )
    return out


def assembled(twin: Path, folder: Path) -> Path:
    """The twin's parts with the SD1.5 demo base's shared ones, as demo.py assembles them."""
    shutil.copytree(twin, folder)
    base, parts = Flux.demo_shares
    for part in parts:
        (folder / part).symlink_to(demo_model_path(base) / part, target_is_directory=True)
    return folder


@pytest.mark.skipif(
    not (packaged_demo("sd15") / "model_index.json").exists(), reason="no demo base"
)
def test_pretraining_writes_the_twins_parts_and_resumes(tmp_path: Path) -> None:
    straight = pretrain(tmp_path, "straight", 3)
    with pytest.raises(SystemExit, match="stopped after step 2"):
        pretrain(tmp_path, "first", 3, "--work", str(tmp_path / "work"), "--stop-after", "2")
    resumed = pretrain(tmp_path, "resumed", 3, "--resume")
    for part in ("transformer/diffusion_pytorch_model", "text_encoder_2/model"):
        a, b = (load_file(f / f"{part}.safetensors") for f in (straight, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert {p.name for p in straight.iterdir()} == {
        "model_index.json", "scheduler", "text_encoder_2", "tokenizer_2", "transformer"
    }  # fmt: skip

    pipe = DiffusionPipeline.from_pretrained(
        assembled(straight, tmp_path / "twin"), torch_dtype=torch.float32
    )
    assert isinstance(pipe, FluxPipeline) and pipe.transformer.config.in_channels == 16
    t5 = pipe.tokenizer_2  # the captions' words are its pieces
    assert t5.convert_ids_to_tokens(t5("on a background").input_ids) == [
        "\u2581on", "\u2581a", "\u2581background", "</s>"
    ]  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red fish on a blue background", height=64, width=64, num_inference_steps=2,
                 guidance_scale=1.0, output_type="np").images  # fmt: skip
    assert image.shape == (1, 64, 64, 3)


@pytest.mark.skipif(not (packaged_demo("flux") / "model_index.json").exists(), reason="not shipped")
def test_shipped_demo_flux_loads_as_the_flux_family() -> None:
    weights = sum(
        f.stat().st_size
        for name in ("sd15", "flux")
        for f in packaged_demo(name).rglob("*.safetensors")
    )
    assert weights <= 30 * 1024 * 1024  # both demo bases, the shared parts once
    family = load_family("demo:flux")
    assert family.name == "flux" and family.guidance_distilled
    base = load_family("demo:sd15").pipe
    for shared in ("vae", "text_encoder"):  # the SD1.5 base's own
        ours, theirs = getattr(family.pipe, shared).state_dict(), getattr(base, shared).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), shared
    assert family.max_sequence_length == pretrain_demo_flux.T5_LENGTH
