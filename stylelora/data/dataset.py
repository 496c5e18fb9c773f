"""The training dataset and its batch order.

Batches come from a sampler whose order is a pure function of (seed, epoch): a run can be
repeated exactly, and resumed from any position. Each item is addressed by (index, epoch), so
per-draw randomness (flip, crop) is derived from the same seed without hidden global state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from stylelora.data.captions import with_trigger
from stylelora.data.images import load_rgb, resize_and_crop, to_tensor
from stylelora.data.scan import ImageRecord

ItemKey = tuple[int, int]  # (index into the records, epoch)


def derived_generator(*parts: int) -> torch.Generator:
    """A generator seeded from several integers, e.g. (seed, epoch, index)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class DataOptions:
    resolution: int
    center_crop: bool = True
    flip: bool = False
    trigger_word: str = ""
    seed: int = 0


class ImageCaptionDataset(Dataset):
    def __init__(self, records: list[ImageRecord], options: DataOptions):
        self.records = records
        self.options = options

    def __len__(self) -> int:
        return len(self.records)

    def bucket(self, index: int) -> tuple[int, int]:
        """The (width, height) this image trains at."""
        return (self.options.resolution, self.options.resolution)

    def __getitem__(self, key: ItemKey) -> dict[str, Any]:
        index, epoch = key
        record = self.records[index]
        rng = derived_generator(self.options.seed, epoch, index)
        image = load_rgb(record.path)
        original_size = (image.height, image.width)
        offset = (
            (0.5, 0.5) if self.options.center_crop else tuple(torch.rand(2, generator=rng).tolist())
        )
        image, crop_top_left = resize_and_crop(image, self.bucket(index), offset)
        pixels = to_tensor(image)
        if self.options.flip and torch.rand(1, generator=rng).item() < 0.5:
            pixels = pixels.flip(-1)
        return {
            "pixel_values": pixels,
            "caption": with_trigger(record.caption, self.options.trigger_word),
            "original_size": original_size,
            "crop_top_left": crop_top_left,
        }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "captions": [item["caption"] for item in items],
        "original_sizes": [item["original_size"] for item in items],
        "crop_top_lefts": [item["crop_top_left"] for item in items],
    }


class BucketBatchSampler:
    """Shuffled batches, each from one bucket; every image appears `repeats` times an epoch."""

    def __init__(self, dataset: ImageCaptionDataset, batch_size: int, seed: int):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[ItemKey]]:
        rng = derived_generator(self.seed, epoch)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, record in enumerate(self.dataset.records):
            by_bucket.setdefault(self.dataset.bucket(index), []).extend([index] * record.repeats)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            order = torch.randperm(len(indices), generator=rng).tolist()
            shuffled = [indices[i] for i in order]
            for start in range(0, len(shuffled), self.batch_size):
                batches.append([(i, epoch) for i in shuffled[start : start + self.batch_size]])
        order = torch.randperm(len(batches), generator=rng).tolist()
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[list[ItemKey]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return len(self.batches(self.epoch))
