"""SD1.x, SD2.x and SDXL train exactly as they did: the same seed gives the same adapter tensors,
bitwise, as the reference hashes recorded in `data/reference_adapters.json`.

The runs cover each family's objective (epsilon, v-prediction, SDXL's extra conditioning) and the
options that change noising, timesteps and loss weighting. A change that moves any of them shows
here as the names of the tensors that differ. To record new references after a deliberate change
of training (say why in the commit):  python tests/families/test_reference_adapters.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "data" / "reference_adapters.json"
SHORT = ("train.max_steps=3", "train.batch_size=2", "train.checkpoint_every_n_steps=0",
         "train.log_with='none'", "sample.every_n_steps=0")  # fmt: skip

# name: (tiny family, overrides)
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "sd15 epsilon, text encoder, min-SNR, noise offset": (
        "sd15",
        (
            "adapter.unet_targets='attn-mlp'",
            "adapter.text_encoder=true",
            "train.min_snr_gamma=5.0",
            "train.noise_offset=0.05",
        ),
    ),
    "sd15 multires noise, timestep range, huber": (
        "sd15",
        (
            "train.multires_noise_iterations=4",
            "train.min_timestep=100",
            "train.max_timestep=900",
            "train.loss_type='huber'",
        ),
    ),
    "sd15 accumulation, EMA, LoRA+": (
        "sd15",
        (
            "train.gradient_accumulation_steps=2",
            "train.ema_decay=0.9",
            "train.ema_export='instead'",
            "train.loraplus_lr_ratio=4.0",
        ),
    ),
    "sd2 v-prediction, zero terminal SNR, LoCon, min-SNR": (
        "sd2",
        (
            "adapter.unet_targets='full'",
            "adapter.conv_rank=2",
            "train.min_snr_gamma=5.0",
            "train.zero_terminal_snr=true",
        ),
    ),
    "sdxl, both text encoders": (
        "sdxl",
        ("adapter.text_encoder=true", "adapter.unet_targets='attn-mlp'"),
    ),
}


def tensor_hashes(path: Path) -> dict[str, str]:
    """Each tensor of a safetensors file: sha256 of its dtype, shape and bytes (16 hex digits)."""
    from safetensors.torch import load_file

    out = {}
    for name, tensor in sorted(load_file(path).items()):
        digest = hashlib.sha256(f"{tensor.dtype} {tuple(tensor.shape)} ".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        out[name] = digest.hexdigest()[:16]
    return out


def train_case(name: str, workdir: Path, data: Path) -> dict[str, str]:
    """Train one case in this process (one torch thread: the same sums on any machine)."""
    from conftest import training_config

    from stylelora.families.tiny import tiny_model_path
    from stylelora.train.trainer import train

    family, overrides = CASES[name]
    cfg = training_config(workdir, tiny_model_path(family), data, *SHORT, *overrides)
    cfg.sample.prompts = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(cfg)
    finally:
        torch.set_num_threads(threads)
    return tensor_hashes(result.adapter_path)


def demo_images(folder: Path, count: int = 4) -> Path:
    from conftest import DEMO_DATA

    folder.mkdir()
    for image in sorted(DEMO_DATA.glob("*.png"))[:count]:
        shutil.copy(image, folder)
        shutil.copy(image.with_suffix(".txt"), folder)
    return folder


@pytest.mark.parametrize("name", list(CASES))
def test_same_seed_gives_the_reference_adapter_bitwise(name, tmp_path):
    expected = json.loads(REFERENCE.read_text())[name]
    got = train_case(name, tmp_path, demo_images(tmp_path / "data"))
    assert sorted(got) == sorted(expected), "the adapter's tensor names changed"
    moved = [key for key in expected if got[key] != expected[key]]
    assert not moved, f"{len(moved)} of {len(expected)} tensors differ, e.g. {moved[:3]}"


def write_references() -> None:
    """Train every case and record its hashes (run as a script, deliberately)."""
    os.environ.setdefault("STYLELORA_CACHE", tempfile.mkdtemp(prefix="stylelora-ref-cache-"))
    references = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = demo_images(Path(tmp) / "data")
        for index, name in enumerate(CASES):
            references[name] = train_case(name, Path(tmp) / f"run-{index}", data)
    REFERENCE.write_text(json.dumps(references, indent=1, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE} ({sum(map(len, references.values()))} tensors)")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))  # conftest, as pytest puts it there
    write_references()
