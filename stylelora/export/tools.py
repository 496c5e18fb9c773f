"""What the adapter-tool subcommands do (cli.py only parses): export, merge, resize, combine,
inspect. Each reads through adapters/state.py and writes atomically."""

from __future__ import annotations

from pathlib import Path

from stylelora.adapters.state import Adapter, read_adapter
from stylelora.errors import UserError
from stylelora.export.combine import combine_adapters
from stylelora.export.convert import (
    UI_FORMATS,
    adapter_format,
    diffusers_adapter,
    diffusers_parts,
    write_diffusers,
    write_peft,
)
from stylelora.export.inspect import inspect_file
from stylelora.export.lora_file import write_lora_tensors
from stylelora.export.merge import merge_adapters, parse_weighted, save_merged
from stylelora.export.names import diffusers_family, file_family
from stylelora.export.resize import resize_adapter
from stylelora.families.base import ModelFamily


def naming_family(
    model: str | None, family: type[ModelFamily], version: str | None = None
) -> ModelFamily:
    """The model whose module paths the file's names map to: `--model`, or the real
    architecture (of the variant the adapter's base `version` names, where there are several)."""
    if model:
        from stylelora.families import load_family

        return load_family(model)
    return family.variant_on_meta_device(version)


def load_any(path: Path, model: str | None) -> tuple[Adapter, str]:
    """A file in a UI layout or diffusers', or a PEFT folder or file, as an Adapter in its
    family's UI layout, and the format it was in."""
    fmt = adapter_format(path)
    if fmt in UI_FORMATS:
        return read_adapter(path), fmt
    if fmt in ("diffusers", "peft"):
        parts = diffusers_parts(path, fmt)
        family = naming_family(model, diffusers_family(parts[0], parts[1]))
        return diffusers_adapter(parts, family, path), fmt
    raise UserError(f"{path}: neither a kohya, a ComfyUI, a diffusers nor a PEFT LoRA file")


def run_export(path: Path, fmt: str, out: Path, model: str | None) -> str:
    adapter, source_format = load_any(path, model)
    family_class = file_family(adapter)
    if fmt in UI_FORMATS:
        if fmt != family_class.native_format:
            raise UserError(
                f"--format {fmt}: the UIs read {family_class.title} adapters in "
                f"{family_class.native_format}'s layout; use --format {family_class.native_format}"
            )
        write_lora_tensors(out, adapter.tensors(), adapter.metadata)
    else:
        version = adapter.metadata.get("ss_base_model_version")
        family = naming_family(model, family_class, version)
        writer = write_diffusers if fmt == "diffusers" else write_peft
        writer(out, adapter, family, str(path))
    return f"wrote {out} ({source_format} -> {fmt}, {len(adapter.modules)} modules)"


def run_merge(
    model: str,
    adapters: list[str],
    out: Path,
    dtype: str,
    config: str | None = None,
    parts: dict[str, Path | None] | None = None,
) -> str:
    from stylelora.families import load_family

    weighted = [parse_weighted(text) for text in adapters]
    for path, _ in weighted:
        if not path.is_file():
            raise UserError(f"{path}: adapter file not found")
    family = load_family(model, config=config, parts=parts)
    merge_adapters(family, weighted)
    merged = ", ".join(f"{p.name}:{s:g}" for p, s in weighted)
    save_merged(family, out, dtype, {"stylelora_merged": merged})
    return f"wrote {out} ({family.name}, {dtype}, merged {merged})"


def run_resize(path: Path, rank: int | None, energy: float | None, out: Path) -> list[str]:
    if energy is not None and not 0 < energy <= 1:
        raise UserError(f"--energy {energy}: must be in (0, 1], e.g. 0.99")
    if rank is not None and rank < 1:
        raise UserError(f"--rank {rank}: must be 1 or more")
    adapter = read_adapter(path)
    adapter.require_lora(path, "resize")
    resized, reports = resize_adapter(adapter, rank, energy)
    write_lora_tensors(out, resized.tensors(), resized.metadata)
    lines = [report.line() for report in reports]
    worst = max((r.error for r in reports), default=0.0)
    return lines + [f"wrote {out} ({len(reports)} modules, largest error {100 * worst:.3f}%)"]


def run_combine(items: list[str], out: Path, rank: int | None) -> list[str]:
    weighted = [parse_weighted(text) for text in items]
    adapters = [(str(path), read_adapter(path), strength) for path, strength in weighted]
    for path, adapter, _ in adapters:
        adapter.require_lora(path, "combine")
    combined = combine_adapters(adapters)
    lines = []
    if rank is not None:
        combined, reports = resize_adapter(combined, rank=rank)
        lines = [report.line() for report in reports]
    write_lora_tensors(out, combined.tensors(), combined.metadata)
    return lines + [f"wrote {out} ({len(combined.modules)} modules)"]


def run_inspect(path: Path) -> list[str]:
    return inspect_file(path)
