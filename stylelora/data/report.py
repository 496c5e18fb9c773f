"""From the `[data]` config to a scanned dataset, and the report of it that a user reads.

`stylelora dataset check` prints this report alone; `stylelora train` prints it before it
loads any model.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from stylelora.caption.record import author_lines
from stylelora.config import DataConfig
from stylelora.data.buckets import Size, cover_scale, format_histogram, histogram, make_buckets
from stylelora.data.captions import CaptionOptions
from stylelora.data.dataset import DataOptions, ImageCaptionDataset
from stylelora.data.scan import ScanResult, check_hint, collect_images, require_usable


def collect_dataset(data: DataConfig, key: str = "data.dir") -> ScanResult:
    """Scan `data.dir`; unusable files are listed in the result, not raised. `key`: the
    setting that named the folder, for the errors (validation.dir scans with data's options)."""
    return collect_images(
        data.dir,
        data.caption_extension,
        data.repeats,
        min_image_size=data.min_image_size,
        strict=data.strict,
        trigger_word=data.trigger_word,
        key=key,
    )


def scan_dataset(data: DataConfig, key: str = "data.dir") -> ScanResult:
    """Scan `data.dir`; raises UserError when nothing is usable (or anything is not, strict)."""
    scan = collect_dataset(data, key)
    require_usable(scan, data.dir, data.strict, check_hint(data.dir), key)
    return scan


def bucket_sets(data: DataConfig) -> tuple[tuple[int, tuple[Size, ...]], ...]:
    """Each training resolution with its buckets (none with bucketing off), smallest first."""
    return tuple(
        (
            resolution,
            tuple(make_buckets(resolution, data.bucket_step, *data.bucket_sides(resolution)))
            if data.enable_buckets
            else (),
        )
        for resolution in data.resolutions
    )


def data_options(data: DataConfig, seed: int) -> DataOptions:
    sets = bucket_sets(data)
    resolution, buckets = sets[-1]
    return DataOptions(
        resolution=resolution,
        center_crop=data.center_crop,
        flip=data.flip,
        trigger_word=data.trigger_word,
        seed=seed,
        captions=CaptionOptions(
            trigger_word=data.trigger_word,
            shuffle=data.shuffle_caption,
            keep_tokens=data.keep_tokens,
            dropout_rate=data.caption_dropout_rate,
            tag_dropout_rate=data.caption_tag_dropout_rate,
        ),
        buckets=buckets,
        bucket_sets=sets if len(sets) > 1 else (),
        bucket_no_upscale=data.bucket_no_upscale,
        bucket_step=data.bucket_step,
        alpha_background=data.alpha_background,
        masks="folder" if data.mask_dir else "alpha" if data.alpha_mask else "none",
        data_dir=data.dir,
        mask_dir=data.mask_dir,
    )


def describe(scan: ScanResult, dataset: ImageCaptionDataset, data: DataConfig) -> list[str]:
    """Image and draw counts, repeats per concept, caption coverage, buckets, skipped files."""
    records = scan.records
    draws = sum(dataset.draws[: dataset.first_prior])  # at every resolution
    lines = [f"dataset: {len(records)} images, {draws} draws per epoch, from {data.dir}"]
    concepts = Counter((record.concept, record.repeats) for record in records)
    for (concept, repeats), count in sorted(concepts.items()):
        lines.append(f"  concept {concept!r}: {count} images x {repeats} repeats")
    captioned = len(records) - scan.missing_captions
    lines.append(f"captions: {captioned}/{len(records)} images have one")
    lines += author_lines(data.dir, caption_files(scan, data.caption_extension))
    if scan.missing_captions:
        lines.append(
            f"  {scan.missing_captions} images have no caption: "
            "using their concept name (or the trigger word outside N_concept folders)"
        )
    kind = "aspect buckets" if data.enable_buckets else "buckets (bucketing off)"
    lines.append(f"{kind} (width x height: images):")
    lines += bucket_lines(dataset, data)
    lines += upscale_lines(dataset) + cp1252_lines(scan, data) + orphan_lines(scan, data)
    return lines + problem_lines(scan)


def prior_lines(dataset: ImageCaptionDataset, cfg) -> list[str]:
    """'regularisation: 12 images, 24 draws per epoch (as many as the training images), ...'."""
    priors = range(dataset.first_prior, len(dataset))
    if not priors:
        return []
    draws = sum(dataset.draws[index] for index in priors)
    drawn: dict[Path, int] = {}  # an image's draws at every resolution
    for index in priors:
        path = dataset.records[index].path
        drawn[path] = drawn.get(path, 0) + dataset.draws[index]
    unused = sum(1 for count in drawn.values() if count == 0)
    line = (
        f"regularisation: {len(drawn)} images, {draws} draws per epoch (as many as the "
        f"training images), loss weight {cfg.train.prior_loss_weight:g}, from {cfg.data.reg_dir}"
    )
    return [line] + (
        [f"  {unused} of them are not drawn: more than the training draws"] if unused else []
    )


def caption_files(scan: ScanResult, extension: str) -> list[Path]:
    """The caption files beside the usable images."""
    files = (record.path.with_suffix(extension) for record in scan.records)
    return [path for path in files if path.is_file()]


def bucket_lines(dataset: ImageCaptionDataset, data: DataConfig) -> list[str]:
    """The bucket histogram; with several resolutions, one per resolution, then the images
    that skip a resolution."""
    if len(data.resolutions) == 1:
        return format_histogram(histogram(dataset.buckets))
    lines = []
    for resolution in data.resolutions:
        buckets = [dataset.bucket(index) for index in dataset.at_resolution(resolution)]
        lines.append(f"  at {resolution} px: {len(buckets)} images")
        lines += ["  " + line for line in format_histogram(histogram(buckets))]
    return lines + skipped_resolution_lines(dataset, data)


def skipped_resolution_lines(dataset: ImageCaptionDataset, data: DataConfig) -> list[str]:
    """'at 1024 px, 2 images have fewer pixels than 1024x1024 and train only below it: ...'."""
    smallest, *larger = data.resolutions
    every = [dataset.records[index].path for index in dataset.at_resolution(smallest)]
    lines = []
    for resolution in larger:
        taking_part = {dataset.records[i].path for i in dataset.at_resolution(resolution)}
        skipped = [path for path in every if path not in taking_part]
        if skipped:
            names = ", ".join(shown_path(path, data) for path in skipped[:5])
            more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
            lines.append(
                f"at {resolution} px, {len(skipped)} images have fewer pixels than "
                f"{resolution}x{resolution} and train only below it: {names}{more}"
            )
    return lines


def shown_path(path: Path, data: DataConfig) -> str:
    """A path relative to the folder it was found in (data.dir or data.reg_dir)."""
    for folder in (data.dir, data.reg_dir):
        if folder is not None and path.is_relative_to(folder):
            return str(path.relative_to(folder))
    return str(path)


def upscales(dataset: ImageCaptionDataset) -> list[tuple[int, float]]:
    """(item, how much it is scaled up to cover its bucket) for each item scaled up."""
    found = []
    for index, (record, bucket) in enumerate(zip(dataset.records, dataset.buckets, strict=True)):
        scale = cover_scale(record.size, bucket) if 0 not in record.size else 1.0
        if scale > 1:
            found.append((index, scale))
    return found


def upscale_lines(dataset: ImageCaptionDataset) -> list[str]:
    """'18 images upscaled to fit their bucket (x2.7 to x3.2)', or nothing."""
    scales = sorted(scale for _, scale in upscales(dataset))
    if not scales:
        return []
    low, high = format_scale(scales[0]), format_scale(scales[-1])
    span = low if low == high else f"{low} to {high}"
    images = "image upscaled to fit its" if len(scales) == 1 else "images upscaled to fit their"
    return [f"{len(scales)} {images} bucket ({span})"]


def format_scale(scale: float) -> str:
    """x2.7; two decimals where one would round a small upscale down to x1.0."""
    return f"x{scale:.1f}" if round(scale, 1) > 1 else f"x{scale:.2f}"


def cp1252_lines(scan: ScanResult, data: DataConfig) -> list[str]:
    """'2 caption files were not UTF-8 and were read as cp1252: a.txt, b.txt', or nothing."""
    if not scan.cp1252_files:
        return []
    names = ", ".join(str(path.relative_to(data.dir)) for path in scan.cp1252_files)
    count = len(scan.cp1252_files)
    files, were = ("caption file", "was") if count == 1 else ("caption files", "were")
    return [f"{count} {files} {were} not UTF-8 and {were} read as cp1252: {names}"]


def orphan_lines(scan: ScanResult, data: DataConfig) -> list[str]:
    """'1 caption file has no image beside it: old.txt', or nothing."""
    if not scan.orphan_captions:
        return []
    names = ", ".join(str(path.relative_to(data.dir)) for path in scan.orphan_captions)
    count = len(scan.orphan_captions)
    words = NO_IMAGE if count == 1 else "caption files have no image beside them"
    return [f"{count} {words}: {names}"]


def file_notes(
    scan: ScanResult, dataset: ImageCaptionDataset, data: DataConfig
) -> list[tuple[Path, str]]:
    """Each file the report's lines count, with what they say of it, in their words: images
    upscaled, images with no caption, images that skip a resolution, captions read as cp1252,
    caption files with no image."""
    return (
        upscale_notes(dataset, len(data.resolutions) > 1)
        + [(path, UNCAPTIONED) for path in scan.uncaptioned]
        + skipped_resolution_notes(dataset, data)
        + [(path, READ_AS_CP1252) for path in scan.cp1252_files]
        + [(path, NO_IMAGE) for path in scan.orphan_captions]
    )


UNCAPTIONED = (
    "has no caption: using its concept name (or the trigger word outside N_concept folders)"
)
READ_AS_CP1252 = "caption file was not UTF-8 and was read as cp1252"
NO_IMAGE = "caption file has no image beside it"


def upscale_notes(dataset: ImageCaptionDataset, several: bool) -> list[tuple[Path, str]]:
    notes = []
    for index, scale in upscales(dataset):
        at = f"at {dataset.resolutions[index]} px: " if several else ""
        path = dataset.records[index].path
        notes.append((path, f"{at}upscaled to fit its bucket ({format_scale(scale)})"))
    return notes


def skipped_resolution_notes(
    dataset: ImageCaptionDataset, data: DataConfig
) -> list[tuple[Path, str]]:
    smallest, *larger = data.resolutions
    every = [dataset.records[index].path for index in dataset.at_resolution(smallest)]
    notes = []
    for resolution in larger:
        taking_part = {dataset.records[i].path for i in dataset.at_resolution(resolution)}
        words = f"at {resolution} px: has fewer pixels than {resolution}x{resolution} and "
        notes += [(path, words + "trains only below it") for path in every
                  if path not in taking_part]  # fmt: skip
    return notes


def problem_lines(scan: ScanResult) -> list[str]:
    """'skipped 2 files:' and each one with why, or nothing."""
    if not scan.problems:
        return []
    lines = [f"skipped {len(scan.problems)} files:"]
    return lines + [f"  {path}: {problem}" for path, problem in scan.problems]
