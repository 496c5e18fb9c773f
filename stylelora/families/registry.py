"""Every model family, and what config, CLI and UI learn from their declarations.

Adding a family is its folder (`families/<name>/`) and its line in `FAMILIES`; nothing outside
`families/` names one.
"""

from __future__ import annotations

from pathlib import Path

from stylelora.families.base import ModelFamily, Option, Part
from stylelora.families.flux import Flux
from stylelora.families.flux2 import Flux2
from stylelora.families.qwen_image import QwenImage
from stylelora.families.sd2 import SD2
from stylelora.families.sd15 import SD15
from stylelora.families.sdxl import SDXL
from stylelora.families.zimage import ZImage

# In the order a model and an adapter file are matched against them: one whose claims on
# adapter names are broader (Flux.1's on every transformer's) after those they overlap.
FAMILIES: list[type[ModelFamily]] = [SD15, SD2, SDXL, ZImage, Flux2, QwenImage, Flux]


def family_named(name: str) -> type[ModelFamily] | None:
    return next((family for family in FAMILIES if family.name == name), None)


def family_names() -> list[str]:
    return [family.name for family in FAMILIES]


def declared_parts() -> dict[str, Part]:
    """Every family's parts by config key; families that share a key share its declaration."""
    return _declared("parts")


def declared_options() -> dict[str, Option]:
    """Every family's options by dotted config key, shared keys declared once."""
    return _declared("options")


def _declared(kind: str) -> dict:
    found: dict = {}
    for family in FAMILIES:
        for item in getattr(family, kind):
            if found.setdefault(item.key, item) != item:
                raise TypeError(f"{family.name} declares {item.key} unlike another family")
    return found


def owners(key: str) -> list[type[ModelFamily]]:
    """The families that declare the part or option `key`."""
    return [f for f in FAMILIES if key in {d.key for d in (*f.parts, *f.options)}]


def owner_titles(key: str) -> str:
    """The titles of the families that declare `key`, as a list in words."""
    titles = [family.title for family in owners(key)]
    return " and ".join([", ".join(titles[:-1]), titles[-1]] if len(titles) > 1 else titles)


def keys_not_taken(families: list[type[ModelFamily]]) -> set[str]:
    """The config keys no model of `families` uses: other families' parts and options, and the
    shared keys each has no use for. None when no family is known."""
    if not families:
        return set()
    declared = {*declared_parts(), *declared_options()}
    return set.intersection(
        *(
            (declared - {item.key for item in (*family.parts, *family.options)})
            | family.unused_keys()
            for family in families
        )
    )


def adapter_prefixes() -> tuple[str, ...]:
    """Every module-name prefix of the families' own adapter files."""
    return tuple(dict.fromkeys(p for family in FAMILIES for p in family.file_prefixes()))


def denoiser_prefixes() -> tuple[str, ...]:
    """The name prefixes of the denoisers' modules, in the families' files and diffusers'."""
    prefixes = [f.denoiser_prefix for f in FAMILIES] + [f"{f.denoiser_attr}." for f in FAMILIES]
    return tuple(dict.fromkeys(prefixes))


def adapter_components() -> tuple[str, ...]:
    """Every pipeline attribute an adapter may adapt: the denoisers and adapted encoders."""
    attrs = [a for f in FAMILIES for a in (f.denoiser_attr, *f.text_encoder_attrs.values())]
    return tuple(dict.fromkeys(attrs))


def ui_formats() -> dict[str, str]:
    """Each layout the UIs read adapters in, and the families they read in it."""
    formats: dict[str, list[str]] = {}
    for family in FAMILIES:
        formats.setdefault(family.native_format, []).append(family.title)
    return {fmt: ", ".join(titles) for fmt, titles in formats.items()}


def preset_files() -> dict[str, Path]:
    """The VRAM presets every family ships (`<family>/presets/<name>.toml`), by name."""
    files = {}
    for family in FAMILIES:
        for path in sorted((family.folder() / "presets").glob("*.toml")):
            files[path.stem] = path
    return files


def model_names() -> list[str]:
    """The built-in models: each shipped demo model, then each tiny one."""
    demos = [f"demo:{f.name}" for f in FAMILIES if (f.folder() / "demo").is_dir()]
    return demos + [f"tiny:{f.name}" for f in FAMILIES]
