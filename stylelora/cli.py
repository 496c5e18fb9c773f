"""The `stylelora` command: subcommands parse their arguments and call into the package."""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import warnings
from pathlib import Path

from stylelora.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from stylelora.caption.command import add_caption_command
    from stylelora.families.registry import family_names

    parser = argparse.ArgumentParser(
        prog="stylelora", description="Train and use LoRA adapters for diffusion models."
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
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the adapter an earlier run left in the output folder",
    )
    train.set_defaults(run=run_train)

    sample = commands.add_parser("sample", help="render an image with an adapter")
    add_model_arguments(sample)
    add_option_arguments(sample)
    sample.add_argument(
        "--adapter",
        type=Path,
        help="kohya or diffusers .safetensors, or a PEFT folder or file (as export writes)",
    )
    sample.add_argument("--prompt", required=True)
    sample.add_argument("--negative", default="", help="negative prompt")
    sample.add_argument("--scale", type=float, default=1.0, help="adapter strength")
    sample.add_argument(
        "--scales",
        type=strengths,
        metavar="S,S,...",
        help="several strengths (e.g. 0,0.5,1), rendered left to right in one row; "
        "instead of --scale",
    )
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
    tiny.add_argument(
        "--family", default=family_names()[0], help=f"model family: {', '.join(family_names())}"
    )
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("folder", type=Path)
    tiny.set_defaults(run=run_make_tiny_model)
    add_tool_commands(commands)
    add_caption_command(commands)
    add_ui_command(commands)
    return parser


def add_ui_command(commands) -> None:
    ui = commands.add_parser(
        "ui", help="a local web UI: start runs, watch them, browse datasets and results"
    )
    ui.add_argument("--host", default="127.0.0.1", help="other than 127.0.0.1: needs a token")
    ui.add_argument("--port", type=int, default=7870)
    ui.add_argument(
        "--root",
        dest="roots",
        action="append",
        type=Path,
        metavar="DIR",
        help="a folder the UI may read and write (repeatable; default: the current folder)",
    )
    ui.add_argument(
        "--data", type=Path, help="the UI's database folder (default: ROOT/.stylelora-ui)"
    )
    ui.add_argument("--token", help="the access token (default: made at start)")
    ui.set_defaults(run=run_ui)


def add_tool_commands(commands) -> None:
    """export, merge, resize, combine, inspect, pick: see stylelora/export/tools.py and
    stylelora/sample/pick_run.py."""
    from stylelora.caption.command import positive
    from stylelora.families.registry import ui_formats

    export = commands.add_parser("export", help="convert an adapter between formats")
    export.add_argument(
        "adapter", type=Path, help="kohya or diffusers .safetensors, or a PEFT folder or file"
    )
    export.add_argument(
        "--format",
        choices=["kohya", "comfyui", "diffusers", "peft"],
        required=True,
        help="kohya, comfyui: the layout the UIs read for the adapter's family ("
        + "; ".join(f"{fmt}: {titles}" for fmt, titles in ui_formats().items())
        + ")",
    )
    export.add_argument("--out", type=Path, required=True, help="file (peft: a folder)")
    export.add_argument(
        "--model", help="base model whose module names to use (default: the family's)"
    )
    export.set_defaults(run=run_export)

    merge = commands.add_parser("merge", help="merge adapters into a base model")
    add_model_arguments(merge)
    merge.add_argument(
        "--adapter", action="append", required=True, metavar="FILE[:STRENGTH]", help="repeatable"
    )
    merge.add_argument("--out", type=Path, required=True, help="folder, or FILE.safetensors")
    merge.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    merge.set_defaults(run=run_merge)

    resize = commands.add_parser("resize", help="reduce an adapter's rank by SVD")
    resize.add_argument("adapter", type=Path)
    size = resize.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="the same rank for every module")
    size.add_argument("--energy", type=float, help="per module, keep this share (e.g. 0.99)")
    resize.add_argument("--out", type=Path, required=True)
    resize.set_defaults(run=run_resize)

    combine = commands.add_parser("combine", help="combine adapters at strengths into one")
    combine.add_argument("adapters", nargs="+", metavar="FILE[:STRENGTH]")
    combine.add_argument("--out", type=Path, required=True)
    combine.add_argument("--rank", type=int, help="reduce the combination to this rank by SVD")
    combine.set_defaults(run=run_combine)

    inspect = commands.add_parser("inspect", help="describe an adapter file, or what is broken")
    inspect.add_argument("file", type=Path)
    inspect.set_defaults(run=run_inspect)

    pick = commands.add_parser(
        "pick", help="measure a run's checkpoints and write the one to keep as NAME-best"
    )
    pick.add_argument("run_dir", type=Path, help="the run folder (output_dir)")
    pick.add_argument(
        "--prompts",
        type=positive,
        metavar="N",
        help="held-out prompts to render with each adapter (default: the run's "
        "validation.measure_prompts); more make a steadier pick",
    )
    pick.add_argument(
        "--steps",
        type=positive,
        metavar="N",
        help="denoising steps of each render (default: the run's validation.measure_steps)",
    )
    pick.set_defaults(run=run_pick)


def run_train(args: argparse.Namespace) -> int:
    from stylelora.config import load_config
    from stylelora.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    if args.output_dir:
        cfg.output_dir = args.output_dir
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if not result.interrupted:
        return 0
    if result.checkpoint is None:
        print(f"stylelora: stopped after writing {result.adapter_path}", file=sys.stderr)
        return 130
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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, and where a single file's configs and the files its family keeps apart are."""
    from stylelora.families.registry import declared_parts, model_names, owner_titles

    parser.add_argument(
        "--model",
        required=True,
        help=f"base model: hub id, folder, single file, or one of {', '.join(model_names())}",
    )
    parser.add_argument(
        "--model-config",
        type=Path,
        help="diffusers folder of component configs for a single-file model "
        "(default: the family's bundled configs)",
    )
    for key, part in declared_parts().items():
        parser.add_argument(
            f"--{key.replace('_', '-')}",
            dest=f"part_{key}",
            metavar="FILE",
            type=Path,
            help=f"{owner_titles(key)} transformer file: its {part.usual} (or a diffusers folder)",
        )


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """The family options that are flags too, named as their config keys with dashes."""
    from stylelora.families.registry import declared_options

    for key, option in declared_options().items():
        if option.flag is not None:
            metavar = {} if option.flag.get("action") else {"metavar": option.field.upper()}
            parser.add_argument(f"--{option.field.replace('_', '-')}", dest=f"option_{key}",
                                **metavar, **option.flag)  # fmt: skip


def model_source(args: argparse.Namespace) -> dict:
    """load_family's arguments for where the model's files are."""
    from stylelora.families.registry import declared_parts

    parts = {key: getattr(args, f"part_{key}") for key in declared_parts()}
    return {"config": str(args.model_config) if args.model_config else None, "parts": parts}


def option_settings(args: argparse.Namespace) -> dict:
    """The family options given as flags, checked as the config checks them."""
    from pydantic import TypeAdapter, ValidationError

    from stylelora.families.registry import declared_options

    settings = {}
    for key, option in declared_options().items():
        value = getattr(args, f"option_{key}", None)
        if option.flag is None or value is None:
            continue
        try:
            settings[key] = TypeAdapter(option.annotation).validate_python(value)
        except ValidationError as exc:
            message = exc.errors()[0]["msg"]
            raise UserError(f"--{option.field.replace('_', '-')} {value}: {message}") from None
    return settings


def run_sample(args: argparse.Namespace) -> None:
    from stylelora.families import load_family
    from stylelora.sample.adapter import check_adapter_file, render_with_adapter
    from stylelora.sample.prompts import SamplePrompt, on_size_grid

    for flag in ("scale", "guidance"):
        if not math.isfinite(getattr(args, flag)):
            raise UserError(f"--{flag} {getattr(args, flag)}: must be a finite number")
    if args.scales and not args.adapter:
        raise UserError("--scales needs --adapter")
    if args.adapter is not None:
        check_adapter_file(args.adapter)  # before the model loads
    family = load_family(args.model, settings=option_settings(args), **model_source(args))
    for note in family.notes:
        print(note)
    side = family.default_resolution
    request, note = on_size_grid(
        SamplePrompt(
            prompt=args.prompt,
            negative_prompt=args.negative,
            width=args.width or side,
            height=args.height or side,
            seed=args.seed,
            guidance_scale=args.guidance,
            steps=args.steps,
        ),
        family.size_step,
    )
    if note:
        print(note)
    scales = args.scales or [args.scale]
    images = len(scales) + (1 if args.compare or args.adapter is None else 0)
    render_with_adapter(family, args.adapter, request, args.out, scales, args.compare,
                        step_printer(images))  # fmt: skip
    print(f"wrote {args.out}")


def step_printer(images: int):
    """A line per denoising step, `image 2/3: step 6/20`; redrawn in place on a terminal."""
    image = 0
    end = "\r" if sys.stdout.isatty() else "\n"

    def on_step(step: int, steps: int) -> None:
        nonlocal image
        image += step == 1
        print(f"image {image}/{images}: step {step}/{steps}", end=end, flush=True)
        if end == "\r" and step == steps and image == images:
            print()

    return on_step


def strengths(text: str) -> list[float]:
    """--scales: finite numbers, comma-separated."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers such as 0,0.5,1") from None
    if not values or len(values) > 16 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 to 16 finite numbers, e.g. 0,0.5,1")
    return values


def run_dataset_check(args: argparse.Namespace) -> None:
    """The dataset report, every unusable file included, before any error that stops a run."""
    from stylelora.config import DataConfig, load_config
    from stylelora.data.dataset import ImageCaptionDataset
    from stylelora.data.report import collect_dataset, data_options, describe, problem_lines
    from stylelora.data.scan import require_usable

    if args.config:
        cfg = load_config(args.config, [f"data.dir={str(args.dir)!r}"])
        data, seed = cfg.data, cfg.seed
    else:
        data, seed = DataConfig(dir=args.dir), 0
    scan = collect_dataset(data)
    lines = problem_lines(scan)
    if scan.records:
        lines = describe(scan, ImageCaptionDataset(scan.records, data_options(data, seed)), data)
    if lines:
        print("\n".join(lines))
    sys.stdout.flush()  # the list comes before the error line on a terminal sharing both
    require_usable(scan, data.dir, data.strict, "each file is listed above")


def run_ui(args: argparse.Namespace) -> None:
    from stylelora.ui.serve import serve

    serve(args.host, args.port, args.roots or [Path.cwd()], args.data, args.token)


def run_make_tiny_model(args: argparse.Namespace) -> None:
    from stylelora.families.tiny import make_tiny_model

    make_tiny_model(args.family, args.folder, seed=args.seed)
    print(f"wrote a tiny {args.family} pipeline to {args.folder}")


def run_export(args: argparse.Namespace) -> None:
    from stylelora.export.tools import run_export as export

    print(export(args.adapter, args.format, args.out, args.model))


def run_merge(args: argparse.Namespace) -> None:
    from stylelora.export.tools import run_merge as merge

    print(merge(args.model, args.adapter, args.out, args.dtype, **model_source(args)))


def run_resize(args: argparse.Namespace) -> None:
    from stylelora.export.tools import run_resize as resize

    print("\n".join(resize(args.adapter, args.rank, args.energy, args.out)))


def run_combine(args: argparse.Namespace) -> None:
    from stylelora.export.tools import run_combine as combine

    print("\n".join(combine(args.adapters, args.out, args.rank)))


def run_inspect(args: argparse.Namespace) -> None:
    from stylelora.export.tools import run_inspect as inspect

    print("\n".join(inspect(args.file)))


def run_pick(args: argparse.Namespace) -> None:
    from stylelora.sample.pick_run import pick_run

    pick_run(args.run_dir, prompts=args.prompts, steps=args.steps)


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


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["caption"]:  # it needs neither diffusers nor the families: a quick start
        from stylelora.caption.command import add_caption_command

        parser = argparse.ArgumentParser(prog="stylelora")
        add_caption_command(parser.add_subparsers(dest="command", required=True))
        return parser.parse_args(argv)
    quiet_libraries()
    # after it: the parser's flags come from the families, which import the libraries
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from stylelora.versions import check_installed, refusal

    try:
        check_installed()
        args = parse_arguments(sys.argv[1:] if argv is None else argv)
        status = args.run(args)
    except UserError as exc:
        print(f"stylelora: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, ImportError) as exc:
        line = refusal(exc)  # one library refusing another's version
        if line is None:
            raise
        print(f"stylelora: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stylelora: interrupted", file=sys.stderr)
        return 130
    return status or 0
