"""From the `[data]` config to a scanned dataset, and the report of it that a user reads.

`stylelora dataset check` prints this report alone; `stylelora train` prints it before it
loads any model.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

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
    if scan.missing_captions:
        lines.append(
            f"  {scan.missing_captions} images have no caption: "
            "using their concept name (or the trigger word outside N_concept folders)"
        )
    kind = "aspect buckets" if data.enable_buckets else "buckets (bucketing off)"
    lines.append(f"{kind} (width x height: images):")
    lines += bucket_lines(dataset, data)
    lines += upscale_lines(dataset) + cp1252_lines(scan, data) + problem_lines(scan)
    return lines


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


def upscale_lines(dataset: ImageCaptionDataset) -> list[str]:
    """'18 images upscaled to fit their bucket (x2.7 to x3.2)', or nothing."""
    scales = [
        cover_scale(record.size, bucket)
        for record, bucket in zip(dataset.records, dataset.buckets, strict=True)
        if 0 not in record.size
    ]
    scales = sorted(scale for scale in scales if scale > 1)
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


def problem_lines(scan: ScanResult) -> list[str]:
    """'skipped 2 files:' and each one with why, or nothing."""
    if not scan.problems:
        return []
    lines = [f"skipped {len(scan.problems)} files:"]
    return lines + [f"  {path}: {problem}" for path, problem in scan.problems]
