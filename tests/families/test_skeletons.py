"""The packaged diffusers skeletons: real-model configs, the CLIP tokenizer, offline loading.

Models are built on the meta device, so the full-size parameter counts are checked without
allocating any weights; nothing here touches the network.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import socket
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from stylelora.families import build_clip_tokenizer as build_tokenizer
from stylelora.families import skeletons
from stylelora.families.skeletons import skeleton_dir

# Parameter counts of the released models (diffusers / transformers classes).
UNET_PARAMS = {"sd15": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}
VAE_PARAMS = 83_653_863
CLIP_L_TEXT = 123_060_480  # openai/clip-vit-large-patch14 text model (SD1.x, SDXL text_encoder)
OPENCLIP_H_TEXT = 340_387_840  # SD2.x text_encoder (23 of OpenCLIP ViT-H's 24 layers)
OPENCLIP_BIGG_TEXT_PROJ = 694_659_840  # SDXL text_encoder_2, with its projection
TEXT_ENCODERS = {
    "sd15": {"text_encoder": (CLIPTextModel, CLIP_L_TEXT)},
    "sd2": {"text_encoder": (CLIPTextModel, OPENCLIP_H_TEXT)},
    "sdxl": {
        "text_encoder": (CLIPTextModel, CLIP_L_TEXT),
        "text_encoder_2": (CLIPTextModelWithProjection, OPENCLIP_BIGG_TEXT_PROJ),
    },
}
# The ids every SD CLIP tokenizer gives "a photo of a cat" (start, a, photo, of, a, cat, end).
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
PAD_TOKENS = {
    ("sd15", "tokenizer"): ("<|endoftext|>", 49407),
    ("sd2", "tokenizer"): ("!", 0),
    ("sdxl", "tokenizer"): ("<|endoftext|>", 49407),
    ("sdxl", "tokenizer_2"): ("!", 0),
    ("flux", "tokenizer"): ("<|endoftext|>", 49407),
}
EXPECTED = {
    # name: (pipeline class, scheduler class, prediction type, unet sample size, VAE scaling)
    "sd15": ("StableDiffusionPipeline", "PNDMScheduler", "epsilon", 64, 0.18215),
    "sd2": ("StableDiffusionPipeline", "DDIMScheduler", "v_prediction", 96, 0.18215),
    "sdxl": ("StableDiffusionXLPipeline", "EulerDiscreteScheduler", "epsilon", 128, 0.13025),
}
# The UNet families' skeletons; Flux's (a transformer, T5) is checked in test_flux_files.py.
UNET_SKELETONS = sorted(EXPECTED)
# SHA-256 of stabilityai/stable-diffusion-xl-base-1.0's own files (from Git LFS pointers of a
# mirror of that repo): these skeleton files are byte-identical to them.
SDXL_UPSTREAM_SHA256 = {
    "model_index.json": "a40ca00944bb33ea9281580f50d009d1e23a434173c0e4e234bb90bd75178874",
    "unet/config.json": "30ebc70750223e59006f7f2b4e1e6c102570aa19a9c4ae3e1fbe7591332dbae6",
    "text_encoder/config.json": "39b8b2e4b1949e36969caa425b6c81c68bace99198dd9078ce05d16ad401fe7f",
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("skeleton-cache")


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode, and any socket connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", UNET_SKELETONS)
def test_unet_and_vae_have_the_real_sizes(name: str, cache: Path) -> None:
    folder = skeleton_dir(name, cache)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    assert next(unet.parameters()).is_meta
    assert count(unet) == UNET_PARAMS[name]
    assert count(vae) == VAE_PARAMS
    # SD1/SD2 VAE configs leave scaling_factor to AutoencoderKL's default (0.18215).
    assert vae.config.scaling_factor == EXPECTED[name][4]


@pytest.mark.parametrize("name", UNET_SKELETONS)
def test_text_encoders_have_the_real_sizes(name: str, cache: Path) -> None:
    folder = skeleton_dir(name, cache)
    for sub, (cls, expected) in TEXT_ENCODERS[name].items():
        config = CLIPTextConfig.from_pretrained(folder / sub, local_files_only=True)
        with torch.device("meta"):
            model = cls(config)
        assert next(model.parameters()).is_meta
        assert count(model) == expected, sub


@pytest.mark.parametrize(("name", "sub"), sorted(PAD_TOKENS))
def test_tokenizers_give_the_sd_ids(name: str, sub: str, cache: Path, no_network) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(
        skeleton_dir(name, cache) / sub, local_files_only=True
    )
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
    astronaut = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
    assert tokenizer("a photo of an astronaut riding a horse on mars").input_ids == astronaut
    pad, pad_id = PAD_TOKENS[(name, sub)]
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == (pad, pad_id)
    padded = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert padded[:4] == [49406, 320, 2368, 49407]
    assert padded[4:] == [pad_id] * 73


@pytest.mark.parametrize("name", UNET_SKELETONS)
def test_pipeline_and_component_configs_load_offline(name: str, cache: Path, no_network) -> None:
    folder = skeleton_dir(name, cache)
    pipeline_cls, scheduler_cls, prediction, sample_size, _ = EXPECTED[name]
    index = DiffusionPipeline.load_config(folder, local_files_only=True)
    assert index["_class_name"] == pipeline_cls
    components = {k: v for k, v in index.items() if isinstance(v, list) and v[0] is not None}
    for sub, (library, class_name) in components.items():
        cls = getattr(importlib.import_module(library), class_name)
        if library == "diffusers":
            config = cls.load_config(folder, subfolder=sub, local_files_only=True)
            assert config["_class_name"] == class_name
        elif "Tokenizer" in class_name:
            assert cls.from_pretrained(folder, subfolder=sub, local_files_only=True) is not None
        else:
            config = cls.config_class.from_pretrained(folder, subfolder=sub, local_files_only=True)
            assert config.architectures == [class_name]
    # No safety checker or feature extractor: nothing else to fetch.
    assert index.get("safety_checker", [None])[0] is None
    assert index.get("feature_extractor", [None])[0] is None
    scheduler_class = getattr(importlib.import_module("diffusers"), scheduler_cls)
    scheduler = scheduler_class.from_pretrained(
        folder, subfolder="scheduler", local_files_only=True
    )
    assert scheduler.config.prediction_type == prediction
    assert UNet2DConditionModel.load_config(folder / "unet")["sample_size"] == sample_size


def test_every_skeleton_is_checked() -> None:
    assert set(skeletons.SKELETONS) == {*UNET_SKELETONS, "flux", "flux2", "zimage", "qwen_image"}


def test_family_details() -> None:
    """Values a wrong guess would get past the parameter counts."""

    def config(name: str, rel: str) -> dict:
        return json.loads((skeletons.source_dir(name) / rel).read_text())

    sd21 = config("sd2", "unet/config.json")
    assert sd21["upcast_attention"] is True and sd21["use_linear_projection"] is True
    assert config("sd15", "unet/config.json").get("use_linear_projection", False) is False
    sdxl_vae = config("sdxl", "vae/config.json")
    assert sdxl_vae["scaling_factor"] == 0.13025 and sdxl_vae["force_upcast"] is True
    assert config("sdxl", "unet/config.json")["transformer_layers_per_block"] == [1, 2, 10]
    sdxl = skeletons.source_dir("sdxl")
    for rel, digest in SDXL_UPSTREAM_SHA256.items():
        assert hashlib.sha256((sdxl / rel).read_bytes()).hexdigest() == digest, rel


def test_packaged_vocab_matches_packaged_merges() -> None:
    """vocab.json is exactly what OpenAI's recipe derives from merges.txt."""
    source = skeletons.TOKENIZER_SOURCE
    merges_text = gzip.decompress((source / "merges.txt.gz").read_bytes()).decode()
    lines = merges_text.rstrip("\n").split("\n")
    assert lines[0] == build_tokenizer.MERGES_HEADER
    merges = [tuple(line.split(" ")) for line in lines[1:]]
    assert len(merges) == build_tokenizer.NUM_MERGES
    vocab = json.loads(gzip.decompress((source / "vocab.json.gz").read_bytes()))
    assert vocab == build_tokenizer.build_vocab(merges)
    assert vocab["!"] == 0 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_skeleton_dir_is_built_once_and_rebuilt_when_stale(tmp_path: Path) -> None:
    first = skeleton_dir("sd15", tmp_path)
    assert first == tmp_path / "skeletons" / "sd15"
    assert (first / "tokenizer" / "vocab.json").is_file()
    assert (first / "tokenizer" / "merges.txt").is_file()
    marker = first / "unet" / "extra.txt"
    marker.write_text("kept while current")
    assert skeleton_dir("sd15", tmp_path) == first and marker.exists()
    (first / skeletons.STAMP).write_text("from an older stylelora\n")
    assert skeleton_dir("sd15", tmp_path) == first
    assert not marker.exists()
    assert (first / "model_index.json").read_bytes() == (
        skeletons.source_dir("sd15") / "model_index.json"
    ).read_bytes()
    assert [p.name for p in first.parent.iterdir()] == ["sd15"]  # no temporary folders left


def test_skeleton_dir_defaults_to_the_stylelora_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STYLELORA_CACHE", str(tmp_path))
    assert skeleton_dir("sdxl") == tmp_path / "skeletons" / "sdxl"
    assert (tmp_path / "skeletons" / "sdxl" / "tokenizer_2" / "vocab.json").is_file()


def test_unknown_skeleton_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown skeleton"):
        skeleton_dir("sd3", tmp_path)
