"""The WD v3 taggers (SmilingWolf's `wd-*-tagger-v3`): booru tags with their confidences.

Each tagger's repository ships `model.onnx` and `selected_tags.csv`; this runs the ONNX file with
onnxruntime, as the taggers' own demo and kohya's tagging script do. (Their timm weights would
need timm, which imports torchvision; stylelora does not depend on it.) The model takes a
batch of square BGR images in 0..255, NHWC, white-padded, and gives each tag's probability.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stylelora.caption.models import CaptionOptions, Device
from stylelora.errors import UserError, first_line

RATING, GENERAL, CHARACTER = 9, 0, 4  # `category` in selected_tags.csv
# Tags that are faces drawn with underscores keep them; kohya and the taggers' demo do the same.
KAOMOJIS = {
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9",
    ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
}  # fmt: skip


@dataclass(frozen=True)
class Tag:
    name: str
    category: int


def read_tags(path: Path) -> list[Tag]:
    """`selected_tags.csv`: one row per model output (tag_id, name, category, count)."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return [Tag(row["name"], int(row["category"])) for row in csv.DictReader(handle)]
    except (OSError, KeyError, TypeError, ValueError):
        raise UserError(
            f"{path} is not a WD tagger's tag list (columns name, category); "
            "download the tagger again"
        ) from None


def shown_name(tag: str) -> str:
    """A tag as kohya users write captions: underscores as spaces, except in kaomojis."""
    return tag if tag in KAOMOJIS else tag.replace("_", " ")


def pick_tags(
    probabilities: np.ndarray, tags: list[Tag], general: float, character: float
) -> list[str]:
    """The tags above their category's threshold, most confident first; ratings dropped."""
    thresholds = {GENERAL: general, CHARACTER: character}
    kept = [
        (float(p), tag.name)
        for p, tag in zip(probabilities, tags, strict=True)
        if tag.category in thresholds and p >= thresholds[tag.category]
    ]
    kept.sort(key=lambda item: -item[0])  # stable: equal confidences keep the list's order
    return [shown_name(name) for _, name in kept]


def square_bgr(image: Image.Image, size: int) -> np.ndarray:
    """The image padded to a white square, resized to `size`, as BGR float32 in 0..255."""
    image = image.convert("RGB")
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        canvas = canvas.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(canvas, dtype=np.float32)[:, :, ::-1]


class WDTagger:
    def __init__(self, session, tags: list[Tag], description: str, options: CaptionOptions):
        self.session = session
        self.tags = tags
        self.description = description
        self.general = options.general_threshold
        self.character = options.character_threshold
        self.settings = {"general_threshold": self.general, "character_threshold": self.character}
        shape = session.get_inputs()[0].shape  # [batch, height, width, 3]
        self.size = int(shape[1])
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None

    def caption(self, images: list[Image.Image]) -> list[str]:
        batch = np.stack([square_bgr(image, self.size) for image in images])
        chunk = self.fixed_batch or len(images)  # a model exported for batch 1 takes one at a time
        name = self.session.get_inputs()[0].name
        probabilities = np.concatenate(
            [
                self.session.run(None, {name: batch[i : i + chunk]})[0]
                for i in range(0, len(batch), chunk)
            ]
        )
        return [
            ", ".join(pick_tags(row, self.tags, self.general, self.character))
            for row in probabilities
        ]


def providers(device: Device) -> list[str]:
    """CUDA where onnxruntime-gpu is installed and a GPU is in use, else the CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    wanted = ["CUDAExecutionProvider"] if not device.is_cpu else []
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


def load_tagger(folder: Path, model: str, options: CaptionOptions, device: Device) -> WDTagger:
    try:
        import onnxruntime
    except ImportError:
        raise UserError(
            "the WD taggers run with onnxruntime; pip install onnxruntime "
            "(onnxruntime-gpu on a CUDA machine)"
        ) from None
    if options.style == "natural":
        raise UserError(
            f"{model} is a tagger and writes tags; use --style tags, or a "
            "vision-language model for natural captions"
        )
    onnx_file = folder / "model.onnx"
    if not onnx_file.is_file():
        raise UserError(f"{folder} has no model.onnx; download the tagger again")
    tags = read_tags(folder / "selected_tags.csv")
    try:
        session = onnxruntime.InferenceSession(str(onnx_file), providers=providers(device))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise UserError(f"{onnx_file}: not a loadable ONNX model ({first_line(exc)})") from None
    outputs = session.get_outputs()[0].shape[-1]
    if isinstance(outputs, int) and outputs != len(tags):
        raise UserError(
            f"{folder}: the model gives {outputs} tags but "
            f"selected_tags.csv lists {len(tags)}; download the tagger again"
        )
    return WDTagger(session, tags, f"WD tagger ({model})", options)
