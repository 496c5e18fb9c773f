from pathlib import Path

import pytest
from conftest import DEMO_CONFIG, DEMO_DATA

from stylelora.config import load_config
from stylelora.errors import UserError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_demo_config_paths_resolve_against_the_config_folder():
    cfg = load_config(DEMO_CONFIG)
    assert cfg.data.dir.resolve() == DEMO_DATA.resolve()
    assert cfg.sample.prompts_file.resolve() == (
        DEMO_CONFIG.parents[1] / "samples" / "demo-prompts.txt"
    )


def test_overrides_parse_toml_values_and_dotted_keys():
    cfg = load_config(
        DEMO_CONFIG,
        ["train.learning_rate=3e-4", "data.flip=true", "adapter.unet_targets=attention", "seed=7"],
    )
    assert cfg.train.learning_rate == 3e-4
    assert cfg.data.flip is True
    assert cfg.adapter.unet_targets == "attention"
    assert cfg.seed == 7


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "train.lr_scheduler=step",
            "train.lr_scheduler: Input should be 'constant', 'cosine', 'cosine_with_restarts', "
            "'linear' or 'polynomial' (got 'step')",
        ),
        ("train.learning_rate=-1", "train.learning_rate: Input should be greater than 0"),
        ("train.lerning_rate=1e-4", "train.lerning_rate: unknown key"),
        ("adapter.rank=0", "adapter.rank: Input should be greater than 0"),
        ("train.ema_decay=1.0", "train.ema_decay: Input should be less than 1"),
        ("train.checkpoints_keep=0", "train.checkpoints_keep: Input should be greater than 0"),
        (
            "train.loss_type=l1",
            "train.loss_type: Input should be 'l2', 'huber' or 'smooth_l1' (got 'l1')",
        ),
        ("validation.split=1", "validation.split: Input should be less than 1"),
        ("validation.timesteps=[-1]", "validation.timesteps.0: Input should be greater than"),
        ("train.min_timestep=-5", "train.min_timestep: Input should be greater than or equal to 0"),
        ("data.min_image_size=0", "data.min_image_size: Input should be greater than 0"),
        (
            'data.caption_extension=""',
            "data.caption_extension: expected an extension such as "
            """".txt" or ".caption" (got '')""",
        ),
        (
            "data.caption_extension='captions/.txt'",
            "data.caption_extension: expected an extension such as "
            """".txt" or ".caption" (got 'captions/.txt')""",
        ),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(UserError) as info:
        load_config(DEMO_CONFIG, [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_a_caption_extension_without_its_dot_gets_one():
    assert load_config(DEMO_CONFIG, ["data.caption_extension=txt"]).data.caption_extension == ".txt"
    assert load_config(DEMO_CONFIG, ["data.caption_extension=.caption"]).data.caption_extension == (
        ".caption"
    )


def test_missing_required_key_and_bad_toml(tmp_path):
    with pytest.raises(UserError, match=r"data: required key is missing"):
        load_config(write(tmp_path, 'name = "x"\nmodel = "tiny:sd15"\n'))
    with pytest.raises(UserError, match=r"c.toml: not valid TOML"):
        load_config(write(tmp_path, "name = \n"))
    with pytest.raises(UserError, match=r"nope.toml: config file not found"):
        load_config(tmp_path / "nope.toml")


def test_set_without_equals_is_an_error():
    with pytest.raises(UserError, match=r"--set 'train.max_steps': expected key=value"):
        load_config(DEMO_CONFIG, ["train.max_steps"])


def test_prompts_and_prompts_file_together_are_refused():
    with pytest.raises(UserError, match="sample.prompts or sample.prompts_file, not both"):
        load_config(DEMO_CONFIG, ['sample.prompts=["a"]'])


def test_an_empty_prompts_file_takes_the_configs_prompts_away():
    cfg = load_config(DEMO_CONFIG, ["sample.prompts_file=''", 'sample.prompts=["a"]'])
    assert cfg.sample.prompts_file is None and cfg.sample.prompts == ["a"]


def test_empty_values_take_the_configs_timestep_range_and_loraplus_away():
    demo = load_config(DEMO_CONFIG).train
    assert (demo.max_timestep, demo.loraplus_lr_ratio) == (700, 4.0)
    plain = load_config(DEMO_CONFIG, ["train.max_timestep=''", "train.loraplus_lr_ratio=''"]).train
    assert (plain.max_timestep, plain.loraplus_lr_ratio) == (None, None)


def test_validation_dir_and_split_together_are_refused():
    with pytest.raises(UserError, match="validation.dir or validation.split, not both"):
        load_config(DEMO_CONFIG, ["validation.split=0.2", "validation.dir='held-out'"])


def test_an_empty_timestep_range_is_one_line_naming_both_keys():
    with pytest.raises(UserError) as info:
        load_config(DEMO_CONFIG, ["train.min_timestep=500", "train.max_timestep=100"])
    assert "train.max_timestep 100 must be above train.min_timestep 500" in str(info.value)
    assert "\n" not in str(info.value)
