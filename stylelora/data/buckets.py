"""Aspect-ratio buckets as kohya makes them: about resolution² pixels, sides stepped by `step`.

Each image trains at the bucket whose aspect ratio is closest to its own, scaled to cover it and
cropped; a batch holds images of one bucket only.
"""

from __future__ import annotations

import math
from collections import Counter

Size = tuple[int, int]  # (width, height)


def make_buckets(resolution: int, step: int, min_side: int, max_side: int) -> list[Size]:
    """Every (width, height) with area at most resolution², sides multiples of `step`."""
    max_area = (resolution // step) ** 2 * step * step
    side = int(math.sqrt(max_area)) // step * step
    buckets = {(side, side)}
    width = math.ceil(min_side / step) * step
    while width <= max_side:
        height = min(max_side, max_area // width // step * step)
        if height >= min_side:
            buckets.update({(width, height), (height, width)})
        width += step
    return sorted(buckets)


def closest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's (ties: the larger bucket)."""
    ratio = size[0] / size[1]
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - ratio), -b[0] * b[1]))


def no_upscale_bucket(size: Size, resolution: int, step: int) -> Size:
    """kohya's `bucket_no_upscale`: the image's own size, shrunk to the area, floored to `step`."""
    width, height = size
    max_area = resolution * resolution
    if width * height > max_area:
        scale = math.sqrt(max_area / (width * height))
        width, height = width * scale, height * scale
    return (max(step, int(width) // step * step), max(step, int(height) // step * step))


def fills_resolution(size: Size, resolution: int) -> bool:
    """Whether an image has the pixels of `resolution`² (SimpleTuner's pixel-area minimum): with
    several resolutions, an image trains at a larger one only then, never upscaled into it."""
    return size[0] * size[1] >= resolution * resolution


def cover_scale(size: Size, bucket: Size) -> float:
    """The factor that scales an image of `size` to cover `bucket`; above 1 it is upscaled."""
    return max(bucket[0] / size[0], bucket[1] / size[1])


def histogram(sizes: list[Size], weights: list[int] | None = None) -> dict[Size, int]:
    """How many images (or draws, with `weights`) each bucket holds, largest area first."""
    counts: Counter[Size] = Counter()
    for index, size in enumerate(sizes):
        counts[size] += weights[index] if weights else 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[0][0] * kv[0][1], kv[0])))


def format_histogram(counts: dict[Size, int]) -> list[str]:
    return [f"  {w}x{h}: {n}" for (w, h), n in counts.items()]
