"""How often a base model draws the prompt's subject in the prompt's colours.

Renders one held-out prompt per subject of `datasets/flat_shapes.py` (56 prompts, each a
subject–colour pair the demo base never saw in training, e.g. "a purple apple on a black
background") and scores each picture:

- background colour: the median of the border pixels, named by the nearest generator colour;
- subject colour: the median of the pixels that differ from the background, named likewise;
- shape: that foreground mask against the subject's silhouette as the generator draws it, both
  cropped to their bounding box and scaled to one size (position and size are free), mirror
  image allowed: IoU >= 0.6 passes. `top-1` also asks that no other subject's silhouette fits
  better.

A prompt passes when both colours and the shape pass. `--check-scorer` scores the generator's
own pictures of the same prompts instead (at random places and sizes), which should all pass;
`--reconstruct` scores them after a round trip through the model's VAE: the most the model's
own pictures can score.

    python benchmarks/base_quality.py [--model demo:sd15] [--steps 20] [--guidance 5]
                                      [--grid grid.png] [--check-scorer | --reconstruct]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "datasets"))
import flat_shapes  # noqa: E402
from flat_shapes import COLORS, SUBJECT_NAMES, Sample  # noqa: E402

MASK = 32  # side of the normalised silhouettes compared
IOU_PASS = 0.6
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as subject
BORDER = 3
# How the demo base is rendered: it draws best at a low guidance scale (the README's figures).
STEPS, GUIDANCE = 20, 2.0


@dataclass
class Score:
    sample: Sample
    fg: str
    bg: str
    iou: float
    best: str

    @property
    def colors_ok(self) -> bool:
        return self.fg == self.sample.fg and self.bg == self.sample.bg

    @property
    def shape_ok(self) -> bool:
        return self.iou >= IOU_PASS

    @property
    def passed(self) -> bool:
        return self.colors_ok and self.shape_ok


def nearest_color(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda name: float(np.linalg.norm(rgb - np.array(COLORS[name]))))


def without_specks(mask: np.ndarray) -> np.ndarray:
    """The mask opened by a 3x3 square: blotches of a pixel or two in a generated background
    would otherwise stretch the bounding box the shapes are compared in."""
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3))) > 127


def normalise(mask: np.ndarray) -> np.ndarray:
    """The mask cropped to its bounding box, centred in a square and scaled to MASK x MASK."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.zeros((MASK, MASK), bool)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    side = max(crop.shape)
    square = np.zeros((side, side), np.uint8)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top : top + crop.shape[0], left : left + crop.shape[1]] = crop * 255
    return np.asarray(Image.fromarray(square).resize((MASK, MASK), Image.BILINEAR)) > 127


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def templates(size: int) -> dict[str, list[np.ndarray]]:
    """Each subject's normalised silhouette and its mirror image."""
    out = {}
    for name in SUBJECT_NAMES:
        mask = normalise(without_specks(flat_shapes.template_mask(name, size)))
        out[name] = [mask, mask[:, ::-1]]
    return out


def score_image(img: Image.Image, sample: Sample, shapes: dict[str, list[np.ndarray]]) -> Score:
    pixels = np.asarray(img.convert("RGB")).astype(np.float32)
    border = np.concatenate(
        [pixels[:BORDER].reshape(-1, 3), pixels[-BORDER:].reshape(-1, 3),
         pixels[:, :BORDER].reshape(-1, 3), pixels[:, -BORDER:].reshape(-1, 3)]
    )  # fmt: skip
    bg_rgb = np.median(border, axis=0)
    far = np.linalg.norm(pixels - bg_rgb, axis=2) > FOREGROUND_DISTANCE
    fg_rgb = np.median(pixels[far], axis=0) if far.any() else bg_rgb
    mask = np.linalg.norm(pixels - fg_rgb, axis=2) < np.linalg.norm(pixels - bg_rgb, axis=2)
    shape = normalise(without_specks(mask))
    fits = {name: max(iou(shape, m) for m in masks) for name, masks in shapes.items()}
    best = max(fits, key=fits.get)
    return Score(sample, nearest_color(fg_rgb), nearest_color(bg_rgb), fits[sample.subject], best)


def guidance_kwargs(pipe, guidance: float, count: int = 1) -> dict:
    """Classifier-free guidance at `guidance` for `count` prompts: the pipeline's own; for a
    Flux pipeline true CFG (the demo's Flux twin learned its guidance embedding at 1.0 only),
    with T5 at the length the family trains with (FluxPipeline would pad to 512); for Z-Image
    its own form, pos + g (pos - neg), with g = guidance - 1, and Qwen at the twin's length."""
    from diffusers import FluxPipeline, ZImagePipeline

    from stylelora.families import detect_family

    if isinstance(pipe, FluxPipeline):
        return {
            "true_cfg_scale": guidance,
            "negative_prompt": [""] * count,
            "guidance_scale": 1.0,
            "max_sequence_length": detect_family(pipe).max_sequence_length,
        }
    if isinstance(pipe, ZImagePipeline):
        tokens = detect_family(pipe).max_length
        return {"guidance_scale": guidance - 1.0, "max_sequence_length": tokens}
    return {"guidance_scale": guidance}


def generate(model: str, prompts: list[Sample], args: argparse.Namespace) -> list[Image.Image]:
    from stylelora.families import load_pipeline

    pipe = load_pipeline(model)
    images = []
    for start in range(0, len(prompts), args.batch):
        chunk = prompts[start : start + args.batch]
        generator = torch.Generator().manual_seed(args.seed + start)
        images += pipe(
            [s.caption for s in chunk], height=args.size, width=args.size,
            num_inference_steps=args.steps, generator=generator,
            **guidance_kwargs(pipe, args.guidance, len(chunk)),
        ).images  # fmt: skip
    return images


def generator_images(prompts: list[Sample], size: int) -> list[Image.Image]:
    rng = random.Random(0)
    return [flat_shapes.render(s, size, rng) for s in prompts]


@torch.no_grad()
def reconstructions(model: str, images: list[Image.Image]) -> list[Image.Image]:
    """`images` through the model's VAE and back: the most its pictures can score."""
    from stylelora.families import load_pipeline

    vae = load_pipeline(model).vae
    pixels = torch.from_numpy(np.stack([np.asarray(img) for img in images]))
    x = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    y = vae.decode(vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0))).sample
    out = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in out]


def save_grid(images: list[Image.Image], scores: list[Score], path: Path, cols: int = 8) -> None:
    side = images[0].width
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * side, rows * side), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, score) in enumerate(zip(images, scores, strict=True)):
        x, y = (i % cols) * side, (i // cols) * side
        grid.paste(img, (x, y))
        draw.rectangle(
            [x, y, x + side - 1, y + side - 1], outline="lime" if score.passed else "red"
        )
    grid.save(path)


def report(scores: list[Score]) -> float:
    n = len(scores)

    def rate(ok) -> str:
        return f"{sum(ok(s) for s in scores)}/{n} ({100 * sum(ok(s) for s in scores) / n:.0f} %)"

    for s in scores:
        mark = "pass" if s.passed else "FAIL"
        print(f"{mark}  {s.sample.caption:55s} got {s.fg} on {s.bg}, IoU {s.iou:.2f}"
              f" (best fit: {s.best})")  # fmt: skip
    print(f"subject colour      {rate(lambda s: s.fg == s.sample.fg)}")
    print(f"background colour   {rate(lambda s: s.bg == s.sample.bg)}")
    print(f"shape IoU >= {IOU_PASS}    {rate(lambda s: s.shape_ok)}")
    print(f"shape top-1         {rate(lambda s: s.best == s.sample.subject)}")
    print(f"all (colours+shape) {rate(lambda s: s.passed)}")
    print(f"all, shape top-1    {rate(lambda s: s.colors_ok and s.best == s.sample.subject)}")
    return sum(s.passed for s in scores) / n


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo:sd15")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=28)
    parser.add_argument("--grid", type=Path, help="save the pictures here, framed pass/fail")
    parser.add_argument("--check-scorer", action="store_true", help="score the generator's own")
    parser.add_argument(
        "--reconstruct", action="store_true", help="score the generator's own after the VAE"
    )
    args = parser.parse_args(argv)
    prompts = flat_shapes.eval_prompts()
    started = time.perf_counter()
    if args.check_scorer:
        images = generator_images(prompts, args.size)
    elif args.reconstruct:
        images = reconstructions(args.model, generator_images(prompts, args.size))
    else:
        images = generate(args.model, prompts, args)
    shapes = templates(args.size)
    scores = [score_image(img, s, shapes) for img, s in zip(images, prompts, strict=True)]
    print(f"{len(prompts)} held-out prompts, {time.perf_counter() - started:.0f} s")
    if args.grid:
        save_grid(images, scores, args.grid)
    return report(scores)


if __name__ == "__main__":
    main()
