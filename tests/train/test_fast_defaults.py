"""Fast by default: caches on where they cannot change a step, data kept in memory within a
budget, and one read of the device per step, for the guard and the progress bar together."""

from __future__ import annotations

import pytest
import torch
from conftest import demo_config, training_config
from PIL import Image
from safetensors import safe_open

from stylelora.data.dataset import ImageCaptionDataset
from stylelora.data.report import data_options
from stylelora.data.scan import scan_folder
from stylelora.families import load_family
from stylelora.train.cache import cache_latents, cache_plan
from stylelora.train.profile import StepProfile
from stylelora.train.run import keep_data_in_memory, loader_workers
from stylelora.train.trainer import train


def plan(tmp_path, *overrides):
    return cache_plan(demo_config(tmp_path, f"data.dir={str(tmp_path)!r}", *overrides))


def test_auto_caches_turn_on_only_where_a_step_would_draw_the_same(tmp_path):
    default = plan(tmp_path)
    assert default.latents and default.text and not default.notes
    cropped = plan(tmp_path, "data.center_crop=false")
    assert not cropped.latents and cropped.text
    assert cropped.notes == (
        "latents cache off: data.center_crop = false crops anew at every draw",
    )
    trained = plan(tmp_path, "adapter.text_encoder=true")
    assert trained.latents and not trained.text
    assert "adapter.text_encoder trains the text encoder" in trained.notes[0]
    for randomness in ("data.shuffle_caption=true", "data.caption_dropout_rate=0.1"):
        assert not plan(tmp_path, randomness).text
    off = plan(tmp_path, "data.cache_latents=false", "data.cache_text_encoder_outputs=false")
    assert not off.latents and not off.text and len(off.notes) == 2
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    unwritable = plan(tmp_path, f"data.cache_dir={str(blocked / 'cache')!r}")
    assert not unwritable.latents
    assert unwritable.notes == (f"latents cache off: {blocked / 'cache'} is not writable; set "
                                "data.cache_dir",)  # fmt: skip


def test_the_default_caches_train_the_uncached_adapter_bitwise(
    tiny_sd15_dir, demo_subset, tmp_path, capsys
):
    """The cached latents are drawn in the layout the VAE gives (channels-last on the CPU), so
    the denoiser sums in the same order: not merely close, equal."""
    data = demo_subset(4)
    short = ("train.max_steps=3", "train.batch_size=2")
    cached = train(training_config(tmp_path / "a", tiny_sd15_dir, data, *short))
    out = capsys.readouterr().out
    assert "latents cache" in out and "4 encoded" in out and "text cache: 4 distinct" in out
    uncached = train(
        training_config(
            tmp_path / "b",
            tiny_sd15_dir,
            data,
            *short,
            "data.cache_latents=false",
            "data.cache_text_encoder_outputs=false",
        )
    )
    with safe_open(cached.adapter_path, "pt") as a, safe_open(uncached.adapter_path, "pt") as b:
        assert a.metadata()["ss_cache_latents"] == "True"
        assert b.metadata()["ss_cache_latents"] == "False"
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():  # noqa: SIM118
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def wide_images(folder, count=3):
    """Images wider than their bucket, so a random crop has somewhere to go."""
    folder.mkdir()
    for i in range(count):
        pixels = torch.randint(0, 256, (64, 96, 3), generator=torch.Generator().manual_seed(i))
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"zqxstyle, picture {i}")
    return folder


def dataset(tmp_path, folder, *overrides):
    cfg = demo_config(tmp_path, f"data.dir={str(folder)!r}", "data.enable_buckets=false",
                      *overrides)  # fmt: skip
    return ImageCaptionDataset(scan_folder(folder).records, data_options(cfg.data, cfg.seed))


def test_decoded_images_are_kept_in_memory_within_the_budget(tmp_path):
    folder = wide_images(tmp_path / "data")
    random_crops = ("data.center_crop=false", "data.flip=true")
    from_disk = dataset(tmp_path, folder, *random_crops)
    expected = [from_disk[(index, 1)]["pixel_values"] for index in range(3)]

    lines = []
    over_budget = dataset(tmp_path, folder, *random_crops)
    keep_data_in_memory(over_budget, 0, lines.append)
    assert over_budget.memory is None
    assert lines == ["decoded images read at every draw: 0.1 MB > data.memory_cache_mb 0"]

    kept = dataset(tmp_path, folder, *random_crops)
    keep_data_in_memory(kept, 1, lines.append)
    assert kept.scaled_bytes() == 3 * 96 * 64 * 3  # covering 64x64: the images' own size
    for index in range(3):
        kept[(index, 0)]  # the first epoch decodes each image once
    for path in folder.glob("*.png"):
        path.unlink()
    for index in range(3):  # another epoch: another crop, from memory
        assert torch.equal(kept[(index, 1)]["pixel_values"], expected[index])
    with pytest.raises(FileNotFoundError):
        over_budget[(0, 1)]


def test_cached_latents_are_kept_in_memory_within_the_budget(tiny_sd15_dir, tmp_path):
    folder = wide_images(tmp_path / "data")
    family = load_family(str(tiny_sd15_dir))
    data = dataset(tmp_path, folder)
    cache_latents(family, data, tmp_path / "cache", 2, show_progress=False)
    first = [data[(index, 0)]["latent_mean"] for index in range(3)]  # read from disk
    keep_data_in_memory(data, 1, print)
    [data[(index, 0)] for index in range(3)]
    for path in (tmp_path / "cache").iterdir():
        path.unlink()
    assert all(torch.equal(data[(i, 1)]["latent_mean"], first[i]) for i in range(3))


def test_loader_workers_load_during_the_step_only_where_that_helps(tmp_path):
    data = dataset(tmp_path, wide_images(tmp_path / "data"))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loader_workers("auto", cpu, data) == 0  # the step keeps every core busy
    assert 1 <= loader_workers("auto", cuda, data) <= 4
    assert loader_workers(3, cpu, data) == 3


def test_a_step_reads_the_device_once_for_the_guard_and_the_progress_bar(
    tiny_sd15_dir, demo_subset, tmp_path
):
    """On a GPU every read of a device value waits for the queued kernels. Counted with a
    torch dispatch mode: `.item()` and `bool(tensor)` anywhere in the step's phases."""
    cfg = training_config(tmp_path, tiny_sd15_dir, demo_subset(4), "train.max_steps=6",
                          "train.batch_size=2", "train.ema_decay=0.9")  # fmt: skip
    profile = StepProfile(warmup=2, count_syncs=True)
    train(cfg, profile=profile)
    syncs = profile.syncs_per_step()
    assert profile.steps == 4
    assert syncs.pop("trainer reads")["reads"] == 1
    # AdamW's step counters and a cache entry's sizes are CPU tensors on any machine
    on_the_host = {"optimizer", "data", "other"}
    assert {name for name, counts in syncs.items() if counts["reads"]} <= on_the_host
    timed = profile.per_step()
    for name in ("denoiser forward", "backward", "clip", "guard", "optimizer", "ema", "data"):
        assert timed[name] > 0, name
