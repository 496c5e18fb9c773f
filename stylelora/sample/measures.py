"""Style, content and copying of an adapter's renders, measured with the base model's own VAE
encoder: no download, any family.

The images (renders and training images) go through the family's VAE encoder, and the output of
each of its down blocks is one layer of features:

- style: each layer's per-channel mean and standard deviation (the feature statistics of
  Gatys et al.'s Gram matrices reduced to their diagonal and first moment, as in Huang and
  Belongie's AdaIN and IntroStyle's denoiser-feature statistics). A render's style distance is
  the mean relative distance of its statistics to each training image's; `style` is the part of
  the base renders' distance the adapter takes away (0: none; the training images' own distance
  to the others, `Reference.floor`, is as far as it can go).
- content: how much of the base render's layout the adapted render keeps: the correlation of the
  two renders' self-similarity matrices (the cosine between every pair of positions' centred
  feature vectors, as in Tumanyan et al.'s Splice), which a change of colours or texture alone
  leaves mostly as it is (1: the same layout).
- copying: the cosine between a render's whole (pooled) feature maps and those of its nearest
  training image (1: a training image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stylelora.families.base import ModelFamily

# Images are encoded at most this many pixels a side, and each layer pooled to at most this
# many positions a side: the cost stays that of a small encoder pass whatever the model.
MAX_SIDE = 256
MAX_POSITIONS = 16

Layers = list[torch.Tensor]  # one (images, channels, height, width) tensor per layer


def feature_modules(family: ModelFamily) -> list[torch.nn.Module]:
    """The VAE encoder's down blocks (every top-level child where it has none)."""
    encoder = family.vae.encoder
    blocks = getattr(encoder, "down_blocks", None)
    return list(blocks) if blocks is not None else list(encoder.children())


def as_pixels(images: Sequence[Image.Image], side: int) -> torch.Tensor:
    """Images resized to `side` square, as (n, 3, side, side) in [-1, 1]."""
    arrays = [
        np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC))
        for image in images
    ]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1.0


def analysis_side(family: ModelFamily, images: Sequence[Image.Image]) -> int:
    """The side every image is encoded at: the smallest image's, at most MAX_SIDE, on the
    family's size grid."""
    smallest = min(min(image.size) for image in images)
    step = family.size_step * 2
    return max(step, min(smallest, MAX_SIDE) // step * step)


@torch.no_grad()
def vae_features(
    family: ModelFamily, images: Sequence[Image.Image], side: int, batch: int = 8
) -> Layers:
    """Each feature layer of `images`, in float32 on the CPU; a video VAE's frames are folded
    into the height."""
    captured: list[torch.Tensor] = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        for module in feature_modules(family)
    ]
    layers: list[list[torch.Tensor]] = []
    try:
        for start in range(0, len(images), batch):
            captured.clear()
            pixels = as_pixels(images[start : start + batch], side).to(family.vae.device)
            family.encode_posterior(pixels)
            outs = [out[0] if isinstance(out, tuple) else out for out in captured]
            layers.append([fold_frames(out).float().cpu() for out in outs])
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(parts) for parts in zip(*layers, strict=True)]


def fold_frames(features: torch.Tensor) -> torch.Tensor:
    if features.dim() == 5:  # (n, c, frames, h, w)
        n, c, t, h, w = features.shape
        return features.reshape(n, c, t * h, w)
    return features


def pooled(layer: torch.Tensor) -> torch.Tensor:
    """A layer pooled to at most MAX_POSITIONS a side."""
    h, w = layer.shape[-2:]
    if max(h, w) <= MAX_POSITIONS:
        return layer
    return F.adaptive_avg_pool2d(layer, (min(h, MAX_POSITIONS), min(w, MAX_POSITIONS)))


# --- style --------------------------------------------------------------------------------


def style_statistics(layers: Layers) -> Layers:
    """Per layer, each image's channel means and standard deviations: (n, 2 * channels)."""
    stats = []
    for layer in layers:
        flat = layer.flatten(2)
        stats.append(torch.cat([flat.mean(2), flat.std(2, correction=0)], dim=1))
    return stats


def distance_matrix(stats: Layers, reference: Layers) -> torch.Tensor:
    """(n, references): the distances between statistics, each layer's relative to the size
    of the reference's, averaged over the layers."""
    per_layer = []
    for mine, theirs in zip(stats, reference, strict=True):
        scale = theirs.norm(dim=1).mean().clamp_min(1e-8)
        per_layer.append(torch.cdist(mine, theirs) / scale)
    return torch.stack(per_layer).mean(0)


def style_distances(stats: Layers, reference: Layers) -> torch.Tensor:
    """(n,) each image's mean distance to the reference images' statistics."""
    return distance_matrix(stats, reference).mean(1)


def style_floor(reference: Layers) -> float:
    """The reference images' own mean distance to the others: where a render whose style is
    the training set's lands."""
    matrix = distance_matrix(reference, reference)
    count = matrix.shape[0]
    return float(matrix.sum() / (count * (count - 1))) if count > 1 else 0.0


# --- content ------------------------------------------------------------------------------


def self_similarity(layer: torch.Tensor) -> torch.Tensor:
    """(n, positions, positions): the cosine between the centred features of every two
    positions."""
    flat = pooled(layer).flatten(2)
    flat = flat - flat.mean(2, keepdim=True)
    flat = F.normalize(flat, dim=1)
    return flat.transpose(1, 2) @ flat


def content_kept(base: Layers, adapted: Layers) -> torch.Tensor:
    """(n,) the correlation of each pair's self-similarity matrices, averaged over the layers
    (1: the same layout)."""
    per_layer = []
    for one, other in zip(base, adapted, strict=True):
        a = self_similarity(one).flatten(1)
        b = self_similarity(other).flatten(1)
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        per_layer.append(F.cosine_similarity(a, b, dim=1, eps=1e-8))
    return torch.stack(per_layer).mean(0).clamp(-1.0, 1.0)


# --- copying ------------------------------------------------------------------------------


def copy_descriptors(layers: Layers) -> Layers:
    """Per layer, each image's pooled feature map as one unit vector."""
    return [F.normalize(pooled(layer).flatten(1), dim=1) for layer in layers]


def nearest_copy(descriptors: Layers, training: Layers) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) each image's similarity to its nearest training image (1: the same features), and
    (n,) that image's index."""
    pairs = zip(descriptors, training, strict=True)
    similarity = torch.stack([mine @ theirs.T for mine, theirs in pairs])
    best = similarity.mean(0).clamp(-1.0, 1.0).max(1)
    return best.values, best.indices


# --- all three ----------------------------------------------------------------------------


@dataclass
class Reference:
    """What the measures compare with: the training images' statistics and descriptors, and the
    base renders' features, distances and copying."""

    side: int
    train_stats: Layers
    train_descriptors: Layers
    base_layers: Layers
    base_distance: torch.Tensor
    floor: float  # the training images' own style distance to the others
    base_copying: torch.Tensor


@dataclass
class Measures:
    style: float
    content: float
    copying: float
    base_copying: float
    style_distance: float
    base_style_distance: float
    nearest: list[int]  # each render's nearest training image

    def as_dict(self) -> dict[str, float]:
        return {
            "style": round(self.style, 4),
            "content": round(self.content, 4),
            "copying": round(self.copying, 4),
            "base_copying": round(self.base_copying, 4),
        }


def reference(
    family: ModelFamily, training: Sequence[Image.Image], base: Sequence[Image.Image]
) -> Reference:
    """Encode the training images and the base renders once."""
    side = analysis_side(family, [*training, *base])
    train_layers = vae_features(family, training, side)
    train_stats = style_statistics(train_layers)
    train_descriptors = copy_descriptors(train_layers)
    base_layers = vae_features(family, base, side)
    copying, _ = nearest_copy(copy_descriptors(base_layers), train_descriptors)
    return Reference(
        side=side,
        train_stats=train_stats,
        train_descriptors=train_descriptors,
        base_layers=base_layers,
        base_distance=style_distances(style_statistics(base_layers), train_stats),
        floor=style_floor(train_stats),
        base_copying=copying,
    )


def measure(family: ModelFamily, ref: Reference, adapted: Sequence[Image.Image]) -> Measures:
    """Style, content and copying of `adapted`, the base renders' prompts and seeds with the
    adapter, in the order of `ref`'s base renders."""
    layers = vae_features(family, adapted, ref.side)
    distance = style_distances(style_statistics(layers), ref.train_stats)
    copying, nearest = nearest_copy(copy_descriptors(layers), ref.train_descriptors)
    base_distance = float(ref.base_distance.mean())
    return Measures(
        style=1.0 - float(distance.mean()) / max(base_distance, 1e-8),
        content=float(content_kept(ref.base_layers, layers).mean()),
        copying=float(copying.mean()),
        base_copying=float(ref.base_copying.mean()),
        style_distance=float(distance.mean()),
        base_style_distance=base_distance,
        nearest=nearest.tolist(),
    )
