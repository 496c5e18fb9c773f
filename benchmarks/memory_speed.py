"""Peak memory, seconds per step and the adapter overhead of training, at full model size.

Builds the real architecture (SD1.5 or SDXL, from the bundled skeleton configs) with random
weights, or the tiny model, sets a run up through the trainer's own `build_run` (a VRAM preset
and `--set` overrides apply), and times `training_step` against the frozen UNet's forward and
backward with the adapters switched off, on the same batch and noise. The two are interleaved,
so whatever else the machine does slows both alike.

    python benchmarks/memory_speed.py --family sd15 --preset sd15-8gb --steps 4 --resolution 256

Prints the peak memory (CUDA max allocated on a GPU, peak RSS on the CPU), the median seconds
of each kind of step, and the overhead ratio: training step / frozen forward + backward.

With `--count-tensors` it runs `--steps` training steps instead and counts the bytes of every
tensor an accelerator would hold (the weights left on the device, adapters, gradients,
optimizer state, activations), alive at once at the peak: an estimate of CUDA's max allocated
memory made without a GPU. On the CPU fp16 is counted as bf16, which has the same size.

    python benchmarks/memory_speed.py --family sd15 --preset sd15-4gb --resolution 512 \
        --steps 2 --count-tensors
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import resource
import statistics
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from stylelora.adapters.inject import adapters_disabled
from stylelora.cli import quiet_libraries
from stylelora.config import Config, load_config, preset_path
from stylelora.data.dataset import derived_generator
from stylelora.errors import UserError
from stylelora.families import detect_family, load_family
from stylelora.families.base import ModelFamily
from stylelora.families.skeletons import skeleton_dir
from stylelora.train.loss import draw_noise
from stylelora.train.optim import check_optimizer
from stylelora.train.placement import WEIGHT_DTYPES
from stylelora.train.run import TrainingRun, build_run, training_step


def random_component(folder: Path, library: str, class_name: str):
    """A pipeline component from its config alone: random weights, real sizes."""
    cls = getattr(importlib.import_module(library), class_name)
    if class_name.endswith(("Tokenizer", "Scheduler")):
        return cls.from_pretrained(folder)
    if library == "diffusers":
        model = cls.from_config(cls.load_config(folder))
    else:
        model = cls(cls.config_class.from_pretrained(folder))
    # transformers builds in the config's `torch_dtype` (fp16 for SDXL's text encoders)
    return model.to(torch.get_default_dtype())


def random_family(name: str, dtype: torch.dtype) -> ModelFamily:
    """The full-size `name` pipeline with random weights, built directly in `dtype`."""
    folder = skeleton_dir(name)
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
    noised = draw_noise(family, run.objective, batch, generators)
    with torch.no_grad():
        text = run.text_cache.encode(batch["captions"]) if run.text_cache else None
        text = text or family.encode_prompts(batch["captions"])
    noisy = run.objective.noisy(noised).to(family.unet.dtype).requires_grad_(True)
    with adapters_disabled([family.unet]), run.accelerator.autocast():
        out = family.denoise(family.unet, noisy, noised.timesteps, text, batch)
        F.mse_loss(out.float(), run.objective.target(noised).float()).backward()


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


def gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB ({size / 2**20:.0f} MiB)"


def setup_peak() -> float | None:
    """CUDA's max allocated GiB so far (loading, caching), then counting starts again for the
    steps; None on the CPU."""
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def peak_memory(setup: float | None) -> str:
    if torch.cuda.is_available():
        steps = torch.cuda.max_memory_allocated() / 2**30
        return f"CUDA max allocated: {setup:.2f} GiB setting up (caches), {steps:.2f} GiB steps"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


class TensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive within the block, and their peak: `resident` storages
    (weights on the device) from the start, plus every storage an operation creates, until it
    is freed. A view shares its base's storage and is counted once.

    Written here because torch's own MemTracker (torch.distributed._tools) registers a
    gradient hook on every parameter of a module it sees, which fails on a frozen base.
    """

    def __init__(self, resident: list[torch.Tensor], count_meta: bool = False):
        super().__init__()
        self.count_meta = count_meta  # a model on the meta device stands for the accelerator
        self.seen = WeakIdKeyDictionary()
        self.live = self.peak = 0
        for tensor in resident:
            self.count(tensor)

    def count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self.seen:
            return
        self.seen[storage] = True
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self.release, storage.nbytes())

    def release(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and (self.count_meta or leaf.device.type != "meta"):
                self.count(leaf)
        return out


def others(family: ModelFamily, *excluded: torch.nn.Module) -> list[torch.nn.Module]:
    """The family's modules but `excluded`."""
    return [m for m in family.modules() if all(m is not e for e in excluded)]


def device_tensors(run: TrainingRun) -> list[torch.Tensor]:
    """The weights a GPU run keeps on the device: all but the modules parked on the CPU."""
    return [t for m in others(run.family, *run.idle) for t in (*m.parameters(), *m.buffers())]


def quantized_tensors(modules: list[torch.nn.Module]) -> list[torch.Tensor]:
    """bitsandbytes weights: quantized on the device, they stay there from the start."""
    kinds = ("Params4bit", "Int8Params")
    return [p for m in modules for p in m.parameters() if type(p).__name__ in kinds]


def count_caching(run: TrainingRun) -> int:
    """Peak bytes while the caches fill: each encoder visits the device alone (beside the
    quantized layers) and encodes one batch of the training resolution, or one caption."""
    family, cfg = run.family, run.cfg
    vae = family.vae
    side = cfg.data.largest_resolution
    pixels = torch.zeros(cfg.train.batch_size, 3, side, side, dtype=vae.dtype)
    with torch.no_grad():
        encoders = list(family.text_encoders().values())
        with TensorBytes([*vae.parameters(), *quantized_tensors(others(family, vae))]) as latents:
            family.encode_posterior(pixels)
        resident = [p for m in encoders for p in m.parameters()]
        with TensorBytes([*resident, *quantized_tensors(others(family, *encoders))]) as text:
            family.encode_prompts(["zqxstyle, a painting of a house"])
    return max(latents.peak, text.peak)


def count_tensors(run: TrainingRun, steps: int) -> tuple[int, int]:
    """Peak bytes alive over `steps` training steps, and the resident weights' bytes."""
    batches = endless(run)
    counter = TensorBytes(device_tensors(run))
    resident = counter.live
    with counter:
        for step in range(steps):
            train_step(run, batches, step)
    return counter.peak, resident


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


def benchmark_config(args: argparse.Namespace, data_root: Path) -> tuple[Config, bool]:
    """The preset (or the demo config) with the benchmark's data, resolution and overrides, and
    whether its fp16 is counted as bf16: on the CPU, where accelerate runs no fp16, bf16 has
    the same bytes."""
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"
    base = preset_path(args.preset, Path.cwd()) if args.preset else demo
    cfg = load_config(base, [*args.overrides])
    batch = args.batch_size or cfg.train.batch_size
    data = write_images(data_root / "data", 2 * batch, args.resolution)
    as_bf16 = (
        args.count_tensors and cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available()
    )
    precision = "bf16" if as_bf16 else cfg.train.mixed_precision
    cfg = load_config(
        base,
        [
            f"data.dir={str(data)!r}",
            f"data.resolution={args.resolution}",
            f"data.min_bucket_side={args.resolution}",
            f"train.batch_size={batch}",
            *args.overrides,
            f"train.mixed_precision={precision!r}",
            "sample.prompts=[]",
        ],
    )
    cfg.sample.prompts_file = None
    cfg.output_dir = data_root / "run"
    return cfg, as_bf16


def main() -> int:
    """The benchmark; a mistake in its arguments or a missing package is one line, status 2."""
    try:
        benchmark(parse_args())
    except UserError as exc:
        print(f"memory_speed: error: {exc}", file=sys.stderr)
        return 2
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["tiny", "sd15", "sdxl"], default="tiny")
    parser.add_argument("--preset", help="a VRAM preset from configs/, e.g. sd15-8gb")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, help="default: the preset's")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--count-tensors",
        action="store_true",
        help="count the peak bytes of the tensors an accelerator would hold, instead of timing",
    )
    return parser.parse_args()


def benchmark(args: argparse.Namespace) -> None:
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        cfg, as_bf16 = benchmark_config(args, Path(tmp))
        check_optimizer(cfg.train)  # before minutes of building a full-size model
        dtype = WEIGHT_DTYPES[cfg.train.mixed_precision]
        started = time.perf_counter()
        family = (
            load_family("tiny:sd15", dtype)
            if args.family == "tiny"
            else random_family(args.family, dtype)
        )
        print(f"built {args.family} in {time.perf_counter() - started:.0f} s", flush=True)
        run = build_run(cfg, family)
        setup = setup_peak()
        if args.count_tensors:
            if as_bf16:  # but the VAE keeps its fp16 run's dtype (SDXL's: fp32)
                family.vae.to(family.vae_dtype(torch.float16))
            caching = count_caching(run)
            peak, resident = count_tensors(run, args.steps)
        else:
            train_times, frozen_times = measure(run, args.steps)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"{args.family}, preset {args.preset or 'none (demo.toml)'}, {args.resolution} px, "
        f"batch {cfg.train.batch_size}, mixed precision {cfg.train.mixed_precision}"
        f"{' (fp16 counted as bf16)' if as_bf16 else ''}, "
        f"checkpointing {cfg.train.gradient_checkpointing}, optimizer {cfg.train.optimizer}, "
        f"quantize_base {cfg.train.quantize_base}, device {device}, "
        f"{torch.get_num_threads()} threads"
    )
    if args.count_tensors:
        print(
            f"tensors an accelerator would hold over {args.steps} steps: peak {gib(peak)}, "
            f"of which {gib(resident)} weights on the device; while caching: peak "
            f"{gib(caching)}; {peak_memory(setup)}"
        )
        return
    trained, frozen = statistics.median(train_times), statistics.median(frozen_times)
    print(f"training step   s: {' '.join(f'{t:.2f}' for t in train_times)} (median {trained:.2f})")
    print(f"frozen fwd+bwd  s: {' '.join(f'{t:.2f}' for t in frozen_times)} (median {frozen:.2f})")
    print(f"overhead ratio {trained / frozen:.3f}; {peak_memory(setup)}")


if __name__ == "__main__":
    sys.exit(main())
