"""Open images safely and turn them into training tensors with PIL and torch alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from stylelora.data.buckets import Size, cover_scale
from stylelora.data.problems import DAMAGED, EMPTY, NOT_AN_IMAGE, TOO_LARGE, Problem

# Above this many pixels an image is refused as a likely decompression bomb (PIL's own limit).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def inspect_image(path: Path) -> tuple[Size, Problem | None]:
    """(upright width, height) and why `path` cannot be trained on, or None.

    Decodes the whole image once: `verify()` misses a truncated JPEG, `load()` does not.
    """
    size = (0, 0)
    try:
        if path.stat().st_size == 0:
            return size, Problem(EMPTY)
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                return size, Problem(TOO_LARGE, f"{width}x{height} pixels, limit {MAX_PIXELS}")
            image.load()
            orientation = image.getexif().get(0x0112)
            size = (height, width) if orientation in _SWAPS_SIDES else (width, height)
    except UnidentifiedImageError:
        return size, Problem(NOT_AN_IMAGE)
    except Image.DecompressionBombError as exc:
        return size, Problem(TOO_LARGE, str(exc))
    except (OSError, SyntaxError, ValueError) as exc:
        return size, Problem(DAMAGED, str(exc))
    return size, None


def load_rgb(path: Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The image upright (EXIF orientation applied) in 8-bit RGB, transparency composited."""
    return load_rgb_alpha(path, background)[0]


def load_rgb_alpha(
    path: Path, background: tuple[int, int, int] = (255, 255, 255)
) -> tuple[Image.Image, Image.Image | None]:
    """`load_rgb`'s image, and its alpha channel upright (None when it has no transparency)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in SIXTEEN_BIT or image.mode == "F":
            image = to_8bit(image)
        if has_transparency(image):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
            return Image.alpha_composite(canvas, rgba).convert("RGB"), rgba.getchannel("A")
        return image.convert("RGB"), None


def has_transparency(image: Image.Image) -> bool:
    """Whether the image has an alpha channel or a transparent colour: training sees it over
    data.alpha_background (or takes its alpha as the loss mask, data.alpha_mask)."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit (or float) grey image scaled to 8 bit; PIL's own convert would clip at 255."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if array.max() <= 1.0 else 255.0
    else:
        top = 65535.0 if array.max() > 255 or image.mode != "I" else 255.0
    scaled = np.clip(np.rint(array / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def resize_and_crop(
    image: Image.Image, size: Size, offset: tuple[float, float] = (0.5, 0.5)
) -> tuple[Image.Image, tuple[int, int]]:
    """Scale to cover `size` (width, height), then crop; offset 0.5 is a centre crop.

    Returns the cropped image and the crop's (top, left) in the scaled image, which SDXL
    takes as conditioning.
    """
    return crop(scale_to_cover(image, size), size, offset)


def scale_to_cover(
    image: Image.Image, size: Size, resample: Image.Resampling = Image.Resampling.LANCZOS
) -> Image.Image:
    """The image scaled to the smallest size that covers `size` (width, height)."""
    return image.resize(covering_size(image.size, size), resample)


def covering_size(image_size: Size, size: Size) -> Size:
    """The (width, height) `scale_to_cover` gives an image of `image_size`."""
    scale = cover_scale(image_size, size)
    return (
        max(size[0], round(image_size[0] * scale)),
        max(size[1], round(image_size[1] * scale)),
    )


def crop(
    scaled: Image.Image, size: Size, offset: tuple[float, float]
) -> tuple[Image.Image, tuple[int, int]]:
    """`size` (width, height) cut out of a covering image at `offset`; and its (top, left)."""
    width, height = size
    left = round((scaled.width - width) * offset[0])
    top = round((scaled.height - height) * offset[1])
    return scaled.crop((left, top, left + width, top + height)), (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to a float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
