"""The training dataset and its batch order.

Batches come from a sampler whose order is a pure function of (seed, epoch): a run can be
repeated exactly, and resumed from any position. Each item is addressed by (index, epoch), so
per-draw randomness (crop, flip, caption) is derived from the same seed without hidden global
state, always drawn in that order and only for the options that are on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from stylelora.data.buckets import Size, closest_bucket, fills_resolution, no_upscale_bucket
from stylelora.data.captions import CaptionOptions, process_caption, with_trigger
from stylelora.data.images import covering_size, crop, load_rgb_alpha, scale_to_cover, to_tensor
from stylelora.data.masks import find_masks, load_mask
from stylelora.data.regularisation import regularisation_draws
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
    captions: CaptionOptions | None = None  # None: the trigger word only
    buckets: tuple[Size, ...] = ()  # empty: every image trains at resolution x resolution
    bucket_no_upscale: bool = False
    bucket_step: int = 64
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    masks: Literal["none", "alpha", "folder"] = "none"  # see stylelora.data.masks
    data_dir: Path | None = None  # the images' root and the masks' folder, for "folder"
    mask_dir: Path | None = None
    # several resolutions (data.resolution as a list): each with its buckets, smallest first;
    # empty: `resolution` with `buckets` alone
    bucket_sets: tuple[tuple[int, tuple[Size, ...]], ...] = ()

    def resolution_sets(self) -> tuple[tuple[int, tuple[Size, ...]], ...]:
        """Each training resolution with its buckets, smallest first."""
        return self.bucket_sets or ((self.resolution, self.buckets),)


# (index, flipped) -> precomputed tensors of that image (e.g. latents) that replace its pixels
TensorCache = Mapping[tuple[int, bool], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Scaled:
    """An image decoded and scaled to cover its bucket, its mask scaled alike (or None), and
    the image's original (height, width)."""

    image: Image.Image
    mask: Image.Image | None
    original_size: tuple[int, int]


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """An 8-bit mask as a float tensor (1, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None].contiguous()


class ImageCaptionDataset(Dataset):
    """The training images, then any regularisation images (`priors`): an item says which it
    is, and a prior's caption never takes the trigger word.

    An item is an image at one resolution: with several, an image is an item at each one it
    fills (see `fills_resolution`) and at the smallest, resolution by resolution, so `records`
    holds an image once per resolution it trains at and `resolutions` says which."""

    def __init__(
        self,
        records: list[ImageRecord],
        options: DataOptions,
        priors: list[ImageRecord] | tuple[ImageRecord, ...] = (),
    ):
        training, prior_items = self._items(records, options), self._items(priors, options)
        self.records = [record for record, _ in training + prior_items]
        self.resolutions = [resolution for _, resolution in training + prior_items]
        self.first_prior = len(training)
        self.options = options
        self.captions = options.captions or CaptionOptions(trigger_word=options.trigger_word)
        self.prior_captions = replace(self.captions, trigger_word="")
        # draws of each item an epoch: its repeats; priors as many in all as the training
        # images, at each resolution
        self.draws = [record.repeats for record, _ in training] + prior_draws(training, prior_items)
        bucket_sets = dict(options.resolution_sets())
        self.buckets = [
            self._assign_bucket(record, resolution, bucket_sets[resolution])
            for record, resolution in zip(self.records, self.resolutions, strict=True)
        ]
        self.mask_paths = (
            find_masks(self.records, options.data_dir, options.mask_dir)
            if options.masks == "folder"
            else None
        )
        self.cache: TensorCache | None = None
        # index -> the image and its mask scaled to cover its bucket, and the image's original
        # (height, width): filled as images are first drawn once `keep_images_in_memory` is on
        self.memory: dict[int, Scaled] | None = None

    @staticmethod
    def _items(
        records: list[ImageRecord] | tuple[ImageRecord, ...], options: DataOptions
    ) -> list[tuple[ImageRecord, int]]:
        """(image, resolution) for each resolution an image trains at, resolution by resolution:
        every image at the smallest, at the others only the images that fill them."""
        smallest, *larger = [resolution for resolution, _ in options.resolution_sets()]
        items = [(record, smallest) for record in records]
        for resolution in larger:
            items += [(r, resolution) for r in records if fills_resolution(r.size, resolution)]
        return items

    def __len__(self) -> int:
        return len(self.records)

    def _assign_bucket(
        self, record: ImageRecord, resolution: int, buckets: tuple[Size, ...]
    ) -> Size:
        if not buckets or 0 in record.size:
            return (resolution, resolution)
        if self.options.bucket_no_upscale:
            return no_upscale_bucket(record.size, resolution, self.options.bucket_step)
        return closest_bucket(record.size, list(buckets))

    def is_prior(self, index: int) -> bool:
        return index >= self.first_prior

    def caption_options(self, index: int) -> CaptionOptions:
        return self.prior_captions if self.is_prior(index) else self.captions

    def fixed_caption(self, index: int) -> str:
        """The caption every draw reads when no caption option varies it."""
        return with_trigger(self.records[index].caption, self.caption_options(index).trigger_word)

    def at_resolution(self, resolution: int) -> list[int]:
        """The items that train at `resolution`."""
        return [index for index, r in enumerate(self.resolutions) if r == resolution]

    def bucket(self, index: int) -> Size:
        """The (width, height) this image trains at."""
        return self.buckets[index]

    def pixels(
        self, index: int, offset: tuple[float, float], flipped: bool = False
    ) -> dict[str, Any]:
        """The image cropped to its bucket (mirrored if `flipped`), with its SDXL size
        conditioning, and its loss mask cropped alike (in [0, 1]) when the dataset has masks."""
        scaled = self.scaled_image(index)
        image, crop_top_left = crop(scaled.image, self.bucket(index), offset)
        item = {
            "pixel_values": to_tensor(image),
            "original_size": scaled.original_size,
            "crop_top_left": crop_top_left,
        }
        if scaled.mask is not None:
            mask, _ = crop(scaled.mask, self.bucket(index), offset)
            item["mask"] = mask_tensor(mask)
        if flipped:
            for key in ("pixel_values", "mask"):
                if key in item:
                    item[key] = item[key].flip(-1)
        return item

    def scaled_image(self, index: int) -> Scaled:
        """The image (and its mask) decoded and scaled to cover its bucket; from memory when it
        is kept there."""
        if self.memory is not None and index in self.memory:
            return self.memory[index]
        image, alpha = load_rgb_alpha(self.records[index].path, self.options.alpha_background)
        bucket = self.bucket(index)
        mask = None
        if self.options.masks == "alpha":
            mask = alpha if alpha is not None else Image.new("L", image.size, 255)
        elif self.mask_paths is not None:
            mask = load_mask(self.mask_paths[index], image.size)
        scaled = Scaled(
            scale_to_cover(image, bucket),
            None if mask is None else scale_to_cover(mask, bucket, Image.Resampling.BILINEAR),
            (image.height, image.width),
        )
        if self.memory is not None:
            self.memory[index] = scaled
        return scaled

    def scaled_bytes(self) -> int:
        """What every image takes in memory, decoded and scaled to cover its bucket."""
        total = 0
        for index, record in enumerate(self.records):
            bucket = self.bucket(index)
            width, height = covering_size(record.size, bucket) if all(record.size) else bucket
            total += width * height * (3 if self.options.masks == "none" else 4)
        return total

    def keep_images_in_memory(self) -> None:
        """From now on, each image is decoded and scaled once, then served from memory (a
        DataLoader worker keeps its own copy)."""
        if self.memory is None:
            self.memory = {}

    def __getitem__(self, key: ItemKey) -> dict[str, Any]:
        index, epoch = key
        rng = derived_generator(self.options.seed, epoch, index)
        offset = (
            (0.5, 0.5) if self.options.center_crop else tuple(torch.rand(2, generator=rng).tolist())
        )
        flipped = self.options.flip and torch.rand(1, generator=rng).item() < 0.5
        if self.cache is not None:
            item = dict(self.cache[(index, flipped)])
        else:
            item = self.pixels(index, offset, flipped)
        width, height = self.bucket(index)
        item["target_size"] = (height, width)
        item["caption"] = process_caption(
            self.records[index].caption, self.caption_options(index), rng
        )
        item["prior"] = self.is_prior(index)
        return item


def prior_draws(
    training: list[tuple[ImageRecord, int]], priors: list[tuple[ImageRecord, int]]
) -> list[int]:
    """Each prior item's draws an epoch: kohya's fill (`regularisation_draws`) done at each
    resolution, up to the training draws at that resolution."""
    draws = [0] * len(priors)
    for resolution in dict.fromkeys(resolution for _, resolution in priors):
        at = [index for index, (_, r) in enumerate(priors) if r == resolution]
        wanted = sum(record.repeats for record, r in training if r == resolution)
        fill = regularisation_draws([priors[index][0].repeats for index in at], wanted)
        for index, count in zip(at, fill, strict=True):
            draws[index] = count
    return draws


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "captions": [item["caption"] for item in items],
        "original_sizes": [item["original_size"] for item in items],
        "crop_top_lefts": [item["crop_top_left"] for item in items],
        "target_sizes": [item["target_size"] for item in items],
    }
    for key in ("pixel_values", "latent_mean", "latent_std", "mask"):
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    batch["prior"] = torch.tensor([item["prior"] for item in items])
    if "latent_layout" in items[0]:
        batch["latent_layout"] = items[0]["latent_layout"]
    return batch


class BucketBatchSampler:
    """Shuffled batches, each from one bucket; every image appears `repeats` times an epoch.

    With several processes each global batch (`batch_size` x `num_replicas` samples of one
    bucket) is cut into one slice per process, so a step trains on the same samples however
    many processes share it; a bucket's short last batch repeats its own samples to fill up.
    """

    def __init__(
        self,
        dataset: ImageCaptionDataset,
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[ItemKey]]:
        """The global batches of `epoch`, in order."""
        rng = derived_generator(self.seed, epoch)
        size = self.batch_size * self.num_replicas
        by_bucket: dict[Size, list[int]] = {}
        for index, draws in enumerate(self.dataset.draws):
            by_bucket.setdefault(self.dataset.bucket(index), []).extend([index] * draws)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            order = torch.randperm(len(indices), generator=rng).tolist()
            shuffled = [indices[i] for i in order]
            for start in range(0, len(shuffled), size):
                batches.append([(i, epoch) for i in shuffled[start : start + size]])
        order = torch.randperm(len(batches), generator=rng).tolist()
        return [batches[i] for i in order]

    def shard(self, batch: list[ItemKey]) -> list[ItemKey]:
        """This process's slice of a global batch."""
        if self.num_replicas == 1:
            return batch
        full = [batch[i % len(batch)] for i in range(self.batch_size * self.num_replicas)]
        return full[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[ItemKey]]:
        return iter([self.shard(batch) for batch in self.batches(self.epoch)])

    def __len__(self) -> int:
        return len(self.batches(self.epoch))
