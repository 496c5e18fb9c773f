"""Caches of what the frozen model computes from the data: VAE latents on disk, captions in memory.

A latent entry is one safetensors file named by a hash of everything that changes it: the image
file's bytes, its bucket, the crop (centre: a cache needs a fixed crop), the flip, the alpha
background, and the VAE (its config, a few weight tensors, its dtype). A changed image or
setting misses the cache and is encoded again; the rest is reused across runs.

An entry keeps the posterior's mean and std, not a sample: each step still samples the latents
with that step's generator, so a cached run draws what an uncached one draws and the posterior's
noise stays part of training.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from stylelora.config import Config
from stylelora.data.dataset import ImageCaptionDataset
from stylelora.errors import UserError
from stylelora.export.atomic import save_tensors
from stylelora.families.base import ModelFamily
from stylelora.train.loss import mask_on_latents
from stylelora.train.progress import ProgressLog

Entry = tuple[int, bool]  # (index into the dataset, flipped)


@dataclass(frozen=True)
class CachePlan:
    """Which caches a run fills, and a line for each one that is off, saying why."""

    latents: bool
    text: bool
    notes: tuple[str, ...] = ()


def latents_cache_dir(cfg: Config) -> Path:
    return cfg.data.cache_dir or cfg.data.dir / ".stylelora-cache"


def cache_plan(cfg: Config) -> CachePlan:
    """`auto` turns a cache on wherever it cannot change what a step trains on: latents when
    every draw of an image is the same crop (a flip is cached as its own entry), caption
    embeddings when the text encoders are frozen and captions never vary."""
    data, notes = cfg.data, []
    latents = data.cache_latents is True
    if data.cache_latents == "auto":
        folder = latents_cache_dir(cfg)
        if not data.center_crop:
            notes.append("latents cache off: data.center_crop = false crops anew at every draw")
        elif not writable(folder):
            notes.append(f"latents cache off: {folder} is not writable; set data.cache_dir")
        else:
            latents = True
    elif not latents:
        notes.append("latents cache off: data.cache_latents = false")
    text = data.cache_text_encoder_outputs is not False
    if not text:
        notes.append("text cache off: data.cache_text_encoder_outputs = false")
    elif cfg.adapter.text_encoder:
        notes.append("text cache off: adapter.text_encoder trains the text encoder")
        text = False
    elif data.caption_randomness:
        notes.append("text cache off: caption shuffling or dropout changes captions every draw")
        text = False
    return CachePlan(latents, text, tuple(notes))


def writable(folder: Path) -> bool:
    """Whether `folder` can be written, or made in the nearest folder above it that exists."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK)


@dataclass
class CacheStats:
    encoded: int = 0
    reused: int = 0


def vae_identity(vae: torch.nn.Module) -> str:
    """A fingerprint of the VAE: its config, its dtype and the bytes of a few weight tensors."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    params = list(vae.parameters())
    for param in (params[0], params[len(params) // 2], params[-1]):
        digest.update(str(param.dtype).encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def entry_name(dataset: ImageCaptionDataset, index: int, flipped: bool, vae_id: str) -> str:
    key = {
        "file": file_digest(dataset.records[index].path),
        "bucket": dataset.bucket(index),
        "crop": "centre",
        "flipped": flipped,
        "background": dataset.options.alpha_background,
        "vae": vae_id,
        "layout": "recorded",  # entries of earlier versions lack the latents' layout
        "mask": mask_identity(dataset, index),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest() + ".safetensors"


def mask_identity(dataset: ImageCaptionDataset, index: int) -> str | None:
    """What an entry's mask comes from: the mask file's bytes, or the image's transparency."""
    if dataset.mask_paths is not None:
        return file_digest(dataset.mask_paths[index])
    return "alpha" if dataset.options.masks == "alpha" else None


def cache_latents(
    family: ModelFamily,
    dataset: ImageCaptionDataset,
    cache_dir: Path,
    batch_size: int,
    show_progress: bool = True,
    events: ProgressLog | None = None,
) -> CacheStats:
    """Encode what the cache lacks, in batches of one bucket, then hand every entry to
    `dataset.cache`, which from then on serves latents instead of pixels. `events`: where the
    phase and its progress are written."""
    vae_id = vae_identity(family.vae)
    flips = (False, True) if dataset.options.flip else (False,)
    files = {
        (index, flipped): cache_dir / entry_name(dataset, index, flipped, vae_id)
        for index in range(len(dataset))
        for flipped in flips
    }
    missing = [entry for entry, path in files.items() if not path.is_file()]
    stats = CacheStats(encoded=len(missing), reused=len(files) - len(missing))
    phase = (
        events.phase("caching latents", len(missing)) if events else nullcontext(lambda count: None)
    )
    bar = tqdm(total=len(missing), desc="caching latents", disable=not show_progress)
    with bar as progress, phase as advance:
        for batch in bucket_batches(dataset, missing, batch_size):
            try:
                encode_and_save(family, dataset, batch, files)
            except UserError as exc:  # a full disk: say where there is room to give
                raise UserError(
                    f"{exc}; free some space there, or set data.cache_dir to a disk with room"
                ) from None
            progress.update(len(batch))
            advance(len(batch))
    dataset.cache = CachedEntries(files)
    return stats


def bucket_batches(
    dataset: ImageCaptionDataset, entries: list[Entry], batch_size: int
) -> list[list[Entry]]:
    by_bucket: dict[tuple[int, int], list[Entry]] = {}
    for entry in entries:
        by_bucket.setdefault(dataset.bucket(entry[0]), []).append(entry)
    return [
        group[start : start + batch_size]
        for group in by_bucket.values()
        for start in range(0, len(group), batch_size)
    ]


@torch.no_grad()
def encode_and_save(
    family: ModelFamily,
    dataset: ImageCaptionDataset,
    batch: list[Entry],
    files: dict[Entry, Path],
) -> None:
    items = [dataset.pixels(index, (0.5, 0.5), flipped) for index, flipped in batch]
    pixels = torch.stack([item["pixel_values"] for item in items]).to(family.vae.device)
    means, stds = family.encode_posterior(pixels)
    metadata = {"latent_layout": sampled_layout(means, stds)}
    for row, (entry, item) in enumerate(zip(batch, items, strict=True)):
        tensors = {
            "latent_mean": means[row].contiguous().cpu(),
            "latent_std": stds[row].contiguous().cpu(),
            "original_size": torch.tensor(item["original_size"]),
            "crop_top_left": torch.tensor(item["crop_top_left"]),
        }
        if "mask" in item:  # kept at the latents' size, as the loss weighs them
            tensors["mask"] = mask_on_latents(item["mask"][None], means.shape[-2:])[0].contiguous()
        save_tensors(tensors, files[entry], metadata)


def sampled_layout(mean: torch.Tensor, std: torch.Tensor) -> str:
    """How the latents sampled from the VAE's posterior are laid out in memory: oneDNN's
    convolutions on the CPU hand them over channels-last. A cache entry records it and the
    latents drawn from it are laid out alike, so the denoiser's kernels sum in the same order
    and a cached run trains an uncached run's adapter, bitwise. The sum is the one
    DiagonalGaussianDistribution.sample() makes, with zeros for its noise."""
    latents = mean + std * torch.zeros(mean.shape, dtype=mean.dtype, device=mean.device)
    channels_last = latents.dim() == 4 and not latents.is_contiguous()
    if channels_last and latents.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "contiguous"


class CachedEntries(Mapping):
    """Entries read from disk when a batch asks for them, so a large dataset's latents never
    sit in memory all at once; `keep_in_memory` keeps each entry once read."""

    def __init__(self, files: dict[Entry, Path]):
        self.files = files
        self.memory: dict[Entry, dict] | None = None

    def __getitem__(self, entry: Entry) -> dict:
        if self.memory is None:
            return read_entry(self.files[entry])
        if entry not in self.memory:
            self.memory[entry] = read_entry(self.files[entry])
        return self.memory[entry]

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def nbytes(self) -> int:
        """About what every entry takes in memory: their files' sizes."""
        return sum(path.stat().st_size for path in self.files.values())

    def keep_in_memory(self) -> None:
        if self.memory is None:
            self.memory = {}


def read_entry(path: Path) -> dict:
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
            layout = (f.metadata() or {}).get("latent_layout", "contiguous")
    except (OSError, SafetensorError) as exc:
        raise UserError(
            f"{path}: latents cache entry unreadable ({exc}); delete the cache folder "
            "and run again to rebuild it"
        ) from None
    entry = {
        "latent_mean": tensors["latent_mean"],
        "latent_std": tensors["latent_std"],
        "latent_layout": layout,
        "original_size": tuple(tensors["original_size"].tolist()),
        "crop_top_left": tuple(tensors["crop_top_left"].tolist()),
    }
    if "mask" in tensors:
        entry["mask"] = tensors["mask"]
    return entry


class TextCache:
    """Each distinct caption encoded once, for frozen text encoders and captions that never vary."""

    def __init__(self, family: ModelFamily, captions: list[str]):
        self.family = family
        self.outputs: dict[str, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for caption in dict.fromkeys(captions):
                self.outputs[caption] = family.encode_prompts([caption])

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return self.family.join_prompts([self.outputs[caption] for caption in captions])
