"""Every family answers the whole interface from its own folder, and nothing outside
`stylelora/families/` names a family, its parts or its options."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from stylelora.config import AdapterConfig, Config, TrainConfig
from stylelora.families.base import ModelFamily
from stylelora.families.registry import (
    FAMILIES,
    declared_options,
    declared_parts,
    preset_files,
)
from stylelora.families.skeletons import SKELETONS

PACKAGE = Path(__file__).resolve().parents[2] / "stylelora"
DECLARED = (
    "name",
    "title",
    "denoiser_attr",
    "denoiser_input",
    "text_encoder_attrs",
    "prompt_encoder_attrs",
    "native_format",
    "denoiser_prefix",
    "base_versions",
    "base_version_prefix",
    "sample_schedulers",
)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_answers_every_part_of_the_interface(family: type[ModelFamily]) -> None:
    assert not inspect.isabstract(family), family.__abstractmethods__
    for attr in DECLARED:
        assert getattr(family, attr, None) is not None, attr
    assert family.native_format in ("kohya", "comfyui")
    assert "default" in family.sample_schedulers
    assert all(version.startswith(family.base_version_prefix) for version in family.base_versions)
    folder = family.folder()
    assert folder == PACKAGE / "families" / family.name
    assert family.name in SKELETONS and (folder / "skeleton" / "model_index.json").is_file()
    for path in (folder / "presets").glob("*.toml"):
        assert re.fullmatch(r"[a-z0-9-]+-\d+gb", path.stem), path


def test_names_are_unique_and_shared_declarations_agree() -> None:
    names = [family.name for family in FAMILIES]
    assert len(names) == len(set(names))
    versions = [v for family in FAMILIES for v in family.base_versions]
    assert len(versions) == len(set(versions))
    prefixes = [family.base_version_prefix for family in FAMILIES]
    assert not any(a != b and b.startswith(a) for a in prefixes for b in prefixes)
    declared_parts(), declared_options()  # raises where two families declare a key unalike
    assert len(preset_files()) == sum(
        len(list((family.folder() / "presets").glob("*.toml"))) for family in FAMILIES
    )


def family_words() -> set[str]:
    """What names a family or what only some families have: their names and titles, their
    parts' and options' keys (a setting may be spelled as its field), but for words the
    shared code has of its own (every family's `vae`, the `adapter.text_encoder` switch)."""
    words = {family.name for family in FAMILIES} | {family.title for family in FAMILIES}
    keys = [*declared_parts(), *declared_options()]
    words |= set(keys) | {key.rpartition(".")[2] for key in keys}
    sections = (Config, AdapterConfig, TrainConfig)
    shared = {name for section in sections for name in section.__bases__[0].model_fields}
    return words - shared - set(dir(ModelFamily))


def named_in(path: Path, words: set[str]) -> list[str]:
    """The identifiers and string constants of a module (docstrings and comments left out)
    that hold one of `words` as a whole word."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    pattern = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, sorted(words))) + r")(?![\w])")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings and pattern.search(node.value):
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Name) and node.id in words:
            found.append(f"{path.name}:{node.lineno}: {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in words:
            found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    return found


def test_nothing_outside_the_families_names_a_family() -> None:
    """config, CLI, trainer, sampler, exporter, adapters, data and UI learn a family's parts,
    options and names from its declarations, never by name."""
    words = family_words()
    outside = [p for p in PACKAGE.rglob("*.py") if "families" not in p.relative_to(PACKAGE).parts]
    found = [hit for path in outside for hit in named_in(path, words)]
    assert found == []
    static = PACKAGE / "ui" / "static"
    pages = [p for p in static.iterdir() if p.suffix in (".html", ".js")]
    for page in pages:
        for family in FAMILIES:
            assert f"{family.name}" not in re.findall(r"\w+", page.read_text()), page
