"""The VRAM presets stay valid configs, layer under a user's file, and train."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from safetensors.torch import load_file

from stylelora.config import Config, load_config, preset_names, preset_path
from stylelora.errors import UserError
from stylelora.families.registry import family_named, family_names
from stylelora.train.trainer import train

PRESETS = ["sd15-4gb", "sd15-8gb", "sdxl-6gb", "sdxl-8gb", "sdxl-12gb", "sdxl-24gb"]
PRESETS += ["flux-8gb", "flux-12gb", "flux-16gb", "flux-24gb"]
PRESETS += ["zimage-8gb", "zimage-12gb", "zimage-16gb", "zimage-24gb"]
PRESETS += ["qwen-image-16gb", "qwen-image-24gb", "qwen-image-32gb", "qwen-image-48gb"]
PRESETS += ["flux2-24gb", "flux2-32gb", "flux2-48gb"]
PRESETS += ["flux2-klein-8gb", "flux2-klein-12gb", "flux2-klein-16gb", "flux2-klein-24gb"]


def preset_family(name: str) -> str:
    """The family a preset is for: the longest family name (`_` as `-`) it starts with
    (qwen-image-16gb: qwen_image, flux2-klein-8gb: flux2)."""
    return max((f for f in family_names() if name.startswith(f.replace("_", "-") + "-")), key=len)


def test_every_preset_is_there_in_its_familys_folder():
    assert preset_names() == sorted(PRESETS)
    for name in PRESETS:
        family = preset_family(name)
        assert preset_path(name, ROOT) == ROOT / f"stylelora/families/{family}/presets/{name}.toml"


def test_an_installed_package_finds_the_presets_it_carries(tmp_path):
    """A wheel holds the families' folders with their presets (pyproject's package-data); this
    copies the package as a wheel lays it out, away from the checkout."""
    site = tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "stylelora", site / "stylelora", symlinks=False, ignore=ignore)
    code = (
        "from stylelora.config import preset_names as n, preset_path as p; "
        "print(p('sdxl-8gb', '.'), *n())"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    found, *names = out.stdout.split()
    assert found == str(site / "stylelora/families/sdxl/presets/sdxl-8gb.toml")
    assert names == sorted(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_loads_as_a_config(name, tmp_path):
    cfg = load_config(preset_path(name, ROOT), [f"data.dir={str(tmp_path)!r}", "model='tiny:sd15'"])
    assert cfg.data.dir == tmp_path and cfg.model == "tiny:sd15"
    assert cfg.train.gradient_checkpointing and cfg.data.cache_latents
    assert cfg.train.mixed_precision != "no"
    side = 512 if name.startswith("sd15") else 1024
    assert cfg.data.resolution == side


# The presets whose runs also take the style and content measures (a transformer family's VAE:
# the measures ask the family, whichever it is), briefly; the others do not, for the suite's time.
MEASURED = {"flux-8gb"}
MEASURED_RUN = "[validation]\nmeasure_prompts = 2\nmeasure_steps = 2\n"


def tiny_run_config(name: str, folder: Path) -> Config:
    """The preset `name` under a user's file in `folder` that trains its family's tiny model
    for 2 steps at 64 px. On the CPU fp16 runs as bf16, which has the same size. The tiny
    transformers have two blocks: they swap one where the preset swaps any."""
    user = folder / "mine.toml"
    swap = (
        "blocks_to_swap = 1\n" if load_config(preset_path(name, ROOT)).train.blocks_to_swap else ""
    )
    user.write_text(
        f'preset = "{name}"\nname = "mine"\nmodel = "tiny:{preset_family(name)}"\n'
        'output_dir = "run"\n[data]\ndir = "images"\nresolution = 64\n'
        f'[train]\nmax_steps = 2\nlr_warmup_steps = 0\nmixed_precision = "bf16"\n{swap}'
        '[sample]\nprompts = ["zqxstyle, a house"]\nevery_n_steps = 2\nnum_inference_steps = 2\n'
        + (MEASURED_RUN if name in MEASURED else "[validation]\nmeasure = false\n")
    )
    return load_config(user)


def same_run(cfg: Config) -> str:
    """What a run of `cfg` does: all of it but the preset's name and the folders."""
    settings = cfg.model_dump(mode="json", exclude={"preset", "output_dir"})
    del settings["data"]["dir"]
    return json.dumps(settings, sort_keys=True)


# The adapters and output folders of the runs so far: presets that come to the same run on the
# tiny model train it once (flux2-32gb and flux2-klein-16gb, flux2-klein-12gb and -24gb: their
# settings are the same but for the real model each names).
RUNS: dict[str, tuple[dict, Path]] = {}


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_trains_the_tiny_model_of_its_family(name, demo_subset, tmp_path):
    """Every setting a preset combines (quantized base, 8-bit optimizer, caches, checkpointing,
    text-encoder training, half-precision previews, block swapping) through the real trainer,
    at 64 px."""
    cfg = tiny_run_config(name, tmp_path)
    if same_run(cfg) not in RUNS:
        demo_subset(4).rename(tmp_path / "images")
        result = train(cfg)
        RUNS[same_run(cfg)] = load_file(result.adapter_path), cfg.output_dir
    tensors, output_dir = RUNS[same_run(cfg)]
    preset = load_config(preset_path(name, ROOT))
    family = preset_family(name)
    known = family_named(family).file_prefixes()
    prefixes = {prefix for prefix in known for key in tensors if key.startswith(prefix)}
    assert known[0] in prefixes and (len(prefixes) > 1) == preset.adapter.text_encoder
    ups = ("lora_up.weight", "lora_B.weight")
    assert any(k.endswith(ups) and t.abs().max() > 0 for k, t in tensors.items())
    assert (output_dir / "samples" / "mine_000002.png").is_file()
    if name in MEASURED:  # measured at the end, and the measured step's adapter kept
        assert (output_dir / "measures" / "step-000002.png").is_file()
        assert (output_dir / "mine-best.safetensors").is_file()


def test_a_user_config_overrides_its_preset_key_by_key(tmp_path):
    user = tmp_path / "mine.toml"
    user.write_text(
        'preset = "sdxl-8gb"\nname = "mine"\nmodel = "tiny:sdxl"\n'
        '[data]\ndir = "images"\n[train]\nbatch_size = 3\n'
    )
    cfg = load_config(user, ["adapter.rank=4"])
    assert (cfg.name, cfg.model, cfg.preset) == ("mine", "tiny:sdxl", "sdxl-8gb")
    assert cfg.data.dir == tmp_path / "images"  # relative to the user's file
    assert cfg.data.resolution == 1024 and cfg.data.cache_text_encoder_outputs  # from the preset
    assert cfg.train.batch_size == 3 and cfg.train.optimizer == "adamw8bit"
    assert cfg.adapter.rank == 4 and cfg.adapter.alpha == 4.0


def test_a_preset_from_the_command_line_and_a_preset_path(tmp_path):
    user = tmp_path / "mine.toml"
    user.write_text('name = "mine"\nmodel = "tiny:sd15"\n[data]\ndir = "."\n')
    assert load_config(user, ["preset='sd15-4gb'"]).train.quantize_base == "nf4"
    (tmp_path / "house.toml").write_text("[train]\nmax_steps = 7\n")
    assert load_config(user, ["preset='house.toml'"]).train.max_steps == 7


def test_a_preset_lends_its_settings_but_not_its_images_output_folder_or_name(tmp_path):
    """Forgetting data.dir must not train on the demo images the preset file points at."""
    user = tmp_path / "mine.toml"
    user.write_text('preset = "sdxl-8gb"\nname = "mine"\nmodel = "tiny:sdxl"\n')
    with pytest.raises(UserError, match=r"mine.toml: data.dir: required key is missing$"):
        load_config(user)
    user.write_text('preset = "sdxl-8gb"\nmodel = "tiny:sdxl"\n[data]\ndir = "images"\n')
    with pytest.raises(UserError, match=r"mine.toml: name: required key is missing$"):
        load_config(user)
    cfg = load_config(user, ["name='mine'"])
    preset = load_config(preset_path("sdxl-8gb", ROOT))
    assert cfg.output_dir != preset.output_dir and cfg.data.dir == tmp_path / "images"
    assert cfg.data.resolution == preset.data.resolution == 1024


def test_an_unknown_preset_is_named_with_the_known_ones(tmp_path):
    user = tmp_path / "mine.toml"
    user.write_text('preset = "sd15-2gb"\nname = "m"\nmodel = "tiny:sd15"\n[data]\ndir = "."\n')
    with pytest.raises(
        UserError, match=r"^preset: no preset 'sd15-2gb' \(known: flux-12gb, .*sd15-4gb, "
    ):
        load_config(user)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("multi-gpu", "MULTI_GPU"), ("deepspeed-zero2", "DEEPSPEED"), ("fsdp", "FSDP")],
)
def test_accelerate_configs_parse(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_processes == 2
