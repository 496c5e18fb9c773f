"""Reading a model from the files users hold (a transformer file, a VAE file, a text-encoder
file, as ComfyUI and the original releases keep them), for the families whose single files hold
the denoiser only. Each family says which parts it has and which classes load them; this reads
the weights, in any dtype the files come in (fp8 and ComfyUI's scaled fp8 included), as the
training dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open

from stylelora.errors import UserError, first_line
from stylelora.families.base import Part

# ComfyUI's whole-model files put the denoiser under this prefix.
COMFY_PREFIX = "model.diffusion_model."
# The levels a text encoder's weights sit under in one layout and not in another: transformers'
# task models (`model.`), its multimodal models (`model.language_model.`), CLIP's `text_model.`.
ENCODER_LEVELS = ("model.language_model.", "language_model.", "model.", "text_model.")


def read_weights(path: Path, dtype: torch.dtype, under: str = "") -> dict[str, torch.Tensor]:
    """The file's tensors in `dtype`, each converted as it is read (an fp8 file is never held
    twice); only those under the prefix `under` (removed) if the file has any. ComfyUI's
    scaled fp8 files keep `<layer>.scale_weight` beside each fp8 weight: the weight is the
    product."""
    out = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            prefix = under if any(n.startswith(under) for n in names) else ""
            for name in sorted(n for n in names if n.startswith(prefix)):
                key = name.removeprefix(prefix)
                if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
                    continue
                value = handle.get_tensor(name)
                scale = name.removesuffix(".weight") + ".scale_weight"
                if name.endswith(".weight") and scale in names:
                    value = value.to(torch.float32) * handle.get_tensor(scale).to(torch.float32)
                out[key] = value.to(dtype) if value.is_floating_point() else value
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: not a readable .safetensors file ({first_line(exc)})") from None
    return out


def tensor_names(path: Path) -> list[str]:
    """The tensor names of a .safetensors file (a damaged one: a UserError)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: not a readable .safetensors file ({first_line(exc)})") from None


def has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.safetensors"))


def bare(name: str) -> str:
    """A text encoder weight's name without the levels only some layouts have."""
    for level in ENCODER_LEVELS:
        if name.startswith(level):
            return bare(name.removeprefix(level))
    return name


def load_text_encoder(
    cls: type, config: Any, path: Path, dtype: torch.dtype, unused: tuple[str, ...] = ()
) -> torch.nn.Module:
    """A transformers text encoder from a file of its weights, whichever of transformers'
    layouts the file has (a task model's `model.` level or not, CLIP's `text_model.`).
    Parameters under the `unused` prefixes (a vision tower a text prompt never runs through)
    may be missing from the file: they are left as zeros. A ValueError if the file lacks any
    other."""
    with init_empty_weights():
        model = cls(config)
    expected = {bare(name): name for name in model.state_dict()}
    state = {}
    for name, value in read_weights(path, dtype).items():
        if (target := expected.get(bare(name))) is not None:
            state[target] = value
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if needed := [name for name in missing if not name.startswith(unused)]:
        raise ValueError(f"not a {cls.__name__} weights file: {needed[0]} is missing")
    for name in missing:
        parent, _, leaf = name.rpartition(".")
        module = model.get_submodule(parent)
        shape = getattr(module, leaf).shape
        setattr(module, leaf, torch.nn.Parameter(torch.zeros(shape, dtype=dtype), False))
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:  # rotary tables and the like: computed by the model's own init
            raise ValueError(f"{cls.__name__}: buffer {name} was not made from the config")
    return model.eval()


def load_part(
    part: Part,
    source: Path | None,
    fallback: Path,
    load_file: Callable[[Path], torch.nn.Module],
    load_folder: Callable[[Path], torch.nn.Module],
    single_file: Path,
    title: str,
) -> torch.nn.Module:
    """One part of a `title` model whose `single_file` holds its denoiser only: from `source`
    (the user's file or diffusers folder), else from `fallback` (the config folder's part
    folder, if it holds weights)."""
    if source is None:
        if not has_weights(fallback):
            raise UserError(
                f"{single_file}: holds {title}'s transformer only; set {part.key} to your "
                f"{part.usual} (a file or a diffusers folder), or single_file_config to a "
                f"diffusers {title} folder with weights"
            )
        source = fallback
    if not source.exists():
        raise UserError(f"{part.key} = {source}: file or folder not found")
    try:
        if source.is_dir():
            if (source / part.attr / "config.json").exists():  # a whole pipeline folder
                source = source / part.attr
            return load_folder(source).eval()
        return load_file(source).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{part.key} = {source}: could not load it ({first_line(exc)})") from None


def find_tokenizer(
    load: Callable[..., Any], folders: Iterable[Path], hub: Iterable[tuple[str, str]], error: str
) -> Any:
    """A tokenizer from the first local folder that has it, else from the hub cache (offline
    only: `hub` lists (repo id, subfolder, "" for none)); `error` when none has it."""
    candidates = [(str(p), "") for p in folders if p.is_dir()] + list(hub)
    for source, sub in candidates:
        try:
            return load(source, subfolder=sub, local_files_only=True)
        except (OSError, ValueError):
            continue
    raise UserError(error)


def llm_tokenizer(
    load: Callable[..., Any],
    folder: Path,
    encoder: Path | None,
    hub: Iterable[tuple[str, str]],
    title: str,
    encoder_name: str,
) -> Any:
    """The LLM tokenizer of a `title` model loaded from its files (not ours to ship: its
    vocabulary is the LLM's): from the config folder's `tokenizer/`, the text encoder's folder
    (`encoder`, where it is one), or the hub cache."""
    local = [folder / "tokenizer"]
    if encoder is not None and encoder.is_dir():
        local += [encoder / "tokenizer", encoder]
    return find_tokenizer(
        load,
        local,
        hub,
        f"{title}'s {encoder_name} tokenizer was not found offline: set single_file_config to "
        f"a diffusers {title} folder (one with tokenizer/), or text_encoder to a "
        f"{encoder_name} folder with its tokenizer files",
    )
