"""Style, content and copying of an adapter's renders, measured with the base model's own VAE
encoder: no download, any family.

The images (renders and training images) go through the family's VAE encoder, and the output of
each of its down blocks is one layer of features:

- style: each layer's per-channel mean and standard deviation over the picture (the two
  statistics AdaIN transfers and IntroStyle reads from a diffusion model's features; the std is
  the diagonal of Gatys et al.'s Gram matrix of the centred features). A
  render's style distance is its mean distance to the NEAREST training images' statistics (a
  style set holds several palettes and subjects: the nearest few, not the average of all);
  `style` is the part of the base renders' distance the adapter takes away (0: none; the
  training images' own distance to their nearest others, `Reference.floor`, is about as far as
  it goes).
- content: how much of the base render's layout the adapted render keeps: in the finer layers,
  each position's distance from the picture's surroundings (the median feature of its border)
  is a map of where the subject stands out; `content` is the correlation of the base render's
  map with the adapted render's (1: the subject stands where, and as, it stood), which a change
  of palette or texture alone moves less than a redrawn subject.
- copying: the cosine between a render's (pooled, centred) feature maps and those of its
  nearest training image (1: a training image).
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
NEAREST = 3  # training images a render's style is compared with

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
    """Per layer, each image's channel means and standard deviations: (n, 2 * channels). (The
    standard deviations alone followed the demo's palette distance well on one seed's renders
    and badly on the other's; with the means, alike on both: benchmarks/checkpoint_pick.py.)"""
    flat = [layer.flatten(2) for layer in layers]
    return [torch.cat([f.mean(2), f.std(2, correction=0)], dim=1) for f in flat]


def distance_matrix(stats: Layers, reference: Layers) -> torch.Tensor:
    """(n, references): the distances between statistics, each layer's relative to the size
    of the reference's, averaged over the layers."""
    per_layer = []
    for mine, theirs in zip(stats, reference, strict=True):
        scale = theirs.norm(dim=1).mean().clamp_min(1e-8)
        per_layer.append(torch.cdist(mine, theirs) / scale)
    return torch.stack(per_layer).mean(0)


def style_distances(stats: Layers, reference: Layers) -> torch.Tensor:
    """(n,) each image's mean distance to its NEAREST reference images' statistics."""
    matrix = distance_matrix(stats, reference)
    return matrix.topk(min(NEAREST, matrix.shape[1]), dim=1, largest=False).values.mean(1)


def style_floor(reference: Layers) -> float:
    """The reference images' own distance to their nearest others: about where a render whose
    style is the training set's lands."""
    matrix = distance_matrix(reference, reference)
    if matrix.shape[0] < 2:
        return 0.0
    matrix.fill_diagonal_(float("inf"))  # each image's distance to itself
    nearest = matrix.topk(min(NEAREST, matrix.shape[1] - 1), dim=1, largest=False).values
    return float(nearest.mean())


# --- content ------------------------------------------------------------------------------


def layout_map(layer: torch.Tensor) -> torch.Tensor:
    """(n, positions): how far each position's features are (cosine distance) from the picture's
    surroundings, the median feature of its border: where the subject stands out, and how much."""
    features = pooled(layer)
    border = torch.zeros(features.shape[-2:], dtype=torch.bool)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    surroundings = features[:, :, border].median(2).values[:, :, None, None]
    distance = 1 - F.cosine_similarity(features, surroundings.expand_as(features), dim=1)
    return distance.flatten(1)


def fine_layers(layers: Layers) -> Layers:
    """The layers at least half as fine as the finest: the layout, not what the subject is."""
    finest = max(layer.shape[-1] for layer in layers)
    return [layer for layer in layers if 2 * layer.shape[-1] >= finest]


def content_kept(base: Layers, adapted: Layers) -> torch.Tensor:
    """(n,) the correlation of each pair's layout maps over the fine layers, averaged (1: the
    subject stands where, and as, it stood)."""
    per_layer = []
    for one, other in zip(fine_layers(base), fine_layers(adapted), strict=True):
        a, b = layout_map(one), layout_map(other)
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        per_layer.append(F.cosine_similarity(a, b, dim=1, eps=1e-8))
    return torch.stack(per_layer).mean(0).clamp(-1.0, 1.0)


# --- copying ------------------------------------------------------------------------------


def copy_descriptors(layers: Layers) -> Layers:
    """Per layer, each image's pooled feature map, each channel less its mean over the picture
    (what is where, not the overall colour that the style shares), as one unit vector."""
    descriptors = []
    for layer in layers:
        flat = pooled(layer).flatten(2)
        flat = flat - flat.mean(2, keepdim=True)
        descriptors.append(F.normalize(flat.flatten(1), dim=1))
    return descriptors


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
