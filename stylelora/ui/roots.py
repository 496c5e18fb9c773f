"""The folders the UI may read and write: every path it is given must resolve inside one."""

from __future__ import annotations

import os
from pathlib import Path

from stylelora.errors import UserError


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

    def resolve(self, path: str | Path) -> Path:
        """`path` (relative to the first root) with every symlink followed; OutsideRoots when
        that lands outside every root, whatever `..` or links it took to get there."""
        given = Path(os.path.expanduser(str(path)))
        real = (self.home / given).resolve()
        if not any(real == root or real.is_relative_to(root) for root in self.folders):
            roots = ", ".join(str(root) for root in self.folders)
            raise OutsideRoots(f"{path}: outside the folders this UI may use ({roots})")
        return real

    def relative(self, path: Path) -> str:
        """`path` as the UI shows it: relative to its root where it can be."""
        for root in self.folders:
            if path.is_relative_to(root):
                return str(path.relative_to(root)) if root == self.home else str(path)
        return str(path)
