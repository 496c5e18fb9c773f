"""The captioner tests' fixtures: tiny random vision-language models, built once a session.

A plugin of the suite (`pytest_plugins` in conftest.py), as `ui_fixtures` is: a second
conftest.py would take the module name `conftest` that other tests import their helpers by."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tiny_captioners import tiny_florence2, tiny_joycaption, tiny_qwen2_5_vl, tiny_qwen3_vl

TINY_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "florence2": tiny_florence2,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "qwen3_vl": tiny_qwen3_vl,
    "llava": tiny_joycaption,
}


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Callable[[str], Path]:
    """The folder of the tiny model of a transformers `model_type`, built on first use."""
    built: dict[str, Path] = {}

    def folder(kind: str) -> Path:
        if kind not in built:
            built[kind] = TINY_BUILDERS[kind](tmp_path_factory.mktemp(f"tiny-{kind}"))
        return built[kind]

    return folder
