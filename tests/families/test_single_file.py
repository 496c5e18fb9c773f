"""Single-file checkpoints: the family is told from the tensor names, loading stays offline,
and a .ckpt is never unpickled beyond plain tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from stylelora.errors import UserError
from stylelora.export.single_file import save_single_file
from stylelora.families import load_family, load_pipeline
from stylelora.families.loading import single_file_family
from stylelora.families.skeletons import skeleton_dir
from stylelora.families.tiny import tiny_model_path
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import render

UNET = "model.diffusion_model.input_blocks.0.0.weight"
MARKERS = {
    "sd15": "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    "sd2": "cond_stage_model.model.ln_final.weight",
    "sdxl": "conditioner.embedders.1.model.ln_final.weight",
}


class Payload:
    """Stands for code in a pickle: torch.load(weights_only=True) must not rebuild it."""

    def __reduce__(self):
        return (print, ("unpickled code ran",))


def checkpoint(folder, skeleton: str, suffix: str = ".safetensors"):
    tensors = {UNET: torch.zeros(1), MARKERS[skeleton]: torch.zeros(1)}
    if skeleton == "sdxl":
        tensors["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = (
            torch.zeros(1)
        )
    path = folder / f"{skeleton}{suffix}"
    if suffix == ".safetensors":
        save_file(tensors, path)
    else:
        torch.save({"state_dict": tensors, "global_step": 1}, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize(
    ("skeleton", "pipeline"),
    [
        ("sd15", StableDiffusionPipeline),
        ("sd2", StableDiffusionPipeline),
        ("sdxl", StableDiffusionXLPipeline),
    ],
)
def test_family_of_a_single_file_is_told_from_its_keys(tmp_path, skeleton, pipeline, suffix):
    family = single_file_family(checkpoint(tmp_path, skeleton, suffix))
    assert (family.name, family.pipeline_class) == (skeleton, pipeline)


def test_file_of_no_known_family_is_one_clear_line(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"transformer.blocks.0.weight": torch.zeros(1)}, path)
    with pytest.raises(
        UserError,
        match="not a checkpoint of any family stylelora knows .SD1.x, SD2.x, SDXL, ",
    ) as error:
        load_pipeline(str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_ckpt_with_code_in_its_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {UNET: torch.zeros(1)}, "hook": Payload()}, path)
    with pytest.raises(UserError, match="not a readable weights-only checkpoint"):
        load_pipeline(str(path))


def test_other_suffixes_are_refused(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"x")
    with pytest.raises(UserError, match=r"must be \.safetensors or \.ckpt"):
        load_pipeline(str(path))


@pytest.mark.parametrize(("skeleton", "tiny"), [("sdxl", "sdxl"), ("sd2", "sd2")])
def test_single_file_loads_offline_with_the_family_skeleton(tmp_path, monkeypatch, skeleton, tiny):
    """Without `config`, the packaged skeleton is passed and the hub is never asked.

    A stand-in for from_single_file here: a real-size checkpoint is gigabytes; the real call is
    exercised on the tiny models below.
    """
    calls = []

    def from_single_file(cls, path, **kwargs):
        calls.append((cls, path, kwargs))
        return DiffusionPipeline.from_pretrained(tiny_model_path(tiny))

    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        monkeypatch.setattr(cls, "from_single_file", classmethod(from_single_file))
    path = checkpoint(tmp_path, skeleton)
    family = load_family(str(path), settings={"prediction_type": "epsilon"})
    ((cls, called_path, kwargs),) = calls
    assert called_path == str(path)
    assert kwargs["config"] == str(skeleton_dir(skeleton))
    assert kwargs["local_files_only"] is True
    assert family.name == {"sdxl": "sdxl", "sd2": "sd2"}[skeleton]
    assert family.prediction_type == "epsilon"  # the override reaches single files too


@pytest.mark.parametrize(("tiny", "name"), [("sd15", "sd15"), ("sd2", "sd2"), ("sdxl", "sdxl")])
def test_single_file_renders_what_its_diffusers_folder_renders(tmp_path, tiny, name):
    """Our AUTOMATIC1111-layout writer, read back by diffusers' own from_single_file."""
    folder = tiny_model_path(tiny)
    source = load_family(str(folder))
    path = save_single_file(tmp_path / f"tiny-{tiny}.safetensors", source)
    family = load_family(str(path), config=str(folder))
    assert family.name == name
    assert family.prediction_type == source.prediction_type
    prompt = SamplePrompt("a fish", width=64, height=64, seed=3, steps=3, guidance_scale=5.0)
    ours = render(family.pipe, prompt, output_type="np")
    theirs = render(source.pipe, prompt, output_type="np")
    assert np.abs(ours - theirs).max() < 1e-4


def test_half_precision_single_file_holds_half_floats(tmp_path):
    source = load_family(str(tiny_model_path("sd15")))
    path = save_single_file(tmp_path / "half.safetensors", source, dtype=torch.float16)
    with safe_open(str(path), framework="pt") as handle:
        names = handle.keys()
        dtypes = {handle.get_slice(key).get_dtype() for key in names}
    assert dtypes == {"F16"}
