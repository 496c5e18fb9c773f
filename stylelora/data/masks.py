"""Loss masks, as kohya's masked loss reads them: white trains, black is ignored, grey weighs in
between (128 is about half).

A mask comes from a folder laid out like the images (kohya's `conditioning_data_dir`): the same
relative path and name, any image extension; of an RGB mask the red channel counts, as in kohya.
Or from each image's own transparency (kohya's `alpha_mask`): opaque trains, transparent is
ignored. Either is resized and cropped with its image into the bucket, flipped with it, and
brought onto the latents by area averaging when the loss is weighted.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

from stylelora.data.images import SIXTEEN_BIT, to_8bit
from stylelora.data.scan import IMAGE_EXTENSIONS, ImageRecord
from stylelora.errors import UserError


def find_masks(records: list[ImageRecord], data_dir: Path, mask_dir: Path) -> list[Path]:
    """Each image's mask file in `mask_dir`; a one-line error names the first image without."""
    masks = []
    for record in records:
        relative = record.path.relative_to(data_dir)
        extensions = sorted(IMAGE_EXTENSIONS, key=lambda ext: (ext != relative.suffix.lower(), ext))
        candidates = [mask_dir / relative.parent / f"{relative.stem}{ext}" for ext in extensions]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise UserError(
                f"{record.path}: no mask for it in data.mask_dir {mask_dir} (looked for "
                f"{candidates[0].relative_to(mask_dir)} and the other image extensions); add "
                "one (white trains, black is ignored) or remove the image"
            )
        masks.append(found)
    return masks


def load_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    """The mask upright, as 8-bit grey (an RGB mask's red channel), at `size` (width, height),
    the size of its image."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in SIXTEEN_BIT or image.mode == "F":
                image = to_8bit(image)
            mask = image if image.mode == "L" else image.convert("RGB").getchannel("R")
            mask.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: cannot read this mask ({exc}); replace it") from None
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return mask
