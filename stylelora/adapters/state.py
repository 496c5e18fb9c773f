"""An adapter file in memory: its modules under the names the family's UI layout gives them
(down, up, alpha, dora_scale; or LyCORIS's LoHa and LoKr tensors) and their checks.

Two layouts hold them on disk: kohya's (`lora_unet_..._to_q.lora_down.weight`, `.lora_up.weight`,
`.alpha`), which the UIs read for SD1.x, SD2.x, SDXL and Flux.1; and ComfyUI's for the newer
transformers (`diffusion_model.<module>.lora_A.weight` and `.lora_B.weight`, as ai-toolkit and
musubi-tuner write them), told apart by the module name (a dotted path). In memory both use
kohya's suffixes. The tools (resize, combine, convert, merge, inspect) all read and write through
this, so a file from kohya sd-scripts, LyCORIS, ai-toolkit or stylelora is handled the same way.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open

from stylelora.adapters.lycoris import ALGOS, LycorisModule, lycoris_problems
from stylelora.errors import UserError, first_line
from stylelora.families.registry import FAMILIES, adapter_components, adapter_prefixes

PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
PARTS[".dora_scale"] = "dora_scale"
SUFFIXES = {part: suffix for suffix, part in PARTS.items()}
# ComfyUI's layout names the pair as PEFT does, with alpha / rank folded into lora_B.
AB_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up"}
PARTS.update(AB_SUFFIXES)
PARTS.update({f".{part}": part for parts in ALGOS.values() for part in parts})


@dataclass
class LoraModule:
    """One adapted module: W' = W + strength * (alpha / rank) * up @ down (DoRA: see dora.py)."""

    down: torch.Tensor  # (rank, in) or (rank, in, k, k)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float
    dora_scale: torch.Tensor | None = None

    algo: ClassVar[str] = "lora"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], *self.down.shape[1:])

    @property
    def in_width(self) -> int:
        return self.down[0].numel()

    def fits(self, shape: tuple[int, ...]) -> bool:
        return tuple(shape) == self.weight_shape

    def delta(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """(alpha / rank) * up @ down, in the adapted weight's shape, in fp32 (the pair's own
        shape; `shape` is for LoHa and LoKr modules, whose convolutions may be flattened)."""
        product = self.up.float().flatten(1) @ self.down.float().flatten(1)
        return (self.alpha / self.rank * product).reshape(self.weight_shape)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {
            f"{name}.lora_down.weight": self.down.contiguous(),
            f"{name}.lora_up.weight": self.up.contiguous(),
            f"{name}.alpha": torch.tensor(float(self.alpha)),
        }
        if self.dora_scale is not None:
            out[f"{name}.dora_scale"] = self.dora_scale.contiguous()
        return out


Module = LoraModule | LycorisModule


@dataclass
class Adapter:
    modules: dict[str, Module]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def is_dora(self) -> bool:
        return any(m.dora_scale is not None for m in self.modules.values())

    @property
    def algo(self) -> str:
        """lora, loha, lokr, or e.g. "loha+lora" for a file that mixes them."""
        return "+".join(sorted({m.algo for m in self.modules.values()})) or "lora"

    def require_lora(self, path: str | Path, tool: str) -> None:
        """A one-line refusal for a tool that works on LoRA's up/down pairs only."""
        if self.algo != "lora":
            raise UserError(
                f"{path}: a {self.algo} (LyCORIS) file: {tool} works on LoRA's up/down pairs, "
                "which it has none of; sample, merge and inspect take it"
            )

    def with_uniform_alpha(self) -> Adapter:
        """The same ΔW with one alpha (the largest rank) for every module, scale folded into up.

        diffusers misreads a kohya file whose attention modules' alphas differ (its converted
        alpha_pattern keys match no module, so the commonest alpha is used for all). DoRA modules
        keep alpha = rank, which the UIs' DoRA formulas need.
        """
        if self.is_dora or self.algo != "lora" or not self.modules:
            return self
        alpha = float(max(m.rank for m in self.modules.values()))
        modules = {
            name: LoraModule(m.down, m.up * (m.alpha / alpha), alpha)
            for name, m in self.modules.items()
        }
        return Adapter(modules, {**self.metadata, "ss_network_alpha": f"{alpha:g}"})

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, module in sorted(self.modules.items()):
            out.update(module.tensors(name))
        return out


def in_ab_layout(name: str) -> bool:
    """Whether a module is named in ComfyUI's layout (a dotted module path; kohya's names have
    no dot), whose LoRA pair is lora_A / lora_B."""
    return "." in name


def file_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors with kohya's suffixes as the file holds them: a LoRA module named in ComfyUI's
    layout keeps lora_A and lora_B, alpha / rank folded into lora_B and no alpha key, as
    ai-toolkit and musubi-tuner write them (diffusers' Flux.2 loader refuses an alpha key; every
    reader takes a missing alpha as the rank). LyCORIS modules keep their own names."""
    out = {}
    for key, value in tensors.items():
        name, part = split_key(key) or (key, "")
        pair = f"{name}.lora_down.weight" in tensors
        if not (in_ab_layout(name) and pair) or part not in ("down", "up", "alpha"):
            out[key] = value
        elif part == "down":
            out[f"{name}.lora_A.weight"] = value
        elif part == "up":
            rank = tensors[f"{name}.lora_down.weight"].shape[0]
            alpha = tensors.get(f"{name}.alpha")
            scale = 1.0 if alpha is None else float(alpha) / rank
            out[f"{name}.lora_B.weight"] = (value.float() * scale).to(value.dtype).contiguous()
    return out


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, part) of a kohya key, or None for a key of another kind."""
    for suffix, part in PARTS.items():
        if key.endswith(suffix):
            return key.removesuffix(suffix), part
    return None


def pair_problems(name: str, parts: dict[str, torch.Tensor]) -> list[str]:
    """What is wrong with one module's tensors, as short phrases naming it."""
    if "down" not in parts or "up" not in parts:
        missing = "lora_down" if "down" not in parts else "lora_up"
        return [f"{name}: {missing}.weight is missing"]
    down, up = parts["down"], parts["up"]
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        return [f"{name}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} do not pair"]
    if up.shape[1] != down.shape[0]:
        return [
            f"{name}: lora_up {tuple(up.shape)} has rank {up.shape[1]} but lora_down "
            f"{tuple(down.shape)} has rank {down.shape[0]} (mismatched up/down pair)"
        ]
    return nonfinite_problems(
        {f"{name}{suffix}": parts[part] for part, suffix in SUFFIXES.items() if part in parts}
    )


def nonfinite_problems(tensors: dict[str, torch.Tensor]) -> list[str]:
    """One phrase naming the tensors holding NaN or infinite values (a UI renders them black)."""
    bad = [key for key, value in tensors.items() if not torch.isfinite(value).all()]
    if not bad:
        return []
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return [f"{shown}: NaN or infinite values"]


def lycoris_module(name: str, parts: dict[str, torch.Tensor]) -> tuple[Module | None, list[str]]:
    """A LoHa or LoKr module from its tensors, or the problems that stop it."""
    algos = {algo for algo, names in ALGOS.items() if any(k in names for k in parts)}
    if len(algos) > 1 or {"down", "up"} & set(parts):
        return None, [f"{name}: mixes the tensors of several adapter kinds ({sorted(parts)})"]
    (algo,) = algos
    alpha = float(parts["alpha"]) if "alpha" in parts else None
    module = LycorisModule(algo, {k: v for k, v in parts.items() if k != "alpha"}, alpha)
    problems = lycoris_problems(name, module) or nonfinite_problems(
        {f"{name}.{k}": v for k, v in parts.items()}
    )
    return (None if problems else module), problems


def modules_from_tensors(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, Module], list[str]]:
    """kohya modules from flat tensors, and the problems found (unknown keys, bad pairs)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, value in tensors.items():
        split = split_key(key)
        if split is None:
            problems.append(f"{key}: not a kohya LoRA tensor")
            continue
        grouped.setdefault(split[0], {})[split[1]] = value
    modules = {}
    for name, parts in sorted(grouped.items()):
        if set(parts) - set(SUFFIXES):
            module, found = lycoris_module(name, parts)
            problems += found
            if module is not None:
                modules[name] = module
            continue
        found = pair_problems(name, parts)
        problems += found
        if found:
            continue
        alpha = float(parts["alpha"]) if "alpha" in parts else float(parts["down"].shape[0])
        modules[name] = LoraModule(
            parts["down"].float(), parts["up"].float(), alpha, parts.get("dora_scale")
        )
    return modules, problems


PICKLE_STARTS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def is_pickle(head: bytes) -> bool:
    """torch.save writes a zip, older versions a bare pickle; a safetensors header whose length
    starts the same way is told apart by its JSON, which starts at byte 8."""
    return head.startswith(PICKLE_STARTS) and head[8:9] != b"{"


def header_problem(path: Path) -> str | None:
    """What is wrong with a file's safetensors header (a pickle, cut off, not a JSON object of
    tensor entries and string metadata), or with its length; None when it is sound."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
        if is_pickle(head):
            return (
                f"{path} is a pickle (PyTorch .pt/.ckpt), not a safetensors file: loading a "
                "pickle can run code, so stylelora does not; use the .safetensors version"
            )
        head = head[:8]
        if len(head) < 8:
            return f"{path}: truncated ({size} bytes: not even a safetensors header)"
        (length,) = struct.unpack("<Q", head)
        if length > size:
            return f"{path}: truncated inside its header ({size} bytes, header needs {length + 8})"
        handle.seek(8)
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{path}: not a safetensors file (its header is not JSON)"
    return layout_problem(path, header) or truncation_problem(path, header, 8 + length, size)


def layout_problem(path: Path, header: Any) -> str | None:
    """A header that is JSON but not safetensors': tensor entries and a str->str __metadata__."""
    if not isinstance(header, dict):
        return f"{path}: damaged header: a JSON {type(header).__name__}, not an object"
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        return f"{path}: damaged header: __metadata__ is not a map of strings to strings"
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if name != "__metadata__" and not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and o >= 0 for o in offsets)
        ):
            return f"{path}: damaged header: tensor {name} has no valid data_offsets"
    return None


def truncation_problem(path: Path, header: dict, data_start: int, size: int) -> str | None:
    """If the file is shorter than its header says, which tensors are cut off."""
    ends = {k: v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"}
    need = data_start + max(ends.values(), default=0)
    cut = sorted(k for k, end in ends.items() if data_start + end > size)
    if not cut:
        return None
    shown = ", ".join(cut[:3]) + (f" and {len(cut) - 3} more" if len(cut) > 3 else "")
    return (
        f"{path}: truncated: {size} of {need} bytes present; tensors cut off: {shown} "
        "(download or copy the file again)"
    )


def read_header(path: str | Path) -> tuple[list[str], dict[str, str]]:
    """The tensor names and metadata of a .safetensors file; a damaged file is a UserError."""
    with open_checked(path) as handle:
        return list(handle.keys()), handle.metadata() or {}


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a .safetensors file; a damaged file is a UserError."""
    with open_checked(path) as handle:
        names = list(handle.keys())
        return {k: handle.get_tensor(k) for k in names}, handle.metadata() or {}


@contextlib.contextmanager
def open_checked(path: str | Path) -> Iterator[Any]:
    """safe_open, after naming a missing or truncated file; read errors become a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: adapter file not found")
    problem = header_problem(path)
    if problem:
        raise UserError(problem)
    try:
        with safe_open(str(path), framework="pt") as handle:
            if not list(handle.keys()):
                raise UserError(f"{path}: holds no tensors, so it is no adapter")
            yield handle
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable .safetensors file ({first_line(exc)})") from None


def convert_command(path: str | Path, fmt: str = "kohya") -> str:
    """The `stylelora export` command that writes `path` (any layout export reads) in the UI
    layout `fmt` (kohya or comfyui).

    A PEFT component's file is converted with its siblings: the folder `export --format peft`
    wrote, so that the text encoders' adapters come along.
    """
    source = Path(path)
    if source.name == "adapter_model.safetensors" and source.parent.name in adapter_components():
        source = source.parent.parent
    out = source.with_name(f"{source.name.removesuffix('.safetensors')}-{fmt}.safetensors")
    return (
        f"stylelora export {shlex.quote(str(source))} --format {fmt} --out {shlex.quote(str(out))}"
    )


def convert_hint(path: str | Path, metadata: dict[str, str]) -> str:
    """How to convert a file to the layout its family's UIs read: the command, where the
    metadata names the family; else one for each layout, with the families it is for."""
    version = metadata.get("ss_base_model_version", "")
    formats = {f.native_format for f in FAMILIES if version.startswith(f.base_version_prefix)}
    if len(formats) == 1:
        return f"convert it with: {convert_command(path, formats.pop())}"
    hints = []
    for fmt in dict.fromkeys(f.native_format for f in FAMILIES):
        titles = ", ".join(f.title for f in FAMILIES if f.native_format == fmt)
        hints.append(f"{convert_command(path, fmt)} (for {titles})")
    return "convert it with one of: " + "; ".join(hints)


def checked_adapter(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Adapter:
    """kohya tensors as an Adapter; any problem in them (a bad pair, NaN) is a UserError."""
    modules, problems = modules_from_tensors(tensors)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise UserError(f"{path}: {problems[0]}{more}; run `stylelora inspect` for all")
    return Adapter(modules, metadata)


def read_adapter(path: str | Path) -> Adapter:
    """An adapter file in a UI layout; any problem in it is a UserError that names it."""
    tensors, metadata = read_tensors(path)
    if not any(key.startswith(adapter_prefixes()) for key in tensors):
        known = "/".join(adapter_prefixes())
        raise UserError(
            f"{path}: not a LoRA in a layout the UIs read (no {known} keys); "
            + convert_hint(path, metadata)
        )
    return checked_adapter(path, tensors, metadata)
