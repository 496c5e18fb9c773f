"""The folders the UI may read and write: every path it is given, from a request, a setting, a
preset, an imported config or the Try form, resolves inside one, here and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path

from stylelora.errors import UserError
from stylelora.families.loading import BUILT_IN, check_model_name, is_hub_id


class OutsideRoots(UserError):
    """A path that resolves outside every root: refused, with the path named."""


class Roots:
    def __init__(self, folders: list[Path]) -> None:
        self.folders = [Path(folder).resolve() for folder in folders]
        for folder in self.folders:
            if not folder.is_dir():
                raise UserError(f"--root {folder}: not a folder")

    @property
    def home(self) -> Path:
        """Where relative paths start: the first root."""
        return self.folders[0]

    def resolve(self, path: str | Path, base: Path | None = None) -> Path:
        """`path` (`~` expanded, relative to `base`, by default the first root) with every
        symlink followed; OutsideRoots when that lands outside every root, whatever `..` or
        links it took to get there."""
        text = str(path)
        if "\x00" in text:
            raise UserError(f"{text!r}: a path cannot hold a null byte")
        if len(text) > 4096 or any(len(part.encode()) > 255 for part in Path(text).parts):
            raise UserError(f"{text[:60]}...: longer than a file name or path can be")
        try:
            real = ((base or self.home) / os.path.expanduser(text)).resolve()
        except (OSError, RuntimeError) as exc:  # a link loop, a name too long
            raise UserError(f"{text}: not a usable path ({exc})") from None
        if not self.holds(real):
            roots = ", ".join(str(root) for root in self.folders)
            raise OutsideRoots(f"{text}: outside the folders this UI may use ({roots})")
        return real

    def holds(self, real: Path) -> bool:
        return any(real == root or real.is_relative_to(root) for root in self.folders)

    def model(self, value: str, base: Path | None = None) -> str:
        """A base model as the trainer gets it: a built-in name or a hub id as given, a file
        or folder as its absolute path inside the roots (a run's process starts in its own
        folder, so a relative path must not be left for it to read from there)."""
        text = value.strip()
        if not text:
            raise UserError("model: choose a base model")
        if text.startswith(BUILT_IN):
            check_model_name(text)
            return text
        base = base or self.home
        if "\x00" in text or looks_like_path(text) or exists(base / text):
            return str(self.resolve(text, base))
        if not is_hub_id(text):
            raise UserError(
                f"model {text!r}: no such file or folder under {base}, and not a hub id (org/name)"
            )
        return text

    def relative(self, path: Path) -> str:
        """`path` as the UI shows it: relative to its root where it can be."""
        for root in self.folders:
            if path.is_relative_to(root):
                return str(path.relative_to(root)) if root == self.home else str(path)
        return str(path)


def looks_like_path(text: str) -> bool:
    """Whether a model names a file or folder rather than a hub id."""
    return (
        text.startswith(("/", "~", "."))
        or "\\" in text
        or ".." in Path(text).parts
        or text.endswith((".safetensors", ".ckpt", ".sft"))
    )


def exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long
        return False
