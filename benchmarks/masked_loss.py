"""What masked loss does on the demo base: whether, trained with the background masked out, the
style adapter changes the background of its pictures less, and the subject as before.

Writes each demo image's subject mask (`datasets/make_demo.py --masks`: the subject and its
outlines white, the halftone background black), trains the README's demo twice, with
`train.masked_loss` on those masks and without, and renders held-out prompts (subjects in the
style set and not in it, several seeds) on the base and with each adapter. Per run it prints
the mean RGB change against the base render, same prompt and seed, over the background (the
pixels outside the base render's subject, as `style_shift.py` finds it) and over the subject.

    python benchmarks/masked_loss.py [--unmasked-weight 0.0] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "datasets"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import make_demo  # noqa: E402
from style_shift import (  # noqa: E402
    DEFAULT_SEEDS,
    GUIDANCE,
    STEPS,
    STYLE_DIR,
    fresh,
    prompts,
    render_all,
    silhouette,
    subject_groups,
    train_adapter,
)


def write_masks(folder: Path) -> Path:
    """The demo set's subject masks, named as its images (the images themselves are the
    shipped set's: make_demo draws them byte for byte alike)."""
    with tempfile.TemporaryDirectory() as images:
        make_demo.generate(Path(images), 24, 128, masks=folder)
    return folder


def change(adapted: Image.Image, base: Image.Image) -> tuple[float, float]:
    """Mean absolute RGB change over the base render's background, and over its subject."""
    a = np.asarray(adapted.convert("RGB"), np.float32)
    b = np.asarray(base.convert("RGB"), np.float32)
    diff = np.abs(a - b).mean(axis=2)
    subject = silhouette(base)
    background = diff[~subject].mean() if (~subject).any() else 0.0
    return float(background), float(diff[subject].mean() if subject.any() else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unmasked-weight", type=float, default=0.0)
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)))
    parser.add_argument("--steps", type=int, default=STEPS, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    groups = subject_groups(None)
    texts = [text for subjects in groups.values() for text in prompts(subjects)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        masks = write_masks(root / "masks")
        runs = {
            "without masks": [],
            "masked loss": [
                f"data.mask_dir={str(masks)!r}",
                "train.masked_loss=true",
                f"train.unmasked_weight={args.unmasked_weight}",
            ],
        }
        base = render_all(fresh("demo:sd15"), texts, seeds, args.steps, args.guidance)
        print(f"{len(base)} renders per run ({len(texts)} prompts x {len(seeds)} seeds), "
              f"style images from {STYLE_DIR}")  # fmt: skip
        print("| run | train s | background change | subject change |\n|---|---:|---:|---:|")
        for name, overrides in runs.items():
            adapter, seconds = train_adapter(root / name.replace(" ", "-"), overrides)
            pipe = fresh("demo:sd15", adapter)
            adapted = render_all(pipe, texts, seeds, args.steps, args.guidance)
            changes = np.array([change(a, b) for a, b in zip(adapted, base, strict=True)])
            background, subject = changes.mean(axis=0)
            print(f"| {name} | {seconds:.0f} | {background:.1f} | {subject:.1f} |", flush=True)


if __name__ == "__main__":
    main()
