"""stylelora's trainer against diffusers' own LoRA example, side by side, on the same job.

Both programs train a LoRA (rank 4, alpha 4, on the UNet's to_q/to_k/to_v/to_out.0: stylelora's
`adapter.unet_targets = "attention"`, the example's default targets) on the same tiny
SD1.5-layout model and the same 32 captioned 64 px images, batch 2, AdamW at a constant 1e-4
with no warm-up, gradient clipping at 1.0, centre crop, no flip, fp32, seed 0, for the same
number of steps, with no validation, previews or checkpoints. Each run is a fresh process:

    stylelora:  python -m stylelora train CONFIG.toml [--set KEY=VALUE ...]
    example:    python examples/text_to_image/train_text_to_image_lora.py --resolution 64 ...

The runs alternate (stylelora, example, stylelora, example, ...), so whatever else the machine
does slows both alike. For each run it prints:

- wall s: the whole process, start-up and saving included;
- 1st step s: from the process's start to its first optimizer step (imports, loading, data);
- s/step: the steady time per step, the median interval between optimizer steps after the
  first 10;
- peak RSS: the process's maximum resident set (`os.wait4`'s ru_maxrss; a data-loading worker
  counts only if it alone grew larger);

then each pair's ratios stylelora / example, and the median ratio over the pairs.

Neither program's training code is changed: each runs under a small wrapper (written into the
work folder) that registers torch's global optimizer step hook, records `time.perf_counter()`
after every optimizer step, and writes the stamps to a JSON file as the process exits.

The tiny model is built once with `stylelora make-tiny-model --family sd15` and saved with
`save_pretrained` (its tokenizer reads with `CLIPTokenizer.from_pretrained`); the images are
flat coloured shapes drawn with Pillow, written once in both layouts (`NAME.png` + `NAME.txt`
for stylelora, `metadata.jsonl` for the example's `imagefolder` dataset). Each run gets empty
caches: stylelora's latents cache and the example's datasets cache live in the run's folder.

The example needs torchvision, datasets and tensorboard (it logs its loss to TensorBoard:
accelerate has no "no tracker" value for its `--report_to`), so it runs in its own environment;
give the same environment to `--stylelora-python` (with stylelora installed there) to compare
both on one torch build:

    python benchmarks/vs_diffusers_example.py --steps 60 --pairs 3 \
        --example-python /path/to/venv/bin/python --diffusers-src /path/to/diffusers
    python benchmarks/vs_diffusers_example.py --steps 300 --pairs 3 \
        --stylelora-python /path/to/venv/bin/python --stylelora-set data.cache_latents=false

`--diffusers-src` is a checkout (or unpacked sdist) of diffusers holding
`examples/text_to_image/train_text_to_image_lora.py`. `--work DIR` keeps the model, the images
and every run's folder and log (by default a temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))
from flat_shapes import COLORS as FLAT_COLORS  # noqa: E402

EXAMPLE_SCRIPT = Path("examples/text_to_image/train_text_to_image_lora.py")
WARMUP_STEPS = 10  # steps left out of the steady time per step
RESOLUTION = 64
IMAGES = 32
BATCH_SIZE = 2
RANK = 4
LEARNING_RATE = 1e-4
SEED = 0

# Runs the program given after the JSON path (`-m MODULE ARGS` or `SCRIPT ARGS`) as `python`
# would, recording the time after each optimizer step; the stamps are written at exit.
STEP_CLOCK = """\
import atexit, json, os, runpy, sys, time

started = time.perf_counter()
out, *program = sys.argv[1:]
stamps = []

from torch.optim.optimizer import register_optimizer_step_post_hook

register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))


@atexit.register
def write_stamps():
    with open(out, "w") as f:
        json.dump({"pid": os.getpid(), "started": started, "steps": stamps}, f)


if program[0] == "-m":
    sys.argv = program[1:]
    sys.path[0] = os.getcwd()
    runpy.run_module(program[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = program
    sys.path[0] = os.path.dirname(os.path.abspath(program[0]))
    runpy.run_path(program[0], run_name="__main__")
"""

# eight of the demo base's picture colours
COLORS = {
    name: FLAT_COLORS[name]
    for name in ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
}
SHAPES = ("circle", "square", "triangle", "diamond")


class RunFailed(Exception):
    pass


@dataclass
class Run:
    side: str  # "stylelora" or "example"
    wall: float  # seconds, the whole process
    first_step: float  # seconds from the process's start to its first optimizer step
    per_step: float  # median seconds per optimizer step after WARMUP_STEPS
    peak_rss_mib: float
    steps: int


def draw_shape(shape: str, color: str, background: str) -> Image.Image:
    image = Image.new("RGB", (RESOLUTION, RESOLUTION), COLORS[background])
    pen = ImageDraw.Draw(image)
    lo, hi, mid = RESOLUTION * 0.2, RESOLUTION * 0.8, RESOLUTION / 2
    fill = COLORS[color]
    if shape == "circle":
        pen.ellipse((lo, lo, hi, hi), fill=fill)
    elif shape == "square":
        pen.rectangle((lo, lo, hi, hi), fill=fill)
    elif shape == "triangle":
        pen.polygon([(mid, lo), (hi, hi), (lo, hi)], fill=fill)
    else:
        pen.polygon([(mid, lo), (hi, mid), (mid, hi), (lo, mid)], fill=fill)
    return image


def write_images(stylelora_dir: Path, example_dir: Path) -> None:
    """IMAGES pictures, as NAME.png + NAME.txt and as NAME.png + metadata.jsonl."""
    names = list(COLORS)
    rows = []
    for folder in (stylelora_dir, example_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(IMAGES):
        shape = SHAPES[i % len(SHAPES)]
        color = names[i // len(SHAPES) % len(names)]
        background = names[(i // len(SHAPES) + 1 + i % 3) % len(names)]
        caption = f"a {color} {shape} on a {background} background"
        image = draw_shape(shape, color, background)
        name = f"{i:03d}"
        image.save(stylelora_dir / f"{name}.png")
        (stylelora_dir / f"{name}.txt").write_text(caption + "\n")
        image.save(example_dir / f"{name}.png")
        rows.append(json.dumps({"file_name": f"{name}.png", "text": caption}))
    (example_dir / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def prepare(work: Path, stylelora_python: str) -> tuple[Path, Path, Path]:
    """The tiny model and both image folders, made once per work folder."""
    model, data = work / "model", work / "data"
    if not (model / "model_index.json").exists():
        shutil.rmtree(model, ignore_errors=True)
        subprocess.run(
            [stylelora_python, "-m", "stylelora", "make-tiny-model", "--family", "sd15", model],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    if not (data / "example" / "metadata.jsonl").exists():
        shutil.rmtree(data, ignore_errors=True)
        write_images(data / "stylelora", data / "example")
    (work / "step_clock.py").write_text(STEP_CLOCK)
    return model, data / "stylelora", data / "example"


def toml_string(value: object) -> str:
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def stylelora_command(
    args: argparse.Namespace, model: Path, images: Path, run_dir: Path
) -> list[str]:
    config = run_dir / "config.toml"
    config.write_text(
        f"""name = "vs-example"
model = {toml_string(model)}
output_dir = {toml_string(run_dir / "out")}
seed = {SEED}

[data]
dir = {toml_string(images)}
cache_dir = {toml_string(run_dir / "cache")}
resolution = {RESOLUTION}
center_crop = true
flip = false

[adapter]
rank = {RANK}
alpha = {float(RANK)}
unet_targets = "attention"
init = "gaussian"

[train]
max_steps = {args.steps}
batch_size = {BATCH_SIZE}
learning_rate = {LEARNING_RATE}
lr_scheduler = "constant"
lr_warmup_steps = 0
mixed_precision = "no"
max_grad_norm = 1.0
checkpoint_every_n_steps = 0
log_with = "none"
"""
    )
    extra = [option for item in args.stylelora_set for option in ("--set", item)]
    return [args.stylelora_python, "-m", "stylelora", "train", str(config), *extra]


def example_command(
    args: argparse.Namespace, model: Path, images: Path, run_dir: Path
) -> list[str]:
    return [
        args.example_python,
        str(args.diffusers_src / EXAMPLE_SCRIPT),
        f"--pretrained_model_name_or_path={model}",
        f"--train_data_dir={images}",
        f"--resolution={RESOLUTION}",
        "--center_crop",
        f"--train_batch_size={BATCH_SIZE}",
        f"--max_train_steps={args.steps}",
        f"--rank={RANK}",
        f"--learning_rate={LEARNING_RATE}",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        f"--seed={SEED}",
        "--dataloader_num_workers=0",
        f"--output_dir={run_dir / 'out'}",
        f"--cache_dir={run_dir / 'cache'}",
        "--mixed_precision=no",
        "--max_grad_norm=1.0",
        "--checkpointing_steps=100000000",
        "--report_to=tensorboard",
    ]


def timed_run(side: str, command: list[str], run_dir: Path, work: Path, steps: int) -> Run:
    """Run `command` under the step clock in a fresh process; its times and peak RSS."""
    stamps_file = run_dir / "steps.json"
    python, *program = command
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    log = run_dir / "log.txt"
    with log.open("w") as out:
        started = time.perf_counter()
        process = subprocess.Popen(
            [python, str(work / "step_clock.py"), str(stamps_file), *program],
            cwd=run_dir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0 or not stamps_file.exists():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RunFailed(f"{side} run failed (exit {process.returncode}); end of {log}:\n{tail}")
    stamps = json.loads(stamps_file.read_text())["steps"]
    if len(stamps) != steps:
        print(f"warning: {side} took {len(stamps)} optimizer steps, not {steps}", file=sys.stderr)
    intervals = [b - a for a, b in pairwise(stamps[WARMUP_STEPS:])]
    return Run(
        side=side,
        wall=wall,
        first_step=stamps[0] - started if stamps else float("nan"),
        per_step=statistics.median(intervals) if intervals else float("nan"),
        peak_rss_mib=usage.ru_maxrss / 1024,  # KiB on Linux
        steps=len(stamps),
    )


def print_run(pair: int, run: Run) -> None:
    print(
        f"{pair:>4}  {run.side:<9}  {run.wall:8.1f}  {run.first_step:10.1f}  "
        f"{run.per_step:9.4f}  {run.peak_rss_mib:9.0f}  {run.steps:5}",
        flush=True,
    )


def print_ratios(pairs: list[tuple[Run, Run]]) -> None:
    fields = [
        ("wall s", "wall"),
        ("1st step s", "first_step"),
        ("s/step", "per_step"),
        ("peak RSS", "peak_rss_mib"),
    ]
    print("\nstylelora / example")
    print("pair  " + "  ".join(f"{title:>10}" for title, _ in fields))
    ratios = {name: [] for _, name in fields}
    for i, (ours, theirs) in enumerate(pairs, 1):
        row = []
        for _, name in fields:
            ratio = getattr(ours, name) / getattr(theirs, name)
            ratios[name].append(ratio)
            row.append(f"{ratio:10.3f}")
        print(f"{i:>4}  " + "  ".join(row))
    print("med.  " + "  ".join(f"{statistics.median(ratios[name]):10.3f}" for _, name in fields))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (60)")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved pairs of runs (3)")
    parser.add_argument(
        "--example-python",
        required=True,
        help="python of an environment with the example's requirements",
    )
    parser.add_argument(
        "--stylelora-python", default=sys.executable, help="python with stylelora installed"
    )
    parser.add_argument(
        "--diffusers-src",
        type=Path,
        required=True,
        help=f"diffusers source tree holding {EXAMPLE_SCRIPT}",
    )
    parser.add_argument("--work", type=Path, help="folder for the model, images and runs")
    parser.add_argument(
        "--stylelora-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra stylelora config key (repeatable), e.g. data.cache_latents=false",
    )
    args = parser.parse_args()
    if args.steps < WARMUP_STEPS + 2:
        parser.error(
            f"--steps must be at least {WARMUP_STEPS + 2}: the first {WARMUP_STEPS} are "
            "left out of the steady time per step"
        )
    if not (args.diffusers_src / EXAMPLE_SCRIPT).exists():
        parser.error(f"{args.diffusers_src / EXAMPLE_SCRIPT}: not found (see --diffusers-src)")
    return args


def main() -> None:
    args = parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="vs-diffusers-example-"))
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        model, stylelora_images, example_images = prepare(work, args.stylelora_python)
        print(f"{args.steps} steps, batch {BATCH_SIZE}, {IMAGES} images at {RESOLUTION} px")
        print(f"stylelora: {args.stylelora_python} {' '.join(args.stylelora_set)}")
        print(f"example:   {args.example_python}")
        print(
            f"\npair  {'run':<9}  {'wall s':>8}  {'1st step s':>10}  {'s/step':>9}  "
            f"{'peak MiB':>9}  {'steps':>5}"
        )
        pairs = []
        for pair in range(1, args.pairs + 1):
            runs = []
            for side in ("stylelora", "example"):
                run_dir = work / "runs" / f"{pair}-{side}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir(parents=True)
                if side == "stylelora":
                    command = stylelora_command(args, model, stylelora_images, run_dir)
                else:
                    command = example_command(args, model, example_images, run_dir)
                runs.append(timed_run(side, command, run_dir, work, args.steps))
                print_run(pair, runs[-1])
            pairs.append((runs[0], runs[1]))
        print_ratios(pairs)
    except RunFailed as failed:
        sys.exit(f"{failed}\n(the work folder {work} is kept)")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
