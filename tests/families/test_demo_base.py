"""The demo base: its pretraining script runs (tiny sizes, a few steps), resumes, and writes a
folder that `from_pretrained` loads; the shipped `demo:sd15` loads as an SD1.5 pipeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from safetensors.torch import load_file

from stylelora.errors import UserError
from stylelora.families import load_pipeline
from stylelora.families.demo import demo_model_path, packaged_demo
from stylelora.families.skeletons import materialise

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "datasets"))
import pretrain_demo_base  # noqa: E402

TINY_RUN = ["--tiny", "--images", "16", "--codec-images", "16", "--vae-steps", "2",
            "--vae-batch", "2", "--batch", "2", "--decoder-steps", "2", "--save-every", "1",
            "--processes", "1"]  # fmt: skip


def pretrain(tmp_path: Path, name: str, steps: int, *extra: str) -> Path:
    out = tmp_path / name
    work = tmp_path / "work" if "--resume" in extra else tmp_path / f"work-{name}"
    pretrain_demo_base.main([*TINY_RUN, "--steps", str(steps), "--out", str(out),
                             "--work", str(work), *extra])  # fmt: skip
    return out


def weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    return load_file(folder / component / "diffusion_pytorch_model.safetensors")


def test_pretraining_writes_a_loadable_sd15_folder_and_resumes(tmp_path: Path) -> None:
    straight = pretrain(tmp_path, "straight", 3)
    with pytest.raises(SystemExit, match="stopped after step 2"):
        pretrain(tmp_path, "first", 3, "--work", str(tmp_path / "work"), "--stop-after", "2")
    resumed = pretrain(tmp_path, "resumed", 3, "--resume")
    assert json.loads((tmp_path / "work" / "diffusion.json").read_text())["step"] == 3
    for component in ("unet", "vae"):  # resuming replays the same draws
        a, b = weights(straight, component), weights(resumed, component)
        assert all(torch.equal(a[k], b[k]) for k in a), component
    tokenizer_files = {p.name for p in (straight / "tokenizer").iterdir()}
    assert tokenizer_files == {"special_tokens_map.json", "tokenizer_config.json"}

    folder = materialise(straight, tmp_path / "cache" / "base")
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert len(pipe.tokenizer) == 49408  # the real CLIP BPE vocabulary
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.vae.config.scaling_factor > 0
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red fish on a blue background", height=64, width=64, num_inference_steps=2,
                 output_type="np").images  # fmt: skip
    assert image.shape == (1, 64, 64, 3)


def test_two_processes_share_each_step_as_one_run(tmp_path: Path) -> None:
    """The default: two processes (DDP over gloo), each on its slice of every batch. (Resuming
    is shown on one process above: the suite's time.)"""
    two = ("--processes", "2", "--batch", "4", "--vae-batch", "2")
    straight = pretrain(tmp_path, "straight", 3, *two)
    one = pretrain(tmp_path, "one", 3, "--batch", "4")
    for component in ("unet", "text_encoder", "vae"):
        a, c = (load_file(next((f / component).glob("*.safetensors"))) for f in (straight, one))
        # The same draws, split in two: the same weights but for the order of float sums. Adam's
        # first steps are about lr x sign(gradient), so the rare element whose gradient is near
        # zero may step either way: all but under 1 in 1,000 agree within 2e-3.
        diff = torch.cat([(a[k].float() - c[k].float()).abs().flatten() for k in a])
        assert (diff > 2e-3).float().mean() < 1e-3 and diff.max() < 2e-2, component


@pytest.mark.skipif(
    not (packaged_demo("sd15") / "model_index.json").exists(), reason="demo base not shipped"
)
def test_shipped_demo_base_loads_through_from_pretrained() -> None:
    folder = packaged_demo("sd15")
    weights = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert weights <= 30 * 1024 * 1024
    pipe = load_pipeline("demo:sd15")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert (demo_model_path("sd15") / "tokenizer" / "merges.txt").is_file()


def test_unknown_demo_model_is_a_user_error() -> None:
    with pytest.raises(UserError, match="demo model 'sdxl'"):
        load_pipeline("demo:sdxl")
