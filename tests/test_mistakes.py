"""Mistakes a user makes in a config or on the command line: one line that names the key or
file, found before minutes of work; and values that validate but make no sense get a note."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import DEMO_CONFIG, ROOT, training_config
from packaging.requirements import Requirement
from safetensors import safe_open

from stylelora.cli import main
from stylelora.config import load_config
from stylelora.errors import UserError
from stylelora.families import load_family
from stylelora.sample.prompts import SamplePrompt, parse_prompt_line
from stylelora.train.run import build_run
from stylelora.train.trainer import train
from stylelora.versions import out_of_range, refusal


def test_a_config_path_that_is_a_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"is a folder; give the config's \.toml file"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("item", "key"),
    [
        ("train.learning_rate=inf", "train.learning_rate"),
        ("train.learning_rate=nan", "train.learning_rate"),
        ("adapter.alpha=inf", "adapter.alpha"),
        ("sample.guidance_scale=nan", "sample.guidance_scale"),
    ],
)
def test_non_finite_numbers_are_refused_by_name(item, key):
    with pytest.raises(UserError, match=rf"{key}: Input should be a finite number"):
        load_config(DEMO_CONFIG, [item])


def test_non_finite_guidance_in_a_prompt_or_on_the_command_line(capsys):
    defaults = SamplePrompt(prompt="")
    with pytest.raises(ValueError, match="--l needs a float, got 'inf'"):
        parse_prompt_line("a fish --l inf", defaults)
    assert parse_prompt_line("a fish --l 4.5", defaults).guidance_scale == 4.5
    argv = ["sample", "--model", "tiny:sd15", "--prompt", "a fish", "--out", "x.png"]
    assert main([*argv, "--guidance", "nan"]) == 2
    assert capsys.readouterr().err.strip() == (
        "stylelora: error: --guidance nan: must be a finite number"
    )


def test_clip_skip_beyond_the_text_encoders_layers(tiny_sd15_dir, tmp_path, capsys):
    # kohya's 2 of 2 layers is diffusers' 1
    assert load_family(str(tiny_sd15_dir), settings={"clip_skip": 2}).clip_skip == 1
    with pytest.raises(UserError, match=r"clip_skip = 3: the text encoder has 2 layers"):
        load_family(str(tiny_sd15_dir), settings={"clip_skip": 3})
    argv = ["sample", "--model", str(tiny_sd15_dir), "--prompt", "a", "--out", "x.png"]
    assert main([*argv, "--clip-skip", "12"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stylelora: error: clip_skip = 12: the text encoder has 2 layers, so ")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["train.max_timestep=1500"], "train.max_timestep 1500: the model is trained on 1000"),
        (["train.min_timestep=1000"], "train.min_timestep 1000: must be below 1000"),
    ],
)
def test_a_timestep_range_outside_the_schedule_stops_before_training(
    tiny_sd15_dir, demo_subset, tmp_path, items, message
):
    cfg = training_config(tmp_path, tiny_sd15_dir, demo_subset(2), *items)
    with pytest.raises(UserError, match=message):
        build_run(cfg)


def test_a_rank_above_the_layers_width_gets_a_note(tiny_sd15_dir, demo_subset, tmp_path, capsys):
    data = demo_subset(2)
    build_run(training_config(tmp_path / "a", tiny_sd15_dir, data, "adapter.rank=32"))
    assert "adapter rank" not in capsys.readouterr().out
    build_run(training_config(tmp_path / "b", tiny_sd15_dir, data, "adapter.rank=40"))
    notes = [line for line in capsys.readouterr().out.splitlines() if "adapter rank" in line]
    # cross-attn on the tiny UNet: all but the 64-wide to_q and to_out.0 are 32 wide at most
    assert notes == [
        "note: the adapter rank is above the width of 14 of the 16 adapted layers (the "
        "narrowest is 32); there it adds memory, not capacity: lower adapter.rank"
    ]


EVERY_OPTION = [
    "train.max_steps=2",
    "train.batch_size=2",
    "train.gradient_accumulation_steps=2",
    "train.optimizer='adamw8bit'",
    "train.optimizer_args={ min_8bit_size = 2048 }",
    "train.lr_scheduler='cosine'",
    "train.lr_warmup_steps=1",
    "train.noise_offset=0.05",
    "train.min_snr_gamma=5.0",
    "train.multires_noise_iterations=3",
    "train.multires_noise_discount=0.25",
    "train.loss_type='huber'",
    "train.huber_c=0.2",
    "train.mixed_precision='bf16'",
    "train.gradient_checkpointing=true",
    "train.max_grad_norm=0.5",
    "train.log_with='none'",
    "adapter.text_encoder=true",
    "adapter.dropout=0.1",
    "data.cache_latents=true",
    "data.shuffle_caption=true",
    "data.keep_tokens=1",
    "data.caption_dropout_rate=0.1",
    "data.caption_tag_dropout_rate=0.2",
    "data.flip=true",
    "data.bucket_no_upscale=true",
    "clip_skip=2",
    "seed=7",
]


def test_the_header_says_what_the_run_did(tiny_sd15_dir, demo_subset, tmp_path):
    cfg = training_config(tmp_path, tiny_sd15_dir, demo_subset(4), *EVERY_OPTION)
    cfg.data.cache_dir = tmp_path / "cache"
    result = train(cfg)
    with safe_open(str(result.adapter_path), "pt") as handle:
        header = handle.metadata()
    expected = {
        "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit(min_8bit_size=2048)",
        "ss_noise_offset": "0.05",
        "ss_min_snr_gamma": "5",
        "ss_multires_noise_iterations": "3",
        "ss_multires_noise_discount": "0.25",
        "ss_loss_type": "huber",
        "ss_huber_c": "0.2",
        "ss_mixed_precision": "bf16",
        "ss_gradient_checkpointing": "True",
        "ss_gradient_accumulation_steps": "2",
        "ss_batch_size_per_device": "2",
        "ss_max_grad_norm": "0.5",
        "ss_lr_scheduler": "cosine",
        "ss_lr_warmup_steps": "1",
        "ss_learning_rate": "0.001",
        "ss_text_encoder_lr": "0.001",
        "ss_network_train_unet_only": "False",
        "ss_network_dropout": "0.1",
        "ss_cache_latents": "True",
        "ss_shuffle_caption": "True",
        "ss_keep_tokens": "1",
        "ss_caption_dropout_rate": "0.1",
        "ss_caption_tag_dropout_rate": "0.2",
        "ss_flip_aug": "True",
        "ss_random_crop": "False",
        "ss_enable_bucket": "True",
        "ss_min_bucket_reso": "64",
        "ss_max_bucket_reso": "128",
        "ss_bucket_no_upscale": "True",
        "ss_clip_skip": "2",
        "ss_seed": "7",
        "ss_steps": "2",
        "ss_max_train_steps": "2",
        "ss_resolution": "(64, 64)",
        "ss_num_train_images": "4",
        "ss_network_dim": "8",
        "ss_network_alpha": "4",
    }
    assert {key: header.get(key) for key in expected} == expected
    off = sorted(k for k, v in header.items() if k.startswith("ss_") and v in ("None", ""))
    assert off == [], f"options that are on but read as off: {off}"


def test_versions_outside_the_declared_range_name_the_package_and_the_range():
    declared = [Requirement("transformers>=4.45,<5.24"), Requirement("peft>=0.14")]
    installed = {"transformers": "5.24.0", "peft": "0.21.2"}.__getitem__
    assert out_of_range(declared, installed) == [
        "transformers 5.24.0 is outside the range stylelora supports (transformers<5.24,>=4.45): "
        "pip install 'transformers<5.24,>=4.45', or pip install -c constraints.txt -e . (in a "
        "checkout), the tested versions"
    ]
    assert out_of_range(declared, {"transformers": "5.23.0", "peft": "0.21.2"}.__getitem__) == []


def test_a_library_refusing_anothers_version_is_one_line():
    """transformers' own check, raising as it does when it refuses the installed PEFT."""
    from transformers.utils.peft_utils import check_peft_version

    with pytest.raises(ValueError) as caught:
        check_peft_version(min_version="99.0")
    line = refusal(caught.value)
    assert line is not None and "\n" not in line
    assert line.startswith("transformers ") and " refuses peft " in line
    assert "it needs peft>=99.0" in line
    assert refusal(ValueError("some other problem")) is None


def test_the_benchmark_names_a_missing_optimizer_package_in_one_line():
    """prodigyopt made unimportable the way Python itself does it (a None in sys.modules)."""
    script = (
        "import sys, runpy; sys.modules['prodigyopt'] = None; "
        "sys.argv = ['memory_speed.py', '--set', \"train.optimizer='prodigy'\"]; "
        "runpy.run_path('benchmarks/memory_speed.py', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "memory_speed: error: train.optimizer = 'prodigy' needs the prodigyopt package: "
        "pip install 'stylelora[prodigy]'"
    )


def test_a_prompts_file_that_is_a_folder_is_one_line(tiny_sd15_dir, demo_subset, tmp_path):
    cfg = training_config(tmp_path, tiny_sd15_dir, demo_subset(2))
    cfg.sample.prompts_file = tmp_path
    with pytest.raises(UserError, match=rf"sample.prompts_file {tmp_path}: is a folder"):
        build_run(cfg)


def test_a_model_that_is_neither_a_path_nor_a_hub_id_is_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="no such file or folder, and not a hub id"):
        load_family("not a/valid id!")
    argv = ["sample", "--model", "x//y", "--prompt", "a", "--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "stylelora: error: model 'x//y': no such file or folder, and not a hub id (org/name)"
    )


def test_an_adapter_file_without_tensors_is_named_before_rendering(tmp_path, capsys):
    from safetensors.torch import save_file

    empty = tmp_path / "empty.safetensors"
    save_file({}, empty, metadata={"ss_network_module": "networks.lora"})
    out = tmp_path / "x.png"
    argv = ["sample", "--model", "tiny:sd15", "--prompt", "a", "--out", str(out)]
    assert main([*argv, "--adapter", str(empty), "--compare"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"stylelora: error: {empty}: holds no tensors, so it is no adapter"
    assert not out.exists()


def test_a_missing_validation_folder_is_named_by_its_own_key(tiny_sd15_dir, demo_subset, tmp_path):
    missing = tmp_path / "missing"
    cfg = training_config(tmp_path, tiny_sd15_dir, demo_subset(2), f"validation.dir='{missing}'")
    with pytest.raises(UserError, match=rf"^validation.dir {missing}: folder not found$"):
        build_run(cfg)


def test_a_batch_larger_than_the_dataset_is_cut_to_it_with_a_note(
    tiny_sd15_dir, demo_subset, tmp_path, capsys
):
    data = demo_subset(3)
    cfg = training_config(tmp_path, tiny_sd15_dir, data, "train.batch_size=1000000000")
    assert build_run(cfg).cfg.train.batch_size == 3
    out = capsys.readouterr().out
    assert "train.batch_size 1000000000 is more than the 3 samples" in out
    assert "training with batches of 3" in out and "global batch 3 " in out
    # repeats count: 3 images x 400 hold a batch of 1000
    cfg = training_config(
        tmp_path, tiny_sd15_dir, data, "train.batch_size=1000", "data.repeats=400"
    )
    assert build_run(cfg).cfg.train.batch_size == 1000
    assert "is more than" not in capsys.readouterr().out
