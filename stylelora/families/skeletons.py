"""Weight-less diffusers repo folders ("skeletons") for loading single-file checkpoints offline.

`StableDiffusionPipeline.from_single_file(ckpt, config=<folder>, local_files_only=True)` reads
every component's config (and the tokenizers) from a diffusers repo folder and the weights from
the checkpoint. Without `config` it downloads that folder from the Hugging Face hub. Each family
ships its real model's folder minus the weights as `families/<name>/skeleton/` (its docstring
says which model it is); it is also what kohya names and the memory estimates are taken from.

The CLIP BPE vocabulary (the same for every CLIP text encoder) is stored once, gzipped, in
`clip_tokenizer/`; `skeleton_dir` materialises a complete folder (configs plus `vocab.json` and
`merges.txt` in each CLIP tokenizer folder) under the stylelora cache and returns its path.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from stylelora.export.atomic import give_umask_modes

PACKAGE_DIR = Path(__file__).resolve().parent
TOKENIZER_SOURCE = PACKAGE_DIR / "clip_tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# In each family's folder, named as the family.
SKELETONS = tuple(sorted(p.parts[-3] for p in PACKAGE_DIR.glob("*/skeleton/model_index.json")))
# Written last into a materialised folder: its content says which package files it came from.
STAMP = ".stylelora-skeleton"


def cache_root() -> Path:
    """`$STYLELORA_CACHE`, else `~/.cache/stylelora`."""
    return Path(os.environ.get("STYLELORA_CACHE") or Path.home() / ".cache" / "stylelora")


def source_dir(name: str) -> Path:
    """The packaged (tokenizer-less) skeleton folder of `name`."""
    if name not in SKELETONS:
        raise ValueError(f"unknown skeleton {name!r}; known: {', '.join(SKELETONS)}")
    return PACKAGE_DIR / name / "skeleton"


def _tokenizer_dirs(src: Path) -> list[Path]:
    """The CLIP tokenizer folders (a T5 tokenizer's folder is complete as it is)."""
    configs = src.glob("tokenizer*/tokenizer_config.json")
    return sorted(
        p.parent
        for p in configs
        if json.loads(p.read_text()).get("tokenizer_class") == "CLIPTokenizer"
    )


def _digest(src: Path) -> str:
    """Hash of every packaged file the materialised folder is made from."""
    files = [(p, src.parent) for p in sorted(src.rglob("*")) if p.is_file()]
    files += [(p, PACKAGE_DIR) for p in sorted(TOKENIZER_SOURCE.glob("*.gz"))]
    h = hashlib.sha256()
    for path, base in files:
        h.update(path.relative_to(base).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def _tokenizer_file(name: str) -> bytes:
    plain = TOKENIZER_SOURCE / name
    if plain.exists():
        return plain.read_bytes()
    return gzip.decompress((TOKENIZER_SOURCE / f"{name}.gz").read_bytes())


def _is_current(folder: Path, digest: str) -> bool:
    try:
        return (folder / STAMP).read_text().strip() == digest
    except OSError:
        return False


def _build(src: Path, dest: Path, digest: str) -> None:
    shutil.copytree(src, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    contents = {name: _tokenizer_file(name) for name in TOKENIZER_FILES}
    for tok_dir in _tokenizer_dirs(src):
        for name, data in contents.items():
            (dest / tok_dir.name / name).write_bytes(data)
    (dest / STAMP).write_text(digest + "\n")


def skeleton_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A complete, weight-less diffusers folder for the family `name` (its skeleton).

    Built once under `<cache>/skeletons/<name>` (cache: `cache_dir`, else `cache_root()`) and
    rebuilt when the packaged files change. The folder is assembled in a temporary sibling and
    renamed into place, so a reader never sees a half-written one, even with several processes.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return materialise(source_dir(name), root / "skeletons" / name)


def materialise(src: Path, target: Path) -> Path:
    """Copy the packaged diffusers folder `src` to `target`, adding `vocab.json` and
    `merges.txt` to each of its tokenizer folders, unless `target` already holds this build."""
    name = target.name
    digest = _digest(src)
    if _is_current(target, digest):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    aside = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=target.parent))
    try:
        _build(src, tmp, digest)
        give_umask_modes(tmp)  # mkdtemp made it 0700
        for attempt in range(3):
            if target.exists():
                # A stale folder (other package version): move it aside, then swap ours in.
                with contextlib.suppress(FileNotFoundError):  # another process moved it
                    os.replace(target, aside / str(attempt))
            try:
                os.replace(tmp, target)
                break
            except OSError:
                if _is_current(target, digest):
                    break  # another process put its identical build in place first
        else:
            raise OSError(f"could not put the {name} skeleton in place at {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
    return target


__all__ = ["SKELETONS", "cache_root", "materialise", "skeleton_dir", "source_dir"]
