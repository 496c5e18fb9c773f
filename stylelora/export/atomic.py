"""Write files so that a crash or a full disk never leaves a half-written one in place, with the
modes the umask gives (0644 / 0755 under umask 022), so that a UI running as another user can
read them: safetensors' `save_file` and `tempfile` make 0600 files and 0700 folders."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from stylelora.errors import UserError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_umask_modes(root: Path) -> None:
    """`root` and everything under it get the modes a plain open() / mkdir() would give."""
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if root.is_file():
        os.chmod(root, file_mode)
        return
    os.chmod(root, dir_mode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(folder, name), file_mode)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    On any failure the temporary file is removed and `path` keeps its previous content.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"{path.parent}: cannot write here ({exc.strerror})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        give_umask_modes(tmp)  # after the writer: save_file replaces `tmp` with its own 0600 file
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        reason = getattr(exc, "strerror", None) or str(exc).removeprefix(
            "Error while serializing: "
        )
        raise UserError(f"{path}: could not write the file ({reason})") from None
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    A folder already at `path` is moved aside first and removed once the new one is in place.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise UserError(f"{path.parent}: cannot write here ({exc.strerror})") from None
    old = path.with_name(f".{path.name}.old-{tmp.name}")
    try:
        yield tmp
        give_umask_modes(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"{path}: could not write the folder ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """safetensors' `save_file`, atomically and with the umask's mode: every writer uses this."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


# What mkstemp and mkdtemp leave of a write that a crash or a kill cut short:
# `.NAME.` + 8 random characters + `.tmp`, and atomic_dir's `.NAME.old-.NAME.XXXXXXXX.tmp`.
TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(folder: str | Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Remove the temporaries of interrupted writes under `folder` (but not in `skip` folders);
    return them. Only for a folder no other process writes into now."""
    removed = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in [*dirs, *files]:
            if TEMPORARY.match(name):
                path = Path(root) / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
        dirs[:] = [d for d in dirs if not TEMPORARY.match(d)]
    return removed
