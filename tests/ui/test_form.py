"""The config form: built from the config models, it holds every key, checks as the CLI does,
and its TOML view is the same settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from stylelora.config import Config, load_config
from stylelora.errors import UserError
from stylelora.families.registry import FAMILIES
from stylelora.ui import form
from stylelora.ui.roots import Roots


def config_keys(model=Config, prefix: str = "") -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, form.BaseModel):
            keys += config_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_every_config_key_is_in_the_form_once_in_a_readme_group():
    keys = [field.key for field in form.form_fields()]
    assert sorted(keys) == sorted(config_keys())
    groups = {field.key: field.group for field in form.form_fields()}
    assert groups["data.cache_latents"] == "[data] caches"
    assert groups["train.noise_offset"] == "[train] quality"
    assert groups["data.mask_dir"] == "masked loss" and groups["sample.seed"] == "[sample]"
    # the groups are the rows of the README's config table, in its order
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("| section | keys |")[1].split("\n\n")[0]
    rows = [line.split("|")[1].strip().replace("`", "") for line in table.splitlines()[2:]]
    assert rows == form.GROUP_ORDER
    fields = form.FIELDS
    assert fields["train.optimizer"].choices == [
        "adamw", "adamw8bit", "adafactor", "prodigy", "lion8bit"
    ]  # fmt: skip
    assert fields["data.flip"].choices == ["true", "false"]
    assert fields["data.cache_latents"].choices == ["auto", "true", "false"]
    assert fields["train.learning_rate"].kind == "number"
    assert fields["train.learning_rate"].default == "0.0001"
    assert fields["data.dir"].required and fields["data.dir"].kind == "text"


@pytest.mark.parametrize(
    "key, value",
    [("train.learning_rate", "-1"), ("train.optimizer", "sgd"), ("data.bucket_step", "12"),
     ("adapter.rank", "many"), ("train.max_timestep", "0")],
)  # fmt: skip
def test_a_field_gets_the_message_the_command_line_prints(tmp_path, key, value):
    (tmp_path / "data").mkdir()
    base = {"name": "x", "model": "tiny:sd15", "data.dir": "data"}
    checked = form.check_settings({**base, key: value}, Roots([tmp_path]))
    assert checked.config is None and len(checked.problems) == 1
    [(problem_key, message)] = checked.problems.items()
    config = tmp_path / "c.toml"
    config.write_text(form.toml_of(form.settings_to_raw(base)))
    with pytest.raises(UserError) as cli:
        load_config(config, [f"{key}={value}"])
    assert str(cli.value) == f"{config}: {problem_key}: {message}"


def test_settings_and_their_toml_are_one_state(tmp_path):
    settings = {
        "name": "x",
        "preset": "sd15-8gb",
        "model": "tiny:sd15",
        "data.dir": "data",
        "data.alpha_background": "[0, 0, 0]",
        "train.optimizer_args": '{ "d_coef" = 2 }',
        "train.learning_rate": "0.0002",
        "sample.prompts": '["a cat", "a dog"]',
        "data.trigger_word": "123",
    }
    text = form.toml_of(form.settings_to_raw(settings))
    assert form.settings_from_toml(text) == settings
    raw = form.settings_to_raw(settings)
    assert raw["data"]["trigger_word"] == "123"  # a text key stays text
    assert raw["train"]["optimizer_args"] == {"d_coef": 2}
    (tmp_path / "data").mkdir()
    checked = form.check_settings(settings, Roots([tmp_path]))
    assert checked.problems == {}
    assert checked.config.train.gradient_checkpointing  # from the preset, under the settings
    assert checked.config.data.dir == tmp_path / "data"
    with pytest.raises(UserError, match="not valid TOML"):
        form.settings_from_toml("name = ")


def test_a_resolution_or_a_list_of_them_round_trips_through_form_and_toml(tmp_path):
    (tmp_path / "data").mkdir()
    base = {"name": "x", "model": "tiny:sd15", "data.dir": "data"}
    assert form.FIELDS["data.resolution"].default == "512"
    for text, sides in (("64", [64]), ("[128, 64]", [64, 128])):
        settings = {**base, "data.resolution": text}
        assert form.settings_from_toml(form.toml_of(form.settings_to_raw(settings))) == settings
        checked = form.check_settings(settings, Roots([tmp_path]))
        assert checked.problems == {} and checked.config.data.resolutions == sides
    checked = form.check_settings({**base, "data.resolution": "[64, 64]"}, Roots([tmp_path]))
    assert checked.problems == {"data.resolution": "lists 64 twice; give each side once"}


def test_every_key_says_what_it_does_in_one_short_sentence():
    for field in form.FIELDS.values():
        assert field.help.strip(), field.key
        assert "\n" not in field.help and len(field.help) <= 160, field.key
    assert set(form.ESSENTIALS) == {f.key for f in form.FIELDS.values() if f.essential}
    assert form.FIELDS["train.max_steps"].label == "Steps"
    assert form.FIELDS["train.batch_size"].label == "train.batch_size"


def test_a_preset_lends_its_values_and_the_model_decides_which_keys_apply(tmp_path):
    (tmp_path / "data").mkdir()
    base = {"name": "x", "data.dir": "data"}
    checked = form.check_settings({**base, "preset": "sd15-8gb"}, Roots([tmp_path]))
    assert checked.problems == {}
    preset = checked.preset
    assert preset["train.batch_size"] == "2" and preset["train.optimizer"] == "adamw8bit"
    assert preset["train.lr_scheduler"] == "cosine" and preset["train.lr_warmup_steps"] == "50"
    assert not {"name", "output_dir", "data.dir"} & set(preset)  # a preset lends no run
    # the preset's model is a UNet trained on the DDPM objective
    assert "train.timestep_sampling" in checked.not_taken
    assert "train.down_lr_weight" not in checked.not_taken
    flow = form.check_settings({**base, "model": "tiny:flux"}, Roots([tmp_path]))
    assert "train.down_lr_weight" in flow.not_taken and "clip_skip" in flow.not_taken
    assert "train.timestep_sampling" not in flow.not_taken and flow.preset == {}
    unknown = form.check_settings({**base, "model": "someone/some-model"}, Roots([tmp_path]))
    assert unknown.not_taken == []


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_the_keys_a_family_has_no_use_for_are_what_its_model_lacks(family):
    """The family's declared answer, against its real architecture (meta device)."""
    model = family.on_meta_device()
    assert isinstance(model.training_objective(), family.objective_type)
    assert bool(model.swappable_blocks()) == family.swaps_blocks
    try:
        model.kohya_blocks()
        block_wise = True
    except UserError:
        block_wise = False
    assert block_wise == family.block_wise
    unused = family.unused_keys()
    assert ("train.down_lr_weight" in unused) != block_wise
    assert ("train.blocks_to_swap" in unused) != family.swaps_blocks
    assert ("adapter.text_encoder" in unused) == (not family.text_encoder_attrs)
    assert ("train.min_snr_gamma" in unused) != ("train.flow_weighting" in unused)
    assert unused <= set(form.FIELDS)
