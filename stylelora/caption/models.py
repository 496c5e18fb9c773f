"""Which captioner a `--model` names, where its files are, and the device it runs on.

A model is a local folder or a hub id already in the local Hugging Face cache: captioning never
downloads. The folder's files say which kind of captioner it is: a WD tagger ships
`selected_tags.csv` beside `model.onnx`; a vision-language model has a transformers
`config.json` whose `model_type` is one `vlm.VLM_TYPES` names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from stylelora.errors import UserError


class Captioner(Protocol):
    """What the folder loop needs of a captioner."""

    # e.g. "Florence-2 (florence-community/Florence-2-base)": the record keeps it per file
    description: str
    # the settings that shaped its captions, kept beside `description` in the record
    settings: dict

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, in order, without trigger word, prefix or suffix."""
        ...


@dataclass(frozen=True)
class CaptionOptions:
    """The command's options that a captioner reads."""

    style: str = "natural"  # "natural" sentences or "tags"
    prompt: str | None = None  # the instruction; None: the captioner's default
    max_tokens: int = 256
    batch_size: int = 1
    load_in_4bit: bool = False
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Device:
    """Where and in which precision a captioner runs: CUDA in bf16 (fp16 without bf16
    support), else the CPU in fp32."""

    name: str
    dtype: torch.dtype

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"


def caption_device() -> Device:
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Device("cuda", dtype)
    return Device("cpu", torch.float32)


def local_model_folder(model: str) -> Path:
    """The folder holding `model`'s files: the folder itself, or the cached snapshot of a hub
    id. Never downloads."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"stylelora caption: {model} is a file; give the model's folder")
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(
            f"stylelora caption: {model} is no folder and no hub id (OWNER/NAME); "
            "give the folder that holds the model's files"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # the hub raises several types for "not cached"; each means the same here
        raise UserError(
            f"stylelora caption: {model} is not in the local cache; download it with "
            f"`hf download {model}` on a machine with network (and copy the cache folder "
            "~/.cache/huggingface/hub over), or give a folder"
        ) from None


def model_type(folder: Path) -> str:
    """The kind of captioner in `folder`: "wd-tagger" or a transformers `model_type`."""
    if (folder / "selected_tags.csv").is_file():
        return "wd-tagger"
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(
            f"stylelora caption: {folder} holds neither a transformers config.json nor a WD "
            "tagger's selected_tags.csv; give a supported captioner's folder"
        )
    try:
        kind = json.loads(config.read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, ValueError, AttributeError):
        raise UserError(
            f"stylelora caption: {config} is no JSON object; download it again"
        ) from None
    return str(kind)


def load_captioner(model: str, options: CaptionOptions, device: Device | None = None) -> Captioner:
    """The captioner `model` names, loaded on `device` (by default the best one here)."""
    from stylelora.caption import vlm

    folder = local_model_folder(model)
    kind = model_type(folder)
    device = device or caption_device()
    if kind == "wd-tagger":
        from stylelora.caption import tagger  # onnxruntime's import only where a tagger is used

        return tagger.load_tagger(folder, model, options, device)
    if kind in vlm.VLM_TYPES:
        return vlm.load_vlm(folder, model, kind, options, device)
    supported = ", ".join(sorted(vlm.VLM_TYPES.values())) + ", WD taggers"
    raise UserError(
        f"stylelora caption: {model} is a {kind or 'model without model_type'}; "
        f"supported captioners: {supported}"
    )
