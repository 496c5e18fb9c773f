"""The demo base's Z-Image twin: its pretraining script runs (tiny sizes, a few steps), resumes
to the same bits, and writes the twin's own parts, which with the SD1.5 base's VAE make a
ZImagePipeline that diffusers loads and samples; the shipped `demo:zimage` loads as the Z-Image
family and draws what its captions ask."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, ZImagePipeline
from safetensors.torch import load_file

from stylelora.families import load_family
from stylelora.families.demo import demo_model_path, packaged_demo
from stylelora.families.zimage import ZImage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "datasets"))
import pretrain_demo_zimage  # noqa: E402

TINY_RUN = ["--tiny", "--images", "16", "--batch", "2", "--save-every", "1", "--processes", "1"]
NO_BASE = not (packaged_demo("sd15") / "model_index.json").exists()


def pretrain(tmp_path: Path, name: str, steps: int, *extra: str) -> Path:
    out = tmp_path / name
    work = tmp_path / "work" if "--resume" in extra else tmp_path / f"work-{name}"
    pretrain_demo_zimage.main(
        [*TINY_RUN, "--steps", str(steps), "--out", str(out), "--work", str(work), *extra]
    )
    return out


@pytest.mark.skipif(NO_BASE, reason="no demo base")
def test_pretraining_writes_the_twins_parts_and_resumes(tmp_path: Path) -> None:
    straight = pretrain(tmp_path, "straight", 3)
    with pytest.raises(SystemExit, match="stopped after step 2"):
        pretrain(tmp_path, "first", 3, "--work", str(tmp_path / "work"), "--stop-after", "2")
    resumed = pretrain(tmp_path, "resumed", 3, "--resume")
    for part in ("transformer/diffusion_pytorch_model", "text_encoder/model"):
        a, b = (load_file(f / f"{part}.safetensors") for f in (straight, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert {p.name for p in straight.iterdir()} == {
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer"
    }  # fmt: skip

    folder = tmp_path / "twin"
    shutil.copytree(straight, folder)
    base, parts = ZImage.demo_shares
    for part in parts:
        (folder / part).symlink_to(demo_model_path(base) / part, target_is_directory=True)
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    assert isinstance(pipe, ZImagePipeline) and pipe.transformer.config.in_channels == 4
    pipe.set_progress_bar_config(disable=True)
    tokens = pretrain_demo_zimage.TEXT_LENGTH
    image = pipe("a red fish", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                 max_sequence_length=tokens, output_type="np").images  # fmt: skip
    assert image.shape == (1, 64, 64, 3)


@pytest.mark.skipif(
    not (packaged_demo("zimage") / "model_index.json").exists(), reason="not shipped"
)
def test_shipped_demo_zimage_draws_what_its_caption_asks() -> None:
    """A red subject on a blue background, and the other way round: the twin's pictures take
    the colours the caption names (the base-quality benchmark scores all 56 subjects)."""
    own = sum(f.stat().st_size for f in packaged_demo("zimage").rglob("*.safetensors"))
    assert own <= 8 * 1024 * 1024
    family = load_family("demo:zimage")
    assert family.name == "zimage" and family.max_length == pretrain_demo_zimage.TEXT_LENGTH
    words = family.pipe.tokenizer.tokenize("a red fish on a blue background")
    assert words == ["a", "Ġred", "Ġfish", "Ġon", "Ġa", "Ġblue", "Ġbackground"]  # a word a token
    vae, base = family.vae.state_dict(), load_family("demo:sd15").vae.state_dict()
    assert all(torch.equal(vae[k], base[k]) for k in base)  # the SD1.5 base's own

    def mean_colour(caption: str) -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        image = family.pipe(caption, height=64, width=64, num_inference_steps=12,
                            guidance_scale=1.0, max_sequence_length=family.max_length,
                            generator=generator, output_type="np")  # fmt: skip
        return image.images[0][16:48, 16:48].reshape(-1, 3).mean(axis=0)

    red_on_blue = mean_colour("a red square on a blue background")
    blue_on_red = mean_colour("a blue square on a red background")
    assert red_on_blue[0] > red_on_blue[2] + 0.2 and blue_on_red[2] > blue_on_red[0] + 0.2
