"""From the `[data]` config to a scanned dataset, and the report of it that a user reads.

`stylelora dataset check` prints this report alone; `stylelora train` prints it before it
loads any model.
"""

from __future__ import annotations

from collections import Counter

from stylelora.config import DataConfig
from stylelora.data.buckets import format_histogram, histogram, make_buckets
from stylelora.data.captions import CaptionOptions
from stylelora.data.dataset import DataOptions, ImageCaptionDataset
from stylelora.data.scan import ScanResult, scan_folder


def scan_dataset(data: DataConfig) -> ScanResult:
    """Scan `data.dir`; raises UserError when nothing is usable (or anything is, when strict)."""
    min_side = 0
    if data.enable_buckets:
        min_side = data.bucket_step if data.bucket_no_upscale else data.bucket_sides()[0]
    return scan_folder(
        data.dir,
        data.caption_extension,
        data.repeats,
        min_side=min_side,
        strict=data.strict,
        trigger_word=data.trigger_word,
    )


def data_options(data: DataConfig, seed: int) -> DataOptions:
    buckets = make_buckets(data.resolution, data.bucket_step, *data.bucket_sides())
    return DataOptions(
        resolution=data.resolution,
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
        buckets=tuple(buckets) if data.enable_buckets else (),
        bucket_no_upscale=data.bucket_no_upscale,
        bucket_step=data.bucket_step,
        alpha_background=data.alpha_background,
    )


def describe(scan: ScanResult, dataset: ImageCaptionDataset, data: DataConfig) -> list[str]:
    """Image and draw counts, repeats per concept, caption coverage, buckets, skipped files."""
    records = scan.records
    draws = sum(record.repeats for record in records)
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
    lines += format_histogram(histogram(dataset.buckets))
    if scan.problems:
        lines.append(f"skipped {len(scan.problems)} files:")
    lines += [f"  {path}: {reason}" for path, reason in scan.problems]
    return lines
