"""What regularisation does on the demo base: class prompts stay closer to the base's pictures.

Trains the demo's style adapter three times (`configs/demo.toml` as it is; with class images,
kohya's `reg_data_dir`; with prior preservation without images, ai-toolkit's differential
output preservation) and renders, for held-out subjects in the style set and outside it, several
seeds each:

- the class prompt without the trigger word (`a bone`): the mean absolute RGB difference to the
  base model's picture of the same prompt and seed (lower: the adapter leaves the class alone);
- the trigger prompt (`a bone, zqxstyle`): the palette distance to the style set's, over the
  base's (lower: the style is still learned; see style_shift.py).

The class images are the demo base's own pictures of the style set's captions with the trigger
word dropped (`a fish, burnt orange fish, cream background`), one per caption, as kohya users
render class images with the model they train on.

    python benchmarks/prior_preservation.py [--seeds 0,1,2] [--subjects bone,ghost] [--only ROW ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "datasets")]
from flat_shapes import article  # noqa: E402
from make_demo import TRIGGER  # noqa: E402
from style_shift import (  # noqa: E402
    DEFAULT_SEEDS,
    GUIDANCE,
    SIZE,
    STEPS,
    STYLE_DIR,
    fresh,
    palette_distance,
    render_all,
    style_images,
    style_palette,
    subject_groups,
    train_adapter,
)

MODEL = "demo:sd15"


def class_caption(caption: str) -> str:
    from stylelora.train.prior import class_caption as replace

    return replace(caption, TRIGGER, "")


def write_class_images(folder: Path) -> int:
    """The base's picture of each style caption without the trigger word, captioned by it."""
    pipe = fresh(MODEL)
    folder.mkdir(parents=True)
    captions = sorted(STYLE_DIR.glob("*.txt"))
    for index, path in enumerate(captions):
        text = class_caption(path.read_text().strip())
        generator = torch.Generator().manual_seed(1000 + index)
        image = pipe(text, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                     guidance_scale=GUIDANCE, generator=generator).images[0]  # fmt: skip
        image.save(folder / f"{index:02d}.png")
        (folder / f"{index:02d}.txt").write_text(text + "\n")
    return len(captions)


def variants(reg_dir: Path) -> dict[str, list[str]]:
    return {
        "without (configs/demo.toml)": [],
        "class images (data.reg_dir)": [f"data.reg_dir={str(reg_dir)!r}"],
        "prior preservation (no images)": [
            f"data.trigger_word={TRIGGER!r}",
            "train.prior_preservation=true",
        ],
        "class images, prior_loss_weight 0.3": [
            f"data.reg_dir={str(reg_dir)!r}",
            "train.prior_loss_weight=0.3",
        ],
        "prior preservation, weight 0.3": [
            f"data.trigger_word={TRIGGER!r}",
            "train.prior_preservation=true",
            "train.prior_preservation_weight=0.3",
        ],
    }


def pixel_change(images, base) -> float:
    return float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
                          for a, b in zip(images, base, strict=True)]))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)))
    parser.add_argument("--subjects", help="comma-separated; default: every 4th of each group")
    parser.add_argument("--only", nargs="+", metavar="ROW", help="these rows (default: all)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [name for group in subject_groups(args.subjects).values() for name in group]
    class_prompts = [f"{article(name)} {name}" for name in names]
    trigger_prompts = [f"{prompt}, {TRIGGER}" for prompt in class_prompts]
    palette = style_palette(style_images())

    base_pipe = fresh(MODEL)
    base_class = render_all(base_pipe, class_prompts, seeds, STEPS, GUIDANCE)
    base_trigger = render_all(base_pipe, trigger_prompts, seeds, STEPS, GUIDANCE)
    base_distance = np.mean([palette_distance(img, palette) for img in base_trigger])
    print(f"{len(names)} subjects x {len(seeds)} seeds; base palette distance {base_distance:.1f}")
    print("| regularisation | train s | class prompt: change from the base | "
          "trigger prompt: palette distance / base |")  # fmt: skip
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        reg = Path(tmp) / "reg" / "1_style"
        write_class_images(reg)
        rows = variants(reg.parent)
        for index, name in enumerate(args.only or rows):
            adapter, seconds = train_adapter(Path(tmp) / f"run-{index}", rows[name])
            pipe = fresh(MODEL, adapter)
            changed = pixel_change(
                render_all(pipe, class_prompts, seeds, STEPS, GUIDANCE), base_class
            )
            styled = render_all(pipe, trigger_prompts, seeds, STEPS, GUIDANCE)
            ratio = np.mean([palette_distance(img, palette) for img in styled]) / base_distance
            print(f"| {name} | {seconds:.0f} | {changed:.1f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
