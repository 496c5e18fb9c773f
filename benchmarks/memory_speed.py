"""Peak memory, seconds per step and the adapter overhead of training, at full model size.

Builds the real architecture (SD1.5 or SDXL, from the bundled skeleton configs) with random
weights, or the tiny model, sets a run up through the trainer's own `build_run` (a VRAM preset
and `--set` overrides apply), and times `training_step` against the frozen UNet's forward and
backward with the adapters switched off, on the same batch and noise. The two are interleaved,
so whatever else the machine does slows both alike.

    python benchmarks/memory_speed.py --family sd15 --preset sd15-8gb --steps 4 --resolution 256

Prints the peak memory (CUDA max allocated on a GPU, peak RSS on the CPU), the median seconds
of each kind of step, and the overhead ratio: training step / frozen forward + backward.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from PIL import Image

from stylelora.cli import quiet_libraries
from stylelora.config import PRESETS_DIR, load_config
from stylelora.data.dataset import derived_generator
from stylelora.families import detect_family, load_family
from stylelora.families.base import ModelFamily
from stylelora.families.skeletons import skeleton_dir
from stylelora.train.loss import draw_noise
from stylelora.train.placement import WEIGHT_DTYPES
from stylelora.train.run import TrainingRun, build_run, training_step

SKELETONS = {"sd15": "sd15", "sdxl": "sdxl"}


def random_component(folder: Path, library: str, class_name: str):
    """A pipeline component from its config alone: random weights, real sizes."""
    cls = getattr(importlib.import_module(library), class_name)
    if class_name.endswith(("Tokenizer", "Scheduler")):
        return cls.from_pretrained(folder)
    if library == "diffusers":
        return cls.from_config(cls.load_config(folder))
    return cls(cls.config_class.from_pretrained(folder))


def random_family(name: str, dtype: torch.dtype) -> ModelFamily:
    """The full-size `name` pipeline with random weights, built directly in `dtype`."""
    folder = skeleton_dir(SKELETONS[name])
    index = json.loads((folder / "model_index.json").read_text())
    pipeline_cls = getattr(importlib.import_module("diffusers"), index["_class_name"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        components = {
            key: random_component(folder / key, *value) if value[0] else None
            for key, value in index.items()
            if isinstance(value, list)
        }
    finally:
        torch.set_default_dtype(previous)
    if "requires_safety_checker" in inspect.signature(pipeline_cls.__init__).parameters:
        components["requires_safety_checker"] = False
    pipe = pipeline_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return detect_family(pipe)


def write_images(folder: Path, count: int, side: int) -> Path:
    """`count` noise images of `side` px with captions: timing does not depend on content."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = torch.randint(0, 256, (side, side, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"zqxstyle, image {i}, a painting of a house")
    return folder


def frozen_step(run: TrainingRun, batch: dict, draws: int) -> None:
    """The UNet's forward and backward on this step's inputs with the adapters off: what any
    training pays. The noisy latents require a gradient, so backward runs through every layer
    as it does for the adapters."""
    family, device = run.family, run.accelerator.device
    batch = send_to_device(batch, device)
    count = len(batch["captions"])
    generators = [derived_generator(run.cfg.seed, draws, i) for i in range(count)]
    noised = draw_noise(family, run.noise_scheduler, batch, generators)
    with torch.no_grad():
        text = run.text_cache.encode(batch["captions"]) if run.text_cache else None
        text = text or family.encode_prompts(batch["captions"])
    noisy = run.noise_scheduler.add_noise(noised.latents, noised.noise, noised.timesteps)
    noisy = noisy.to(family.unet.dtype).requires_grad_(True)
    family.unet.disable_adapters()
    try:
        with run.accelerator.autocast():
            out = family.unet(noisy, noised.timesteps, **family.unet_inputs(text, batch)).sample
        F.mse_loss(out.float(), noised.noise).backward()
    finally:
        family.unet.enable_adapters()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function, *args) -> float:
    synchronize()
    started = time.perf_counter()
    function(*args)
    synchronize()
    return time.perf_counter() - started


def train_step(run: TrainingRun, batches, draws: int) -> None:
    training_step(run, next(batches), draws)
    run.lr_scheduler.step()


def peak_memory() -> str:
    if torch.cuda.is_available():
        return f"CUDA max allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def endless(run: TrainingRun):
    epoch = 0
    while True:
        run.sampler.set_epoch(epoch)
        yield from run.loader
        epoch += 1


def measure(run: TrainingRun, steps: int) -> tuple[list[float], list[float]]:
    """Seconds of `steps` training steps and as many frozen steps, interleaved, after one
    warm-up of each."""
    batches = endless(run)
    train_times, frozen_times = [], []
    for step in range(steps + 1):
        batch = next(batches)
        frozen = timed(frozen_step, run, batch, step)
        trained = timed(train_step, run, iter([batch]), step)
        if step > 0:
            frozen_times.append(frozen)
            train_times.append(trained)
    return train_times, frozen_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["tiny", "sd15", "sdxl"], default="tiny")
    parser.add_argument("--preset", help="a VRAM preset from configs/, e.g. sd15-8gb")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    quiet_libraries()
    base = PRESETS_DIR / (f"{args.preset}.toml" if args.preset else "demo.toml")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_images(Path(tmp) / "data", 2 * args.batch_size, args.resolution)
        cfg = load_config(
            base,
            [
                f"data.dir={str(data)!r}",
                f"data.resolution={args.resolution}",
                f"data.min_bucket_side={args.resolution}",
                f"train.batch_size={args.batch_size}",
                "sample.prompts=[]",
                *args.overrides,
            ],
        )
        cfg.sample.prompts_file = None
        cfg.output_dir = Path(tmp) / "run"
        dtype = WEIGHT_DTYPES[cfg.train.mixed_precision]
        started = time.perf_counter()
        family = (
            load_family("tiny:sd15", dtype)
            if args.family == "tiny"
            else random_family(args.family, dtype)
        )
        print(f"built {args.family} in {time.perf_counter() - started:.0f} s")
        run = build_run(cfg, family)
        train_times, frozen_times = measure(run, args.steps)
    trained, frozen = statistics.median(train_times), statistics.median(frozen_times)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"{args.family}, preset {args.preset or 'none (demo.toml)'}, {args.resolution} px, "
        f"batch {args.batch_size}, mixed precision {cfg.train.mixed_precision}, "
        f"checkpointing {cfg.train.gradient_checkpointing}, optimizer {cfg.train.optimizer}, "
        f"quantize_base {cfg.train.quantize_base}, device {device}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"training step   s: {' '.join(f'{t:.2f}' for t in train_times)} (median {trained:.2f})")
    print(f"frozen fwd+bwd  s: {' '.join(f'{t:.2f}' for t in frozen_times)} (median {frozen:.2f})")
    print(f"overhead ratio {trained / frozen:.3f}; {peak_memory()}")


if __name__ == "__main__":
    main()
