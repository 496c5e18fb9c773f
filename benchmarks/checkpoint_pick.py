"""Do the style, content and copying measures mean something? On the demo base, where the
palette distance and the silhouette IoU of `style_shift.py` are ground truths of style and
content, they are compared across many adapters: the checkpoints of a long, deliberately
overfitting demo run (constant learning rate, every timestep, a checkpoint every 100 steps) and
short runs of the option table's variants, and the default variant and the last checkpoint at
lower strengths (whose style and content lie between the base's and the full adapter's).

Each adapter renders the same prompts (`a SUBJECT, zqxstyle`, every subject in the style set
and out of it, 56, seeds 0 and 1) at 64 px; the measures (stylelora/sample/measures.py, against
the style images) and the ground truths are taken of the very same renders. Printed: a row per
adapter, the rank correlation (Spearman) of style with the palette ratio's fall (1 - adapted /
base distance) and of content with the silhouette IoU (over all renders, and over each seed's
alone), the checkpoint the rule of
stylelora/sample/pick.py picks from the measures and the one it picks from the ground truths,
and what `stylelora pick` picks on the run's own held-out prompts (4, and 12 with --prompts).

Targets: both correlations at least 0.8; the two picks at most one checkpoint apart.

    python benchmarks/checkpoint_pick.py                  # about 70 min on one thread
    python benchmarks/checkpoint_pick.py --keep runs/pick-bench   # runs and renders kept, reused
    python benchmarks/checkpoint_pick.py --subjects-every 4       # 28 renders an adapter, faster
    python benchmarks/checkpoint_pick.py --steps 2000 --every 100 --variant-steps 500
    python benchmarks/checkpoint_pick.py --run runs/pick-bench   # measure an existing run again
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from style_shift import (  # noqa: E402
    CONFIG,
    OPTIONS,
    iou,
    palette_distance,
    prompts,
    silhouette,
    style_images,
    style_palette,
    subject_groups,
    train_adapter,
)

OVERFIT = [
    "train.lr_scheduler='constant'",
    "train.max_timestep=''",
    "train.checkpoints_keep=1000",
]
VARIANTS = [
    "default (configs/demo.toml: `full`, LoRA+ 4, timesteps below 700)",
    "`attention` only",
    "`attn-mlp` (kohya's default)",
    "no LoRA+",
    "LoRA+ 16",
    "text-encoder adapters",
    "all timesteps",
]
GUIDANCE = 2.0
STEPS = 20


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank)."""

    def ranks(values: list[float]) -> np.ndarray:
        values = np.asarray(values, dtype=float)
        order = values.argsort()
        result = np.empty(len(values))
        result[order] = np.arange(len(values))
        for value in np.unique(values):
            result[values == value] = result[values == value].mean()
        return result

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def bench_prompts(seeds: list[int], every: int = 4):
    """`a SUBJECT, zqxstyle` for every `every`-th subject of each group, at each seed."""
    from stylelora.sample.prompts import SamplePrompt

    groups = [
        [name for first in range(0, 4, every) for name in subject_groups(None, first)[group]]
        for group in ("in style set", "not in style set")
    ]
    texts = [text for subjects in groups for text in prompts(subjects)]
    return [
        SamplePrompt(text, width=64, height=64, seed=seed, guidance_scale=GUIDANCE, steps=STEPS)
        for text in texts
        for seed in seeds
    ]


def ground_truth(images, base, palette: np.ndarray) -> dict[str, float]:
    distance = np.mean([palette_distance(image, palette) for image in images])
    base_distance = np.mean([palette_distance(image, palette) for image in base])
    kept = np.mean([iou(silhouette(a), silhouette(b)) for a, b in zip(images, base, strict=True)])
    return {"palette_fall": float(1 - distance / base_distance), "iou": float(kept)}


def cached_renders(folder: Path | None, count: int, render) -> list:
    """`render()`'s images, kept as PNGs in `folder` (when given) and read back from there on a
    later call: the measures can then be taken again without rendering."""
    from PIL import Image

    files = [folder / f"{index:04d}.png" for index in range(count)] if folder else []
    if files and all(file.is_file() for file in files):
        return [Image.open(file).convert("RGB") for file in files]
    images = render()
    if folder:
        folder.mkdir(parents=True, exist_ok=True)
        for image, file in zip(images, files, strict=True):
            image.save(file)
    return images


def slug(label: str) -> str:
    return "".join(c if c.isalnum() or c == "." else "-" for c in label).strip("-")


def evaluate(
    adapters: dict[str, tuple[Path, float]],
    seeds: list[int],
    every: int = 4,
    renders: Path | None = None,
) -> list[dict]:
    """Measures and ground truths of each adapter's renders of the benchmark's prompts (kept in
    `renders`, when given)."""
    from stylelora.families import load_family
    from stylelora.sample.measures import measure, reference
    from stylelora.sample.pick_run import adapter_renders
    from stylelora.sample.render import render_all

    family = load_family("demo:sd15")
    family.pipe.set_progress_bar_config(disable=True)
    training = style_images()
    palette = style_palette(training)
    requests = bench_prompts(seeds, every)
    key = f"seeds-{'-'.join(map(str, seeds))}-every-{every}"
    folder = (lambda label: renders / key / slug(label)) if renders else (lambda label: None)
    base = cached_renders(
        folder("base"), len(requests), lambda: render_all(family.pipe, requests, family)
    )
    ref = reference(family, training, base)
    # Each seed's renders alone as well: does a measure hold on both halves of the pictures?
    per_seed = [(reference(family, training, base[k :: len(seeds)]), k) for k in range(len(seeds))]
    rows = []
    for label, (path, scale) in adapters.items():
        started = time.perf_counter()
        images = cached_renders(
            folder(label),
            len(requests),
            lambda path=path, scale=scale: adapter_renders(family, path, requests, scale),
        )
        row = {"label": label, **measure(family, ref, images).as_dict()}
        row |= ground_truth(images, base, palette)
        for seed_ref, k in per_seed:
            mine, theirs = images[k :: len(seeds)], base[k :: len(seeds)]
            half = measure(family, seed_ref, mine).as_dict()
            truth = ground_truth(mine, theirs, palette)
            row[f"seed {seeds[k]}"] = {**half, **truth}
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        print(
            f"| {label} | {row['style']:.3f} | {row['palette_fall']:.3f} | {row['content']:.3f} "
            f"| {row['iou']:.3f} | {row['copying']:.3f} |",
            flush=True,
        )
    return rows


def checkpoint_adapters(run: Path) -> dict[str, Path]:
    from stylelora.sample.pick_run import step_adapters

    name = json.loads((run / "config.json").read_text())["name"]
    return {f"step {step}": (path, 1.0) for step, path in step_adapters(run, name).items()}


def run_pick(run: Path, prompts: int | None = None) -> int:
    """The step `stylelora pick [--prompts N]` picks from the run's own held-out prompts."""
    from stylelora.sample.pick_run import pick_run

    pick_run(run, say=lambda line: None, prompts=prompts)
    return json.loads((run / "measures" / "pick.json").read_text())["step"]


def picks(rows: list[dict]) -> tuple[int, int]:
    """(the step picked from the measures, the step picked from the ground truths)."""
    from stylelora.sample.pick import pick

    steps = [int(row["label"].split()[1]) for row in rows]
    measured = [{**row, "step": step} for row, step in zip(rows, steps, strict=True)]
    truths = [
        {
            "step": s,
            "style": r["palette_fall"],
            "content": r["iou"],
            "copying": 0,
            "base_copying": 0,
        }
        for r, s in zip(rows, steps, strict=True)
    ]
    return pick(measured)[0]["step"], pick(truths)[0]["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="the overfitting run's steps")
    parser.add_argument("--every", type=int, default=100, help="its checkpoint interval")
    parser.add_argument("--variant-steps", type=int, default=500, help="each variant's steps")
    parser.add_argument("--variants", nargs="*", default=VARIANTS, help="option-table names")
    parser.add_argument("--seeds", default="0,1", help="seeds of the benchmark's renders")
    parser.add_argument(
        "--subjects-every",
        type=int,
        choices=(1, 2, 4),
        default=1,
        help="render every N-th subject of each group (1: all 56)",
    )
    parser.add_argument(
        "--strengths",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[0.25, 0.5, 0.75],
        help="the default variant and the last checkpoint at these strengths too",
    )
    parser.add_argument("--run", type=Path, help="an overfitting run already trained")
    parser.add_argument(
        "--keep", type=Path, help="train into this folder (kept; a later call reuses its runs)"
    )
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        run = args.run
        if run is None and args.keep and (args.keep / "overfit" / "config.json").is_file():
            run = args.keep / "overfit"  # trained by an earlier call with --keep
        if run is None:
            run = work / "overfit"
            overrides = [
                *OVERFIT,
                f"train.max_steps={args.steps}",
                f"train.checkpoint_every_n_steps={args.every}",
                f"validation.measure_every_n_steps={args.every}",
            ]
            _, seconds = train_adapter(run, overrides, CONFIG)
            print(f"overfitting run: {args.steps} steps in {seconds:.0f} s", flush=True)
        adapters = checkpoint_adapters(run)
        last = list(adapters.values())[-1][0]
        for index, name in enumerate(args.variants):
            out = work / f"variant-{index}"
            if not (out / "demo-style.safetensors").is_file():
                overrides = [*OPTIONS[name], f"train.max_steps={args.variant_steps}"]
                _, seconds = train_adapter(out, overrides, CONFIG)
                print(f"variant {name}: {seconds:.0f} s", flush=True)
            adapters[name] = (out / "demo-style.safetensors", 1.0)
        weaker = {"the default": adapters[args.variants[0]][0], "the last checkpoint": last}
        for what, path in weaker.items() if args.variants else ():
            for scale in args.strengths:
                adapters[f"{what} at strength {scale}"] = (path, scale)
        print("| adapter | style | palette fall | content | silhouette IoU | copying |")
        print("|---|---|---|---|---|---|")
        renders = args.keep / "renders" if args.keep else None
        rows = evaluate(adapters, seeds, args.subjects_every, renders)
        report(rows, run, len(bench_prompts(seeds, args.subjects_every)))


def correlations(rows: list[dict], what: str) -> None:
    style = spearman([r["style"] for r in rows], [r["palette_fall"] for r in rows])
    content = spearman([r["content"] for r in rows], [r["iou"] for r in rows])
    print(f"{what} ({len(rows)}): rank correlation of style with the palette fall {style:.3f}, "
          f"of content with the silhouette IoU {content:.3f} (targets >= 0.8)")  # fmt: skip
    for seed in [key for key in rows[0] if key.startswith("seed ")]:
        halves = [r[seed] for r in rows]
        style = spearman([h["style"] for h in halves], [h["palette_fall"] for h in halves])
        content = spearman([h["content"] for h in halves], [h["iou"] for h in halves])
        print(f"  {seed}'s renders alone: {style:.3f} and {content:.3f}")


def report(rows: list[dict], run: Path, renders: int) -> None:
    print()
    correlations(rows, "all adapters")
    correlations([r for r in rows if "strength" not in r["label"]], "without the weaker ones")
    correlations([r for r in rows if r["label"].startswith("step ")], "the checkpoints alone")
    checkpoints = [r for r in rows if r["label"].startswith("step ")]
    measured, truth = picks(checkpoints)
    steps = [int(r["label"].split()[1]) for r in checkpoints]
    apart = abs(steps.index(measured) - steps.index(truth))
    print(f"picked from the measures: step {measured}; from the ground truths: step {truth} "
          f"({apart} checkpoint(s) apart, target <= 1)")  # fmt: skip
    import stylelora.sample.pick as rule

    chosen = rule.ENOUGH_STYLE
    for fraction in (0.8, 0.85, 0.95):  # how much the agreement owes to the rule's 90 %
        rule.ENOUGH_STYLE = fraction
        print(f"  with {fraction:.0%} instead: " + " and ".join(map(str, picks(checkpoints))))
    rule.ENOUGH_STYLE = chosen
    print(f"picked by `stylelora pick` (the run's own 4 held-out prompts): step {run_pick(run)}")
    print(f"picked by `stylelora pick --prompts 12`: step {run_pick(run, 12)}")
    per_adapter = np.mean([r["seconds"] for r in rows])
    print(f"{per_adapter:.1f} s per adapter ({renders} renders each)")


if __name__ == "__main__":
    main()
