"""Caption a folder: one caption file beside each image, in the layout training reads.

Images are found as training finds them (hidden files and folders, `.trash` included, are left
out). Each caption file is written atomically, and the record of who wrote it after every batch,
so a stopped run leaves no half-written file and `--skip-existing` continues where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from stylelora.caption import record
from stylelora.caption.models import Captioner
from stylelora.data.images import inspect_image, load_rgb
from stylelora.data.scan import image_files
from stylelora.errors import UserError
from stylelora.export.atomic import atomic_path


@dataclass(frozen=True)
class Wording:
    """What is put around each caption: `TRIGGER, PREFIX CAPTION SUFFIX`-like, comma-joined."""

    trigger: str = ""
    prefix: str = ""
    suffix: str = ""

    def apply(self, caption: str) -> str:
        parts = [self.trigger, self.prefix, caption, self.suffix]
        return ", ".join(part.strip().strip(",").strip() for part in parts if part.strip())


@dataclass
class Summary:
    written: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    stopped: bool = False
    seconds: float = 0.0

    def line(self, folder: Path) -> str:
        """`12 written, 3 skipped (they have captions), 1 failed (bad.png: not an image)`."""
        parts = [f"{self.written} written"]
        if self.written and self.seconds:
            parts[0] += f" in {self.seconds:.1f} s ({self.written / self.seconds:.2f} images/s)"
        if self.skipped:
            parts.append(f"{self.skipped} skipped (they have captions; --overwrite replaces them)")
        if self.failed:
            reasons = "; ".join(
                f"{path.relative_to(folder)}: {why}" for path, why in self.failed[:5]
            )
            more = f"; {len(self.failed) - 5} more" if len(self.failed) > 5 else ""
            parts.append(f"{len(self.failed)} failed ({reasons}{more})")
        return ", ".join(parts)


def caption_file(image: Path, extension: str) -> Path:
    return image.with_suffix(extension)


def has_caption(image: Path, extension: str) -> bool:
    path = caption_file(image, extension)
    return path.is_file() and path.stat().st_size > 0


def images_to_caption(folder: Path, extension: str, overwrite: bool) -> tuple[list[Path], int]:
    """(the images to caption, how many are skipped because they have a caption)."""
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found")
    images = image_files(folder)
    if not images:
        raise UserError(f"{folder}: no images (.png, .jpg, .webp, .bmp) in it")
    todo = [image for image in images if overwrite or not has_caption(image, extension)]
    return todo, len(images) - len(todo)


def open_images(paths: list[Path], summary: Summary) -> list[tuple[Path, Image.Image]]:
    """The images that open, as training sees them; the others go to `summary.failed`."""
    opened = []
    for path in paths:
        _, problem = inspect_image(path)
        if problem is not None:
            summary.failed.append((path, str(problem)))
            continue
        opened.append((path, load_rgb(path)))
    return opened


def write_caption(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def caption_images(
    folder: Path,
    images: list[Path],
    captioner: Captioner,
    model: str,
    *,
    extension: str = ".txt",
    wording: Wording = Wording(),
    batch_size: int = 1,
    on_batch: Callable[[int], None] = lambda done: None,
) -> Summary:
    """Caption `images` (under `folder`) in batches; the record is saved after each batch and
    when stopped. KeyboardInterrupt stops it between files: `summary.stopped` says so."""
    summary = Summary()
    files = record.read_record(folder)
    try:
        for start in range(0, len(images), batch_size):
            batch = open_images(images[start : start + batch_size], summary)
            if batch:
                captions = captioner.caption([image for _, image in batch])
                for (path, _), caption in zip(batch, captions, strict=True):
                    text = wording.apply(" ".join(caption.split()))
                    target = caption_file(path, extension)
                    write_caption(target, text)
                    key = target.relative_to(folder).as_posix()
                    files[key] = record.entry(
                        text, captioner.description, model, captioner.settings
                    )
                    summary.written += 1
                record.write_record(folder, files)
            on_batch(min(start + batch_size, len(images)))
    except KeyboardInterrupt:
        summary.stopped = True
        record.write_record(folder, files)
    return summary


def caption_folder(
    folder: Path,
    load: Callable[[], Captioner],
    model: str,
    *,
    extension: str = ".txt",
    overwrite: bool = False,
    wording: Wording = Wording(),
    batch_size: int = 1,
    show_progress: bool = True,
) -> Summary:
    """The whole command: find the images, load the captioner only if there is work, caption
    with a progress bar (images/s, time left)."""
    folder = Path(folder)
    todo, skipped = images_to_caption(folder, extension, overwrite)
    if not todo:
        return Summary(skipped=skipped)
    captioner = load()
    started = time.monotonic()
    with tqdm(total=len(todo), desc="captioning", unit="image", disable=not show_progress) as bar:
        summary = caption_images(
            folder,
            todo,
            captioner,
            model,
            extension=extension,
            wording=wording,
            batch_size=batch_size,
            on_batch=lambda done: bar.update(done - bar.n),
        )
    summary.skipped = skipped
    summary.seconds = time.monotonic() - started
    return summary
