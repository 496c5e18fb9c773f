"""An adapter made for one family is refused by another, with a message naming both."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from stylelora.adapters.inject import inject_adapters
from stylelora.config import AdapterConfig
from stylelora.errors import UserError
from stylelora.export.lora_file import save_lora_file
from stylelora.families import load_family
from stylelora.sample.adapter import apply_adapter


def exported(tiny: str, folder, metadata: bool = True):
    family = load_family(f"tiny:{tiny}")
    adapted = inject_adapters(family, AdapterConfig(rank=2, text_encoder=True))
    path = save_lora_file(folder / f"{tiny}.safetensors", family, adapted, {})
    if not metadata:
        save_file(load_file(path), path)
    return path


@pytest.mark.parametrize(
    ("made_for", "model", "fragments"),
    [
        ("sdxl", "sd15", ["trained for sdxl_base_v1-0", "model is sd15 (sd_v1)"]),
        ("sd15", "sdxl", ["trained for sd_v1", "model is sdxl (sdxl_base_v1-0)"]),
        ("sd2", "sd15", ["trained for sd_v2_v", "model is sd15 (sd_v1)"]),
    ],
)
def test_adapter_of_another_family_is_refused(tmp_path, made_for, model, fragments):
    path = exported(made_for, tmp_path)
    with pytest.raises(UserError) as error:
        apply_adapter(load_family(f"tiny:{model}"), path, 1.0)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert all(fragment in message for fragment in fragments)


@pytest.mark.parametrize(
    ("made_for", "model", "fragments"),
    [
        ("sdxl", "sd15", ["lora_te1_/lora_te2_ keys (a sdxl adapter)", "model is sd15"]),
        ("sd15", "sdxl", ["lora_te_ keys (a sd15 or sd2 adapter)", "model is sdxl"]),
    ],
)
def test_file_without_metadata_is_told_apart_by_its_key_prefixes(
    tmp_path, made_for, model, fragments
):
    path = exported(made_for, tmp_path, metadata=False)
    with pytest.raises(UserError) as error:
        apply_adapter(load_family(f"tiny:{model}"), path, 1.0)
    assert all(fragment in str(error.value) for fragment in fragments)


def test_adapter_of_the_same_family_loads(tmp_path):
    path = exported("sdxl", tmp_path, metadata=False)
    apply_adapter(load_family("tiny:sdxl"), path, 0.5)
