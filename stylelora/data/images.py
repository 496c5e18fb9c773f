"""Open images safely and turn them into training tensors with PIL and torch alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


def image_problem(path: Path) -> str | None:
    """Why `path` cannot be trained on, or None; cheap: reads the header and checks the data."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as image:
            image.verify()
    except UnidentifiedImageError:
        return "not an image"
    except Image.DecompressionBombError as exc:
        return f"too large ({exc})"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"damaged image ({exc})"
    return None


def load_rgb(path: Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The image upright (EXIF orientation applied) in RGB, transparency composited."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, background + (255,))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return image.convert("RGB")


def resize_and_crop(
    image: Image.Image, size: tuple[int, int], offset: tuple[float, float] = (0.5, 0.5)
) -> tuple[Image.Image, tuple[int, int]]:
    """Scale to cover `size` (width, height), then crop; offset 0.5 is a centre crop.

    Returns the cropped image and the crop's (top, left) in the scaled image, which SDXL
    takes as conditioning.
    """
    width, height = size
    scale = max(width / image.width, height / image.height)
    scaled_w = max(width, round(image.width * scale))
    scaled_h = max(height, round(image.height * scale))
    image = image.resize((scaled_w, scaled_h), Image.Resampling.LANCZOS)
    left = round((scaled_w - width) * offset[0])
    top = round((scaled_h - height) * offset[1])
    return image.crop((left, top, left + width, top + height)), (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to a float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
