"""Which captioner a `--model` names, where its files are, and the device it runs on.

A model is a local folder or a hub id already in the local Hugging Face cache: captioning never
downloads. The folder's files say which kind of captioner it is: a WD tagger ships
`selected_tags.csv` beside `model.onnx`; a vision-language model has a transformers
`config.json` whose `model_type` is one of `VLM_NAMES`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from stylelora.errors import UserError

if TYPE_CHECKING:
    import torch

# The vision-language models' transformers `model_type`s, with the names users know them by
VLM_NAMES = {
    "florence2": "Florence-2",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "llava": "JoyCaption (LLaVA)",
}
TAGGER = "wd-tagger"


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

    style: str = ""  # "natural" sentences, "tags", or "": what the model writes
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
    dtype: torch.dtype | Any

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"


def caption_device() -> Device:
    import torch  # here: the taggers run without it

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
        raise UserError(f"{model} is a file; give the model's folder")
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(
            f"{model} is no folder and no hub id (OWNER/NAME); "
            "give the folder that holds the model's files"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # the hub raises several types for "not cached"; each means the same here
        raise UserError(
            f"{model} is not in the local cache; download it with "
            f"`hf download {model}` on a machine with network (and copy the cache folder "
            "~/.cache/huggingface/hub over), or give a folder"
        ) from None


def model_type(folder: Path) -> str:
    """The kind of captioner in `folder`: TAGGER or a transformers `model_type`."""
    if (folder / "selected_tags.csv").is_file():
        return TAGGER
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(
            f"{folder} holds neither a transformers config.json nor a WD "
            "tagger's selected_tags.csv; give a supported captioner's folder"
        )
    try:
        kind = json.loads(config.read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{config} is no JSON object; download it again") from None
    return str(kind)


def find_captioner(model: str) -> tuple[Path, str]:
    """(`model`'s folder, its kind: TAGGER or a `VLM_NAMES` key), or a UserError that says
    what is supported. Quick: reads no weights."""
    folder = local_model_folder(model)
    kind = model_type(folder)
    if kind != TAGGER and kind not in VLM_NAMES:
        supported = ", ".join(VLM_NAMES.values()) + ", WD v3 taggers"
        raise UserError(
            f"{model} is a {kind or 'model without model_type'}; supported captioners: {supported}"
        )
    return folder, kind


def load_captioner(model: str, options: CaptionOptions, device: Device | None = None) -> Captioner:
    """The captioner `model` names, loaded on `device` (by default the best one here)."""
    folder, kind = find_captioner(model)
    device = device or caption_device()
    if kind == TAGGER:
        from stylelora.caption.tagger import load_tagger

        return load_tagger(folder, model, options, device)
    from transformers.utils import logging as transformers_logging

    from stylelora.caption.vlm import load_vlm  # transformers: imported for the VLMs only

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    return load_vlm(folder, model, kind, options, device)


def cached_captioners() -> list[dict[str, str]]:
    """The supported captioners in the local Hugging Face cache: [{"model", "kind"}]."""
    from huggingface_hub import scan_cache_dir

    try:
        repos = scan_cache_dir().repos
    except Exception:  # no cache yet, or one that cannot be read: nothing cached to offer
        return []
    found = []
    for repo in sorted(repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        newest = max(repo.revisions, key=lambda revision: revision.last_modified)
        try:
            kind = model_type(Path(newest.snapshot_path))
        except UserError:
            continue
        name = "WD v3 tagger" if kind == TAGGER else VLM_NAMES.get(kind)
        if name:
            found.append({"model": repo.repo_id, "kind": name})
    return found
