"""`stylelora caption DIR`: its arguments, and the run from them to the summary line."""

from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path

from stylelora.errors import UserError

DEFAULT_MODELS = {
    "natural": "florence-community/Florence-2-large",
    "tags": "SmilingWolf/wd-eva02-large-tagger-v3",
}


def add_caption_command(commands) -> None:
    caption = commands.add_parser(
        "caption",
        help="write a caption file beside each image with a captioner (VLM or WD tagger)",
        description="Caption a folder's images with Florence-2, Qwen2.5-VL / Qwen3-VL, "
        "JoyCaption or a WD v3 tagger, from a local folder or the local Hugging Face cache.",
    )
    caption.add_argument("dir", type=Path, help="the images' folder (subfolders included)")
    caption.add_argument(
        "--model",
        help=f"hub id in the local cache, or a folder (default: {DEFAULT_MODELS['natural']} "
        f"for natural captions, {DEFAULT_MODELS['tags']} for tags)",
    )
    caption.add_argument(
        "--style",
        choices=["natural", "tags"],
        help="sentences or comma-separated tags (default: what the model writes)",
    )
    caption.add_argument("--trigger", default="", help="put this word first in every caption")
    caption.add_argument("--prefix", default="", help="text after the trigger word")
    caption.add_argument("--suffix", default="", help="text at the end")
    caption.add_argument("--prompt", help="the instruction a VLM is given (Florence-2: a task)")
    caption.add_argument("--max-tokens", type=positive, default=256, metavar="N")
    caption.add_argument("--batch-size", type=positive, default=1, metavar="N")
    existing = caption.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace captions that exist")
    existing.add_argument(
        "--skip-existing",
        action="store_true",
        help="caption only images without a caption (the default; continues a stopped run)",
    )
    caption.add_argument(
        "--extension", type=caption_extension, default=".txt", help="caption file extension"
    )
    caption.add_argument(
        "--4bit",
        dest="load_in_4bit",
        action="store_true",
        help="load a large VLM quantized to 4 bits (bitsandbytes; needs a CUDA GPU)",
    )
    caption.add_argument(
        "--general-threshold", type=share, default=0.35, metavar="P", help="WD taggers"
    )
    caption.add_argument(
        "--character-threshold", type=share, default=0.85, metavar="P", help="WD taggers"
    )
    caption.set_defaults(run=run_caption)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number from 1 to 65536")
    return value


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number from 0 to 1")
    return value


def caption_extension(text: str) -> str:
    """`.txt`, `.caption`, `.tags.txt`: never an image's extension."""
    from stylelora.data.scan import IMAGE_EXTENSIONS

    if not re.fullmatch(r"\.[A-Za-z0-9][A-Za-z0-9._-]{0,30}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected an extension such as .txt")
    if text.lower().endswith(tuple(IMAGE_EXTENSIONS)):
        raise argparse.ArgumentTypeError(
            f"{text!r} is an image extension; captions would replace images"
        )
    return text


def stop_on_sigterm() -> None:
    """A SIGTERM (the UI's Cancel) stops like Ctrl-C: between files, the record saved."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def run_caption(args: argparse.Namespace) -> int:
    from stylelora.caption.models import (
        CaptionOptions,
        caption_device,
        find_captioner,
        load_captioner,
    )
    from stylelora.caption.run import Wording, caption_folder

    stop_on_sigterm()
    model = args.model or DEFAULT_MODELS[args.style or "natural"]
    find_captioner(model)  # a model that is not here is named before anything else happens
    options = CaptionOptions(
        style=args.style or "",
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        load_in_4bit=args.load_in_4bit,
        general_threshold=args.general_threshold,
        character_threshold=args.character_threshold,
    )
    device = caption_device()

    def load():
        if device.is_cpu:
            print(
                "stylelora caption: no CUDA GPU, captioning on the CPU in fp32: this works, "
                "slowly (a large VLM takes tens of seconds per image)",
                file=sys.stderr,
            )
        return load_captioner(model, options, device)

    summary = caption_folder(
        args.dir,
        load,
        model,
        extension=args.extension,
        overwrite=args.overwrite,
        wording=Wording(args.trigger, args.prefix, args.suffix),
        batch_size=args.batch_size,
    )
    print(f"stylelora caption: {summary.line(args.dir)}", file=sys.stderr)
    if summary.stopped:
        again = "with --skip-existing instead of --overwrite" if args.overwrite else "again"
        print(
            f"stylelora caption: stopped; run the command {again} to continue where it stopped",
            file=sys.stderr,
        )
        return 130
    if summary.failed and not summary.written and not summary.skipped:
        raise UserError(f"{args.dir}: no image could be captioned; each is named above")
    return 0
