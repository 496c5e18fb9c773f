"""Training on the demo data: it learns, and it repeats exactly."""

import pytest
import torch
from conftest import training_config
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from stylelora.data.dataset import DataOptions, ImageCaptionDataset
from stylelora.data.scan import scan_folder
from stylelora.families import detect_family
from stylelora.families.tiny import tiny_model_path
from stylelora.train.trainer import train
from stylelora.train.validation import fixed_set, validation_loss


def held_out_loss(model_dir, data_dir, adapter=None) -> float:
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter))
    family = detect_family(pipe)
    objective = family.training_objective()
    records = scan_folder(data_dir).records
    dataset = ImageCaptionDataset(records, DataOptions(resolution=64, trigger_word="zqxstyle"))
    items = [dataset[(i, 0)] for i in range(len(dataset))] * 4  # 4 noise draws per image
    fixed = fixed_set(family, objective, items, seed=1234, batch_size=8)
    return validation_loss(family, family.unet, objective, fixed)


def test_training_lowers_the_loss_on_held_out_images(tiny_sd15_dir, demo_subset, tmp_path):
    train_dir, held_out_dir = demo_subset(18), demo_subset(6, start=18)
    cfg = training_config(
        tmp_path,
        tiny_sd15_dir,
        train_dir,
        "train.max_steps=80",
        "train.learning_rate=3e-3",
        "sample.every_n_steps=0",
    )
    result = train(cfg)

    before = held_out_loss(tiny_sd15_dir, held_out_dir)
    after = held_out_loss(tiny_sd15_dir, held_out_dir, result.adapter_path)
    print(f"held-out loss: untrained {before:.4f}, trained {after:.4f}")
    assert after < before * 0.95


def test_same_seed_gives_identical_adapter_tensors(tiny_sd15_dir, demo_subset, tmp_path):
    data = demo_subset(8)
    files = []
    for run in ("a", "b"):
        cfg = training_config(
            tmp_path / run,
            tiny_sd15_dir,
            data,
            "train.max_steps=6",
            "adapter.text_encoder=true",
            "data.flip=true",
            "data.center_crop=false",
        )
        files.append(load_file(train(cfg).adapter_path))
    first, second = files
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # And the run did move away from the zero-initialised up weights.
    assert any(k.endswith("lora_up.weight") and first[k].abs().max() > 0 for k in first)


def test_another_seed_gives_another_adapter(tiny_sd15_dir, demo_subset, tmp_path):
    data = demo_subset(8)
    tensors = []
    for seed in (1, 2):
        cfg = training_config(
            tmp_path / str(seed),
            tiny_sd15_dir,
            data,
            "train.max_steps=3",
            f"seed={seed}",
        )
        tensors.append(load_file(train(cfg).adapter_path))
    key = next(k for k in tensors[0] if k.endswith("lora_down.weight"))
    assert not torch.equal(tensors[0][key], tensors[1][key])


@pytest.mark.parametrize("tiny", ["sd2", "sdxl"])
def test_each_family_trains_alike_from_pixels_and_from_caches(tiny, demo_subset, tmp_path):
    """Cached latents and captions change nothing but the speed: SDXL's size conditioning
    comes from each image's bucket, which a cached item carries as a pixel item does. The
    adapter then loads into the family's own diffusers pipeline."""
    data, model = demo_subset(4), tiny_model_path(tiny)
    adapters = []
    for cached in ("false", "true"):
        cfg = training_config(
            tmp_path / cached,
            model,
            data,
            f"data.cache_latents={cached}",
            f"data.cache_text_encoder_outputs={cached}",
            f"data.cache_dir={str(tmp_path / 'cache')!r}",
            "train.max_steps=3",
            "train.learning_rate=3e-3",
            "sample.every_n_steps=0",
        )
        adapters.append(train(cfg).adapter_path)
    from_pixels, from_caches = (load_file(path) for path in adapters)
    assert from_pixels.keys() == from_caches.keys()
    assert max((from_pixels[k] - from_caches[k]).abs().max() for k in from_pixels) < 1e-5
    assert any(k.endswith("lora_up.weight") and from_caches[k].abs().max() > 0 for k in from_caches)

    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(adapters[1]))
    assert pipe.get_active_adapters()
