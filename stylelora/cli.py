"""The `stylelora` command: subcommands parse their arguments and call into the package."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import warnings
from pathlib import Path

from stylelora.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylelora", description="Train and use LoRA adapters for Stable Diffusion."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train an adapter from a TOML config")
    train.add_argument("config", type=Path, help="TOML config file")
    train.add_argument("--output-dir", type=Path, help="run folder (overrides output_dir)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, dotted for sections: --set train.max_steps=200",
    )
    train.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help='continue from "latest" (the newest complete checkpoint) or a checkpoint folder',
    )
    train.set_defaults(run=run_train)

    sample = commands.add_parser("sample", help="render an image with an adapter")
    sample.add_argument(
        "--model", required=True, help='base model: hub id, folder, single file, or "tiny:sdxl"'
    )
    sample.add_argument("--adapter", type=Path, help="kohya-format .safetensors adapter")
    sample.add_argument("--prompt", required=True)
    sample.add_argument("--negative", default="", help="negative prompt")
    sample.add_argument("--scale", type=float, default=1.0, help="adapter strength")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--steps", type=int, default=20)
    sample.add_argument("--guidance", type=float, default=7.5)
    sample.add_argument("--width", type=int)
    sample.add_argument("--height", type=int)
    sample.add_argument("--out", type=Path, required=True, help="output PNG")
    sample.add_argument(
        "--compare", action="store_true", help="put the image without the adapter on the left"
    )
    sample.set_defaults(run=run_sample)

    dataset = commands.add_parser("dataset", help="inspect a training dataset")
    dataset_commands = dataset.add_subparsers(dest="dataset_command", required=True)
    check = dataset_commands.add_parser(
        "check", help="scan a folder: counts, captions, buckets and every unusable file"
    )
    check.add_argument("dir", type=Path, help="dataset folder")
    check.add_argument("--config", type=Path, help="TOML config whose [data] options apply")
    check.set_defaults(run=run_dataset_check)

    tiny = commands.add_parser(
        "make-tiny-model", help="write a tiny random diffusers pipeline (for demos and tests)"
    )
    tiny.add_argument("--family", default="sd15", help="model family: sd15, sd2v or sdxl")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("folder", type=Path)
    tiny.set_defaults(run=run_make_tiny_model)
    return parser


def run_train(args: argparse.Namespace) -> int:
    from stylelora.config import load_config
    from stylelora.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    if args.output_dir:
        cfg.output_dir = args.output_dir
    result = train(cfg, resume=args.resume)
    if not result.interrupted:
        return 0
    again = [shell_word(str(args.config)), *(f"--set {shell_word(i)}" for i in args.overrides)]
    if args.output_dir:
        again.append(f"--output-dir {shell_word(str(args.output_dir))}")
    print(
        f"stylelora: stopped at step {result.steps}; checkpoint {result.checkpoint}\n"
        f"  resume with: stylelora train {' '.join(again)} --resume latest",
        file=sys.stderr,
    )
    return 130


def shell_word(text: str) -> str:
    """`text` quoted for a POSIX shell, in double quotes where it holds single ones."""
    if shlex.quote(text) == text or any(c in text for c in '"$`\\!'):
        return shlex.quote(text)
    return f'"{text}"'


def run_sample(args: argparse.Namespace) -> None:
    from stylelora.sample.adapter import render_with_adapter

    render_with_adapter(
        model=args.model,
        adapter=args.adapter,
        prompt=args.prompt,
        negative=args.negative,
        scale=args.scale,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        size=(args.width, args.height),
        out=args.out,
        compare=args.compare,
    )
    print(f"wrote {args.out}")


def run_dataset_check(args: argparse.Namespace) -> None:
    from stylelora.config import DataConfig, load_config
    from stylelora.data.dataset import ImageCaptionDataset
    from stylelora.data.report import data_options, describe, scan_dataset

    if args.config:
        cfg = load_config(args.config, [f"data.dir={str(args.dir)!r}"])
        data, seed = cfg.data, cfg.seed
    else:
        data, seed = DataConfig(dir=args.dir), 0
    scan = scan_dataset(data)
    dataset = ImageCaptionDataset(scan.records, data_options(data, seed))
    print("\n".join(describe(scan, dataset, data)))


def run_make_tiny_model(args: argparse.Namespace) -> None:
    from stylelora.families.tiny import make_tiny_model

    make_tiny_model(args.family, args.folder, seed=args.seed)
    print(f"wrote a tiny {args.family} pipeline to {args.folder}")


def quiet_libraries() -> None:
    """Keep the libraries' info logs and loading bars out of the user's terminal."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        quiet_libraries()
        status = args.run(args)
    except UserError as exc:
        print(f"stylelora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stylelora: interrupted", file=sys.stderr)
        return 130
    return status or 0
