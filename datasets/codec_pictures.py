"""Pictures for the demo base's autoencoder: enough kinds that it can code any picture.

A real model's VAE learned from every kind of picture, so it draws whatever colour, line or
texture its UNet or an adapter asks of it. The demo base's UNet and text encoder learn from
flat pictures only (`flat_shapes.py`); were its VAE trained on those alone, it would know 12
colours and smooth edges, and no adapter could make it draw anything else. So the VAE learns
from these too: the same subjects filled with any RGB colour, on plain or graded backgrounds,
perhaps outlined, sometimes filled or backed with stripes or a grid of dots, each of any
colour, width, spacing and angle. Every element is drawn at random and independently of the
others; none is the demo style's (its four colours and charcoal, its halftone, its hatching).

Output is deterministic: `codec_picture(index, size, seed)` gives the same pixels every time.
"""

from __future__ import annotations

import math
import random

import numpy as np
from flat_shapes import SEED, SUBJECTS, SUPERSAMPLE, FlatPen
from PIL import Image, ImageChops, ImageDraw, ImageFilter

RGB = tuple[int, int, int]


def random_color(rng: random.Random) -> RGB:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def background(rng: random.Random, side: int) -> Image.Image:
    """A plain colour, or a linear gradient between two colours in a random direction."""
    first = np.array(random_color(rng), np.float32)
    if rng.random() < 0.6:
        return Image.new("RGB", (side, side), tuple(int(c) for c in first))
    second = np.array(random_color(rng), np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:side, 0:side] / side - 0.5
    t = np.clip(xs * math.cos(angle) + ys * math.sin(angle) + 0.5, 0, 1)[..., None]
    return Image.fromarray(((1 - t) * first + t * second).round().astype(np.uint8))


def stripes(rng: random.Random, side: int) -> Image.Image:
    """A mask of parallel lines at a random angle, spacing and width."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    spacing = rng.uniform(3, 9) * SUPERSAMPLE
    width = max(1, round(rng.uniform(0.5, 2.5) * SUPERSAMPLE))
    angle = rng.uniform(0, math.pi)
    dx, dy = math.cos(angle), math.sin(angle)  # along the lines
    for k in range(-side, side, max(1, round(spacing))):
        cx, cy = side / 2 - dy * k, side / 2 + dx * k
        draw.line([(cx - dx * side, cy - dy * side), (cx + dx * side, cy + dy * side)],
                  fill=255, width=width)  # fmt: skip
    return mask


def dots(rng: random.Random, side: int) -> Image.Image:
    """A mask of a square grid of dots; their size constant or changing across the picture."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    spacing = rng.uniform(3, 9) * SUPERSAMPLE
    largest = spacing * rng.uniform(0.15, 0.45)
    angle = rng.uniform(0, 2 * math.pi) if rng.random() < 0.5 else None
    offset = rng.uniform(0, spacing)
    steps = int(side / spacing) + 2
    for i in range(steps):
        for j in range(steps):
            x, y = offset + i * spacing, offset + j * spacing
            t = 1.0
            if angle is not None:
                u = (x / side - 0.5) * math.cos(angle) + (y / side - 0.5) * math.sin(angle)
                t = min(1.0, max(0.0, u + 0.5))
            r = largest * t
            if r >= 0.5:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return mask


def pattern(rng: random.Random, side: int) -> Image.Image:
    return dots(rng, side) if rng.random() < 0.5 else stripes(rng, side)


def subject_mask(rng: random.Random, side: int) -> Image.Image:
    """One subject's silhouette (holes included) at a random size, place and mirror image."""
    mask = Image.new("L", (side, side), 0)
    r = side * rng.uniform(0.18, 0.45)
    cx, cy = (rng.uniform(r * 0.8, side - r * 0.8) for _ in range(2))
    _, draw = rng.choice(SUBJECTS)
    draw(FlatPen(mask, 255, 0, cx, cy, r, rng.random() < 0.5))
    return mask


def outline(mask: Image.Image, width: int) -> Image.Image:
    """A band `width` pixels wide on each side of the mask's edge."""
    size = 2 * width + 1
    return ImageChops.subtract(mask.filter(ImageFilter.MaxFilter(size)),
                               mask.filter(ImageFilter.MinFilter(size)))  # fmt: skip


def codec_picture(index: int, size: int, seed: int = SEED) -> Image.Image:
    """Picture number `index`: background, perhaps a pattern on it, one or two subjects."""
    rng = random.Random(f"codec-{seed}-{index}")
    side = size * SUPERSAMPLE
    img = background(rng, side)
    if rng.random() < 0.25:
        img.paste(random_color(rng), mask=pattern(rng, side))
    for _ in range(1 if rng.random() < 0.8 else 2):
        mask = subject_mask(rng, side)
        img.paste(random_color(rng), mask=mask)
        if rng.random() < 0.15:
            img.paste(random_color(rng), mask=ImageChops.multiply(mask, pattern(rng, side)))
        if rng.random() < 0.5:
            width = max(1, round(rng.uniform(0.5, 2.0) * SUPERSAMPLE))
            img.paste(random_color(rng), mask=outline(mask, width))
    return img.resize((size, size), Image.Resampling.BOX)
