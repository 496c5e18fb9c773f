"""Where a training step's time goes: one run of the real trainer, its phases timed.

Trains with `stylelora.train.trainer.train` on generated images and prints, per phase of the
step (data loading and decoding, upload to the device, the VAE, the noise draws, the text
encoder, the denoiser's forward, backward, clipping, the non-finite guard, the optimizer, the
schedule, EMA, logging; `other` is the rest of the loop), the seconds per step and its share,
after `--warmup` steps. A second, shorter run counts the host synchronisations per step: the
trainer's reads of device values (`host_read`), any other `.item()` / `bool(tensor)`, and
blocking uploads to a GPU (zero on the CPU, where nothing is uploaded).

    python benchmarks/step_profile.py                       # tiny SD1.5 model, caches as default
    python benchmarks/step_profile.py --caches off          # VAE and text encoder every step
    python benchmarks/step_profile.py --family sd15 --resolution 128 --steps 12 --warmup 2

`--family tiny` is the tiny random SD1.5-layout model on 32 captioned 64 px images, batch 2,
rank 4, the `attention` preset (the job `vs_diffusers_example.py` compares); `--family sd15`
builds the full-size SD1.5 architecture with random weights (as `memory_speed.py` does).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_speed import random_family, write_images  # noqa: E402

from stylelora.cli import quiet_libraries  # noqa: E402
from stylelora.config import Config, load_config  # noqa: E402
from stylelora.families import load_family  # noqa: E402
from stylelora.families.base import ModelFamily  # noqa: E402
from stylelora.train.profile import StepProfile  # noqa: E402
from stylelora.train.trainer import train  # noqa: E402

CACHES = {
    "default": [],
    "off": ["data.cache_latents=false", "data.cache_text_encoder_outputs=false"],
}


def profile_config(args: argparse.Namespace, root: Path, steps: int) -> Config:
    """The demo config on generated images, without previews, checkpoints or logs."""
    data = root / "data"
    if not data.exists():
        write_images(data, args.images, args.resolution)
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "demo.toml",
        [
            f"data.dir={str(data)!r}",
            f"data.resolution={args.resolution}",
            f"data.min_bucket_side={args.resolution}",
            f"data.cache_dir={str(root / 'cache')!r}",
            f"train.max_steps={steps}",
            f"train.batch_size={args.batch_size}",
            f"adapter.rank={args.rank}",
            f"adapter.alpha={args.rank}",
            "adapter.unet_targets='attention'",
            "train.max_timestep=''",
            "train.loraplus_lr_ratio=''",
            "train.log_with='none'",
            "train.checkpoint_every_n_steps=0",
            "sample.prompts=[]",
            *CACHES[args.caches],
            *args.overrides,
        ],
    )
    cfg.sample.prompts_file = None
    cfg.output_dir = root / f"run-{steps}"
    return cfg


def model(args: argparse.Namespace) -> ModelFamily:
    if args.family == "tiny":
        return load_family("tiny:sd15")
    return random_family("sd15", torch.float32)


def profiled_run(args: argparse.Namespace, root: Path, steps: int, **options) -> StepProfile:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    profile = StepProfile(device, warmup=args.warmup, **options)
    train(profile_config(args, root, steps), overwrite=True, family=model(args), profile=profile)
    return profile


def print_table(profile: StepProfile) -> None:
    per_step = profile.per_step()
    total = sum(per_step.values())
    print("| phase | s / step | share |\n|---|---:|---:|")
    for name, seconds in per_step.items():
        print(f"| {name} | {seconds:.4f} | {100 * seconds / total:.1f} % |")
    print(f"| **step** | **{total:.4f}** | {profile.steps} steps after {profile.warmup} |")


def print_syncs(profile: StepProfile) -> None:
    """Host reads and blocking uploads per step, by phase. On the CPU every tensor counts; on a
    GPU a read of a CPU tensor (AdamW's step counters, a cache entry's sizes) waits for
    nothing, but the trainer's reads and any read of a device tensor wait for the device."""
    print("\n| phase | host reads / step | blocking uploads / step |\n|---|---:|---:|")
    for name, counts in profile.syncs_per_step().items():
        print(f"| {name} | {counts['reads']:g} | {counts['uploads']:g} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--caches", choices=sorted(CACHES), default="default")
    parser.add_argument("--steps", type=int, default=300, help="steps timed, after the warm-up")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--sync-steps", type=int, default=20, help="steps of the counting run")
    parser.add_argument("--resolution", type=int, help="default: 64 (tiny), 128 (sd15)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    args.resolution = args.resolution or (64 if args.family == "tiny" else 128)
    return args


def main() -> None:
    args = parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        timing = profiled_run(args, root, args.warmup + args.steps)
        counting = profiled_run(args, root, args.warmup + args.sync_steps, count_syncs=True)
    print(
        f"\n{args.family}, {args.resolution} px, batch {args.batch_size}, rank {args.rank}, "
        f"caches {args.caches}, {torch.get_num_threads()} threads"
    )
    print_table(timing)
    print_syncs(counting)


if __name__ == "__main__":
    main()
