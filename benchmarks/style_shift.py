"""How far a style adapter moves the demo base toward the demo style, and what it keeps.

Renders prompts in the demo set's caption form (`zqxstyle, a fish`) on the demo base without
the adapter, at half strength and at full strength, for subjects in the style set and subjects
that are not (from `datasets/flat_shapes.py`), several seeds each, and prints per group:

- palette distance: the mean RGB distance of each pixel to the nearest colour of the style
  set's palette. The palette is computed from the style images (a k-means quantisation of all
  their pixels), not written down;
- texture: the mean absolute difference between the image and its 3x3 blur, in grey levels:
  halftone dots, hatching and outlines make it high, flat pictures low; the style images' own
  figure is printed beside it;
- silhouette IoU: the subject's mask in the adapted image against its mask in the base image,
  same seed (the subject is what differs from the background after the dots are blurred away).

Targets, on subjects not in the style set: palette distance with the adapter at most 50 % of
the base's, silhouette IoU at least 0.5, and at scale 0.5 a palette distance between the two.

    python benchmarks/style_shift.py --adapter runs/demo-style/demo-style.safetensors
    python benchmarks/style_shift.py --train [--set train.min_snr_gamma=5 ...]
    python benchmarks/style_shift.py --adapter A --seeds 7,8,9 --subjects bone,ghost,car
    python benchmarks/style_shift.py --train --held-out    # prompts the default run does not use
    python benchmarks/style_shift.py --train --config configs/demo-flux.toml   # the Flux twin

The Flux twin (`demo:flux`, trained with caption dropout and its guidance embedding at 1.0) is
rendered with true classifier-free guidance (FluxPipeline's `true_cfg_scale`) at `--guidance`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import tomllib
import torch
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "datasets"))
from flat_shapes import OTHER_SUBJECTS, article  # noqa: E402
from make_demo import SUBJECTS as STYLE_SUBJECTS  # noqa: E402
from make_demo import TRIGGER  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from base_quality import GUIDANCE, STEPS, guidance_kwargs, reconstructions  # noqa: E402

STYLE_DIR = ROOT / "datasets" / "demo-style"
CONFIG = ROOT / "configs" / "demo.toml"
SIZE = 64
PALETTE_SIZE = 6  # clusters asked of k-means; the style set has four fills and charcoal
FOREGROUND_DISTANCE = 60.0
# By default every fourth subject of each group, with these seeds: the other subjects and
# seeds are left for checks with prompts the benchmark does not use. `--held-out` is one such
# check: every fourth subject from the third, with other seeds.
DEFAULT_SEEDS = (0, 1, 2)
HELD_OUT_SEEDS = (7, 8, 9)
HELD_OUT_FIRST = 2


def style_images(folder: Path = STYLE_DIR, size: int = SIZE) -> list[Image.Image]:
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise SystemExit(f"{folder}: no style images")
    return [Image.open(p).convert("RGB").resize((size, size), Image.Resampling.BOX) for p in paths]


def style_palette(images: list[Image.Image], colors: int = PALETTE_SIZE) -> np.ndarray:
    """The style set's palette: k-means (Pillow's quantiser) over all pixels of its images."""
    mosaic = Image.new("RGB", (images[0].width * len(images), images[0].height))
    for i, img in enumerate(images):
        mosaic.paste(img, (i * img.width, 0))
    quantised = mosaic.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, kmeans=colors)
    return np.array(quantised.getpalette()[: 3 * colors], np.float32).reshape(colors, 3)


def palette_distance(img: Image.Image, palette: np.ndarray) -> float:
    pixels = np.asarray(img.convert("RGB"), np.float32).reshape(-1, 1, 3)
    return float(np.linalg.norm(pixels - palette[None], axis=2).min(axis=1).mean())


def texture(img: Image.Image) -> float:
    grey = img.convert("L")
    blurred = grey.filter(ImageFilter.BoxBlur(1))
    return float(np.abs(np.asarray(grey, np.float32) - np.asarray(blurred, np.float32)).mean())


def silhouette(img: Image.Image) -> np.ndarray:
    """What differs from the background, once dots and hatching are blurred away."""
    pixels = np.asarray(img.convert("RGB").filter(ImageFilter.BoxBlur(2)), np.float32)
    edges = [pixels[:3], pixels[-3:], pixels[:, :3], pixels[:, -3:]]
    border = np.concatenate([edge.reshape(-1, 3) for edge in edges])
    return np.linalg.norm(pixels - np.median(border, axis=0), axis=2) > FOREGROUND_DISTANCE


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@dataclass
class Row:
    group: str
    scale: float
    distance: float
    texture: float
    iou: float


def prompts(subjects: list[str]) -> list[str]:
    return [f"{article(name)} {name}, {TRIGGER}" for name in subjects]


def render_all(pipe, texts: list[str], seeds: list[int], steps: int, guidance: float,
               size: int = SIZE):  # fmt: skip
    images = []
    guided = guidance_kwargs(pipe, guidance)
    for text in texts:
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            result = pipe(text, height=size, width=size, num_inference_steps=steps,
                          generator=generator, **guided)  # fmt: skip
            images.append(result.images[0])
    return images


def measure(adapter: Path | None, groups: dict[str, list[str]], seeds: list[int],
            scales: list[float], steps: int, guidance: float, model: str,
            merged: str | None = None, size: int = SIZE) -> tuple[list[Row], dict]:  # fmt: skip
    """Render every group without the adapter and at each scale (each on a freshly loaded base,
    through `stylelora sample`'s own loading: diffusers' loader, or DoRA added into the weights),
    `size` pixels square. With `merged` (a merged model), render that model in place of the
    adapter at scale 1."""
    palette = style_palette(style_images())
    texts = {group: prompts(subjects) for group, subjects in groups.items()}
    pipe = fresh(model)
    base = {g: render_all(pipe, t, seeds, steps, guidance, size) for g, t in texts.items()}
    rows, images = [], {}
    for group in groups:
        rows.append(summarise(group, 0.0, base[group], base[group], palette))
        images[(group, 0.0)] = base[group]
    for scale in [1.0] if merged else scales:
        pipe = fresh(merged) if merged else fresh(model, adapter, scale)
        for group, t in texts.items():
            adapted = render_all(pipe, t, seeds, steps, guidance, size)
            rows.append(summarise(group, scale, adapted, base[group], palette))
            images[(group, scale)] = adapted
    return rows, images


def fresh(model: str, adapter: Path | None = None, scale: float = 1.0):
    from stylelora.families import load_family
    from stylelora.sample.adapter import apply_adapter

    family = load_family(model)
    if adapter is not None:
        apply_adapter(family, adapter, scale)
    family.pipe.set_progress_bar_config(disable=True)
    return family.pipe


def summarise(group: str, scale: float, images, base, palette: np.ndarray) -> Row:
    return Row(
        group,
        scale,
        float(np.mean([palette_distance(img, palette) for img in images])),
        float(np.mean([texture(img) for img in images])),
        float(
            np.mean([iou(silhouette(a), silhouette(b)) for a, b in zip(images, base, strict=True)])
        ),
    )


def train_adapter(out: Path, overrides: list[str], config: Path = CONFIG) -> tuple[Path, float]:
    """The README's demo command (or `config`), with `--set` overrides, into `out`; the adapter
    and seconds."""
    command = [sys.executable, "-m", "stylelora", "train", str(config), "--output-dir", str(out),
               "--set", "sample.every_n_steps=0", "--set", "sample.prompts_file=''"]  # fmt: skip
    for item in overrides:
        command += ["--set", item]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    name = tomllib.loads(config.read_text())["name"]
    return out / f"{name}.safetensors", time.perf_counter() - started


def merge(adapter: Path, out: Path, model: str) -> str:
    command = [sys.executable, "-m", "stylelora", "merge", "--model", model, "--adapter",
               str(adapter), "--out", str(out), "--dtype", "fp32"]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return str(out)


# What each option does to the style, for the README's table: `--set` overrides of the demo.
OPTIONS: dict[str, list[str]] = {
    "default (configs/demo.toml: `full`, LoRA+ 4, timesteps below 700)": [],
    "text-encoder adapters": ["adapter.text_encoder=true"],
    "`attention` only": ["adapter.unet_targets='attention'"],
    "`attn-mlp` (kohya's default)": ["adapter.unet_targets='attn-mlp'"],
    "all timesteps": ["train.max_timestep=''"],
    "DoRA": ["adapter.use_dora=true"],
    # LyCORIS has no up matrices for LoRA+ to speed up
    "LoHa (LyCORIS, rank 8)": ["adapter.type='loha'", "train.loraplus_lr_ratio=''"],
    "LoKr (LyCORIS, rank 8, factor -1)": ["adapter.type='lokr'", "train.loraplus_lr_ratio=''"],
    "min-SNR 5": ["train.min_snr_gamma=5.0"],
    "noise offset 0.05": ["train.noise_offset=0.05"],
    "EMA 0.99, exported instead": ["train.ema_decay=0.99", "train.ema_export='instead'"],
    "LoRA+ 16": ["train.loraplus_lr_ratio=16"],
    "no LoRA+": ["train.loraplus_lr_ratio=''"],
    # Prodigy finds one step size for every parameter: LoRA+'s faster up matrices are refused
    "Prodigy (lr 1, no LoRA+)": [
        "train.optimizer='prodigy'",
        "train.learning_rate=1.0",
        "train.loraplus_lr_ratio=''",
    ],
    "AdamW8bit": ["train.optimizer='adamw8bit'"],
    "`quantize_base = nf4`": ["train.quantize_base='nf4'"],
    "bf16": ["train.mixed_precision='bf16'"],
    "caches off (the VAE and the text encoder every step)": [
        "data.cache_latents=false",
        "data.cache_text_encoder_outputs=false",
    ],  # fmt: skip
    "`merge` (the merged model)": [],
}


def verdict(rows: list[Row], floor: float, group: str = "not in style set") -> list[str]:
    """The issue's targets, and the palette ratio counted from `floor`, the style images' own
    distance through the VAE: no adapter on the denoiser gets below it, so a prompt set whose
    base pictures start near it cannot reach the ratio's target."""
    by_scale = {r.scale: r for r in rows if r.group == group}
    base, full = by_scale[0.0], by_scale[max(by_scale)]
    above = (full.distance - floor) / (base.distance - floor)
    lines = [
        f"palette distance, adapted / base: {full.distance / base.distance:.2f} (target <= 0.50)",
        f"  counted from the VAE's floor ({floor:.1f}): {above:.2f}",
        f"silhouette IoU: {full.iou:.2f} (target >= 0.5)",
    ]
    if 0.5 in by_scale:
        half = by_scale[0.5].distance
        between = full.distance < half < base.distance
        lines.append(f"scale 0.5 between base and full: {'yes' if between else 'NO'} "
                     f"({base.distance:.1f} > {half:.1f} > {full.distance:.1f})")  # fmt: skip
    return lines


def table(names: list[str], groups: dict, seeds: list[int], args) -> None:
    """Train the demo once per option and print one Markdown row each (unseen subjects)."""
    print("| option | train s | palette dist / base | texture | silhouette IoU |")
    print("|---|---|---|---|---|")
    unseen = {"not in style set": groups["not in style set"]}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            adapter, seconds = train_adapter(Path(tmp) / "run", OPTIONS[name], args.config)
            merged = merge(adapter, Path(tmp) / "merged", args.model) if "merge" in name else None
            rows, _ = measure(adapter, unseen, seeds, [1.0], args.steps, args.guidance,
                              args.model, merged)  # fmt: skip
        base, full = rows[0], rows[-1]
        ratio = full.distance / base.distance
        texture = f"{full.texture:.1f} (base {base.texture:.1f})"
        print(f"| {name} | {seconds:.0f} | {ratio:.2f} | {texture} | {full.iou:.2f} |", flush=True)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", type=Path, help="a trained demo-style adapter")
    source.add_argument("--train", action="store_true", help="train one with configs/demo.toml")
    source.add_argument("--table", nargs="*", metavar="OPTION",
                        help="train per option (default: all); a Markdown table")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="with --train: a config override, as train --set")  # fmt: skip
    parser.add_argument("--config", type=Path, default=CONFIG, help="the demo config to train")
    parser.add_argument("--model", help="the base to render (default: the config's model)")
    parser.add_argument("--seeds", help=f"comma-separated; default: {DEFAULT_SEEDS}")
    parser.add_argument("--subjects", help="comma-separated; default: every 4th of each group")
    parser.add_argument("--held-out", action="store_true",
                        help="the other prompts: every 4th subject from the third, seeds "
                             f"{HELD_OUT_SEEDS}")  # fmt: skip
    parser.add_argument("--scales", default="0.5,1.0")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--size", type=int, default=SIZE, help="render at this many pixels")
    parser.add_argument("--grid", type=Path, help="save the renders here, one row per scale")
    args = parser.parse_args(argv)
    if args.held_out and (args.seeds or args.subjects):
        parser.error("--held-out chooses the subjects and seeds: leave out --seeds and --subjects")
    args.model = args.model or tomllib.loads(args.config.read_text())["model"]

    default_seeds = HELD_OUT_SEEDS if args.held_out else DEFAULT_SEEDS
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(default_seeds)
    scales = [float(s) for s in args.scales.split(",")]
    groups = subject_groups(args.subjects, HELD_OUT_FIRST if args.held_out else 0)
    if args.table is not None:
        unknown = [name for name in args.table if name not in OPTIONS]
        if unknown:
            raise SystemExit(f"unknown option {unknown[0]!r}: choose from {', '.join(OPTIONS)}")
        table(args.table or list(OPTIONS), groups, seeds, args)
        return []
    with tempfile.TemporaryDirectory() as tmp:
        adapter = (
            train_adapter(Path(tmp), args.overrides, args.config)[0] if args.train else args.adapter
        )
        rows, images = measure(adapter, groups, seeds, scales, args.steps, args.guidance,
                               args.model, size=args.size)  # fmt: skip
    style = style_images()
    palette = style_palette(style)
    measures = (partial(palette_distance, palette=palette), texture)
    reference = [np.mean([f(img) for img in style]) for f in measures]
    decoded = [np.mean([f(img) for img in reconstructions(args.model, style)]) for f in measures]
    print(f"{'subjects':18s} {'scale':>5s} {'palette dist':>12s} {'texture':>8s} {'IoU':>5s}")
    for r in rows:
        print(f"{r.group:18s} {r.scale:5.2f} {r.distance:12.1f} {r.texture:8.2f} {r.iou:5.2f}")
    print(f"{'style images':18s} {'':5s} {reference[0]:12.1f} {reference[1]:8.2f}")
    print(f"{'  through the VAE':18s} {'':5s} {decoded[0]:12.1f} {decoded[1]:8.2f}")
    for line in verdict(rows, decoded[0]) if "not in style set" in groups else []:
        print(line)
    if args.grid:
        save_grid(images, args.grid)
    return rows


def subject_groups(chosen: str | None, first: int = 0) -> dict[str, list[str]]:
    """The subjects in `chosen`, by group; else every fourth of each group from `first`."""
    style_names = [name for name, _ in STYLE_SUBJECTS]
    if chosen:
        names = chosen.split(",")
        groups = {"in style set": [s for s in names if s in style_names],
                  "not in style set": [s for s in names if s not in style_names]}  # fmt: skip
    else:
        groups = {"in style set": style_names[first::4],
                  "not in style set": [name for name, _ in OTHER_SUBJECTS][first::4]}  # fmt: skip
    return {k: v for k, v in groups.items() if v}


def save_grid(images: dict, path: Path) -> None:
    from stylelora.sample.render import grid

    keys = sorted(images, key=lambda k: (k[0], k[1]))
    columns = len(images[keys[0]])
    grid([img for key in keys for img in images[key]], columns=columns).save(path)


if __name__ == "__main__":
    main()
