"""The latents cache: reused across runs, rebuilt for exactly what changed; the text cache."""

import shutil

import pytest
import torch
from conftest import demo_config, training_config
from diffusers import AutoencoderKL, DiffusionPipeline
from PIL import Image

from stylelora.data.dataset import ImageCaptionDataset, collate, derived_generator
from stylelora.data.report import data_options
from stylelora.data.scan import scan_folder
from stylelora.errors import UserError
from stylelora.families import detect_family
from stylelora.train.cache import TextCache, cache_latents
from stylelora.train.loss import batch_latents
from stylelora.train.trainer import train


@pytest.fixture()
def encode_calls(monkeypatch):
    """Count calls of the real AutoencoderKL.encode (the method still runs)."""
    calls = []
    real = AutoencoderKL.encode

    def counted(self, x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counted)
    return calls


@pytest.fixture(scope="module")
def family(tiny_sd15_dir):
    return detect_family(DiffusionPipeline.from_pretrained(tiny_sd15_dir))


def dataset_for(tmp_path, data, *overrides):
    cfg = demo_config(tmp_path, f"data.dir={str(data)!r}", *overrides)
    return ImageCaptionDataset(scan_folder(data).records, data_options(cfg.data, cfg.seed))


def test_second_pass_encodes_nothing_and_changes_re_encode_only_them(
    family, demo_subset, tmp_path, encode_calls
):
    data, cache = demo_subset(5), tmp_path / "cache"
    first = cache_latents(family, dataset_for(tmp_path, data, "data.flip=true"), cache, 4, False)
    assert (first.encoded, first.reused) == (10, 0)  # 5 images, flipped and not
    assert sum(encode_calls) == 10 and max(encode_calls) <= 4  # batched
    encode_calls.clear()
    again = cache_latents(family, dataset_for(tmp_path, data, "data.flip=true"), cache, 4, False)
    assert (again.encoded, again.reused) == (0, 10) and encode_calls == []

    changed = sorted(data.glob("*.png"))[2]
    Image.open(changed).rotate(90).save(changed)
    after_edit = cache_latents(family, dataset_for(tmp_path, data), cache, 4, False)
    assert (after_edit.encoded, after_edit.reused) == (1, 4) and sum(encode_calls) == 1
    encode_calls.clear()
    bigger = dataset_for(tmp_path, data, "data.resolution=128")
    resized = cache_latents(family, bigger, cache, 4, False)
    assert (resized.encoded, resized.reused) == (5, 0) and sum(encode_calls) == 5
    assert bigger.cache[(0, False)]["latent_mean"].shape[-2:] == (16, 16)


def test_cached_latents_draw_what_encoding_draws(family, demo_subset, tmp_path):
    data = demo_subset(3)
    plain = dataset_for(tmp_path, data)
    cached = dataset_for(tmp_path, data)
    cache_latents(family, cached, tmp_path / "cache", 4, False)
    keys = [(i, 0) for i in range(3)]
    from_pixels = batch_latents(family, collate([plain[k] for k in keys]), derived_generator(9))
    from_cache = batch_latents(family, collate([cached[k] for k in keys]), derived_generator(9))
    assert "pixel_values" not in cached[keys[0]]
    torch.testing.assert_close(from_cache, from_pixels, atol=1e-5, rtol=1e-4)


def test_entries_are_read_from_disk_when_asked_for(family, demo_subset, tmp_path):
    """Nothing is held in memory: an entry removed after caching is missed, by name."""
    data = demo_subset(2)
    dataset = dataset_for(tmp_path, data)
    cache_latents(family, dataset, tmp_path / "cache", 4, False)
    assert dataset[(1, 0)]["latent_mean"].shape == (4, 8, 8)
    gone = dataset.cache.files[(0, False)]
    gone.unlink()
    with pytest.raises(UserError, match="latents cache entry unreadable.*delete the cache folder"):
        dataset[(0, 0)]
    assert str(gone) in str(pytest.raises(UserError, dataset.__getitem__, (0, 0)).value)


def test_text_cache_matches_encoding(family):
    cache = TextCache(family, ["a, b", "c", "a, b"])
    assert len(cache.outputs) == 2
    with torch.no_grad():
        direct = family.encode_prompts(["c", "a, b"])["encoder_hidden_states"]
    cached = cache.encode(["c", "a, b"])["encoder_hidden_states"]
    torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-4)


def test_training_with_caches_reuses_them_on_the_second_run(
    tiny_sd15_dir, demo_subset, tmp_path, encode_calls, capsys
):
    data = demo_subset(4)
    losses = []
    for run in ("a", "b"):
        cfg = training_config(
            tmp_path / run,
            tiny_sd15_dir,
            data,
            "train.max_steps=2",
            "data.cache_latents=true",
            "data.cache_text_encoder_outputs=true",
        )
        losses.append(train(cfg).losses)
        if run == "a":
            assert sum(encode_calls) == 4
    assert sum(encode_calls) == 4  # the second run encoded nothing
    assert losses[0] == losses[1]
    out = capsys.readouterr().out
    assert "4 encoded, 0 reused" in out and "0 encoded, 4 reused" in out
    assert "text cache: 4 distinct captions" in out
    assert (data / ".stylelora-cache").is_dir()
    shutil.rmtree(data / ".stylelora-cache")


def test_text_cache_is_off_with_caption_randomness(tiny_sd15_dir, demo_subset, tmp_path, capsys):
    cfg = training_config(
        tmp_path,
        tiny_sd15_dir,
        demo_subset(2),
        "train.max_steps=1",
        "data.cache_text_encoder_outputs=true",
        "data.shuffle_caption=true",
    )
    train(cfg)
    assert "text cache off: caption shuffling or dropout" in capsys.readouterr().out
