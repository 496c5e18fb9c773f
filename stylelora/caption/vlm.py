"""Natural-language captions from vision-language models through transformers' own classes:
Florence-2, Qwen2.5-VL, Qwen3-VL and JoyCaption (the LLaVA layout).

Only transformers' built-in model code runs: a checkpoint that ships its own (`auto_map`, such as
the original `microsoft/Florence-2-*` layout) is refused. Decoding is greedy, so a caption
depends only on the image, the instruction and the model.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from stylelora.caption.models import VLM_NAMES, CaptionOptions, Device
from stylelora.errors import UserError, first_line

FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
FLORENCE_NATIVE = "florence-community/Florence-2-base or florence-community/Florence-2-large"

NATURAL_PROMPT = (
    "Write one paragraph describing this image for a training caption: the subject, their "
    "pose and expression, clothing, the setting, and the composition and framing. Do not "
    "mention the art style or the medium. Start directly with the subject, without a "
    'preamble such as "This image shows".'
)
TAGS_PROMPT = (
    "List booru-style tags for this image, comma-separated, most important first: the "
    "subject, features, clothing, pose, expression, setting and composition. Do not tag the "
    "art style or the medium. Reply with the tags only."
)
# the system turn JoyCaption's model card uses
JOYCAPTION_SYSTEM = "You are a helpful image captioner."

# what --4bit leaves in the device's precision: vision towers, projectors, the output layer
# (patterns matched from the start of a module's name, as transformers matches them)
FULL_PRECISION_MODULES = (
    r".*\.vision_tower",
    r".*\.multi_modal_projector",
    r".*\.visual",
    "lm_head",
)

# a tokenizer's files in any of the layouts transformers reads, and an image processor's
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")

# Qwen's processors keep up to ~12.8 MP per image, thousands of tokens; a caption needs fewer
MAX_SIDE = 1536


@dataclass
class VLMCaptioner:
    """A loaded vision-language model that writes one caption per image."""

    description: str
    settings: dict
    kind: str
    prompt: str
    processor: object = field(repr=False)
    model: torch.nn.Module = field(repr=False)
    device: Device
    batch_size: int = 1
    max_tokens: int = 256

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One single-line caption per image, in order."""
        captions: list[str] = []
        for start in range(0, len(images), max(1, self.batch_size)):
            captions += self._generate(images[start : start + max(1, self.batch_size)])
        return captions

    def _generate(self, images: list[Image.Image]) -> list[str]:
        inputs = self._inputs([_prepared(image) for image in images]).to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            output = self.model.generate(**inputs, generation_config=self._greedy())
        if not self.model.config.is_encoder_decoder:
            # a decoder-only model returns its input before the answer
            output = output[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(output, skip_special_tokens=True)
        return [_one_line(text, self.prompt) for text in texts]

    def _inputs(self, images: list[Image.Image]):
        if self.kind == "florence2":
            prompts = [self.prompt] * len(images)
            return self.processor(text=prompts, images=images, return_tensors="pt")
        text = _chat_text(self.processor, self.kind, self.prompt)
        # a template that writes the BOS token itself: the tokenizer must not add a second
        bos = self.processor.tokenizer.bos_token
        return self.processor(
            text=[text] * len(images),
            images=images,
            padding=True,
            return_tensors="pt",
            add_special_tokens=not (bos and text.startswith(bos)),
        )

    def _greedy(self):
        config = copy.deepcopy(self.model.generation_config)
        config.update(
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=self.max_tokens,
            max_length=None,
        )
        return config


def load_vlm(
    folder: Path, model: str, kind: str, options: CaptionOptions, device: Device
) -> VLMCaptioner:
    """The vision-language model in `folder` (`model` as the user named it), ready to caption."""
    name = VLM_NAMES[kind]
    _refuse_remote_code(_config(folder, model), model, kind)
    prompt = instruction(kind, options, model)
    processor = _load_processor(folder, model, kind)
    network = _load_model(folder, model, options, device)
    settings = {
        "prompt": prompt,
        "max_tokens": options.max_tokens,
        "style": options.style,
        "load_in_4bit": options.load_in_4bit,
        "dtype": str(device.dtype).removeprefix("torch."),
    }
    return VLMCaptioner(
        description=f"{name} ({model})",
        settings=settings,
        kind=kind,
        prompt=prompt,
        processor=processor,
        model=network,
        device=device,
        batch_size=options.batch_size,
        max_tokens=options.max_tokens,
    )


def instruction(kind: str, options: CaptionOptions, model: str) -> str:
    """What the model is asked: `--prompt`, else the default for the style. Florence-2 takes
    one of its caption task tokens instead of words."""
    if kind == "florence2":
        task = options.prompt or "<MORE_DETAILED_CAPTION>"
        if options.style == "tags":
            raise UserError(
                f"Florence-2 ({model}) writes sentences, not tags; "
                "use a WD tagger or a Qwen-VL or JoyCaption model for --style tags"
            )
        if task not in FLORENCE_TASKS:
            raise UserError(
                f"Florence-2 ({model}) takes a task token as --prompt: "
                f"one of {', '.join(FLORENCE_TASKS)}; got {task!r}"
            )
        return task
    if options.prompt:
        return options.prompt
    return TAGS_PROMPT if options.style == "tags" else NATURAL_PROMPT


def _config(folder: Path, model: str) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{model}'s config.json is unreadable; download it again") from None
    if not isinstance(config, dict):
        raise UserError(f"{model}'s config.json is no JSON object; download it again")
    return config


def _refuse_remote_code(config: dict, model: str, kind: str) -> None:
    vision = config.get("vision_config") or {}
    if kind == "florence2" and ("auto_map" in config or vision.get("model_type") == "davit"):
        raise UserError(
            f"{model} is the original Florence-2 layout, which needs the "
            f"model's own code; use the transformers-native {FLORENCE_NATIVE}"
        )
    if "auto_map" in config:
        raise UserError(
            f"{model} ships its own model code (auto_map in config.json), "
            "which stylelora never runs; use a checkpoint in transformers' native layout"
        )


def _load_processor(folder: Path, model: str, kind: str):
    """The model's processor: tokenizer, image processor and chat template."""
    from transformers import AutoProcessor

    _check_processor_files(folder, model)
    loader = _images_only(kind) or AutoProcessor
    try:
        processor = loader.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise _missing_processor(model, first_line(error)) from None
    missing = [
        part for part in ("tokenizer", "image_processor") if getattr(processor, part, None) is None
    ]
    if missing:
        raise _missing_processor(model, f"no {' and no '.join(missing)}")
    if kind != "florence2":
        processor.tokenizer.padding_side = "left"  # generation continues every row at its end
    if kind != "florence2" and not processor.chat_template:
        raise _missing_processor(model, "no chat template")
    return processor


def _check_processor_files(folder: Path, model: str) -> None:
    """Written by hand because transformers makes an empty tokenizer when its files are
    missing, and says nothing."""
    missing = []
    if not any(all((folder / name).is_file() for name in names) for names in TOKENIZER_FILES):
        missing.append("tokenizer.json")
    if not any((folder / name).is_file() for name in IMAGE_PROCESSOR_FILES):
        missing.append("preprocessor_config.json")
    if missing:
        raise UserError(
            f"{model} lacks {' and '.join(missing)}; download the whole model folder again"
        )


def _missing_processor(model: str, why: str) -> UserError:
    return UserError(
        f"{model}'s processor files (tokenizer, preprocessor_config.json, "
        f"chat template) do not load ({why}); download the whole model folder again"
    )


def _images_only(kind: str):
    """The Qwen-VL processor class without its video processor, or None for other kinds.

    Written by hand because transformers builds a Qwen-VL processor's video processor on load,
    which needs torchvision, and a caption never reads a video."""
    if kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as base
    elif kind == "qwen3_vl":
        from transformers import Qwen3VLProcessor as base
    else:
        return None

    class ImagesOnly(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # the mixin pairs positional parts with the parts this signature names: two
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template)

    ImagesOnly.__name__ = base.__name__
    return ImagesOnly


def _load_model(
    folder: Path, model: str, options: CaptionOptions, device: Device
) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    kwargs: dict = {"local_files_only": True, "dtype": device.dtype}
    if options.load_in_4bit:
        kwargs["quantization_config"] = _four_bit(model, device)
        kwargs["device_map"] = {"": device.name}
    try:
        network = AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
    except torch.OutOfMemoryError:
        raise UserError(
            f"{model} does not fit in the GPU's memory; add --4bit, or pick a smaller model"
        ) from None
    except ImportError as error:
        raise UserError(f"{model}: {first_line(error)}") from None
    except Exception as error:  # safetensors, torch and transformers each raise their own types
        raise UserError(
            f"{model}'s weights do not load ({first_line(error)}); download the model again"
        ) from None
    if not options.load_in_4bit:
        network.to(device.name)
    return network.eval()


def _four_bit(model: str, device: Device):
    """nf4 weights for the language model, computing in the device's precision."""
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            f"4-bit loading of {model} needs bitsandbytes; pip install bitsandbytes, or drop --4bit"
        ) from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=device.dtype,
        bnb_4bit_use_double_quant=True,
        # the vision towers are small and lose the most from 4 bits: only the language model
        llm_int8_skip_modules=list(FULL_PRECISION_MODULES),
    )


def _chat_text(processor, kind: str, prompt: str) -> str:
    """The conversation as the model's chat template writes it, ending where the answer begins."""
    if kind == "llava":
        # JoyCaption's model card passes the instruction as plain text beside a system turn
        messages = [
            {"role": "system", "content": JOYCAPTION_SYSTEM},
            {"role": "user", "content": prompt},
        ]
    else:
        content = [{"type": "image"}, {"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if processor.image_token not in text:
        # a LLaVA template that leaves the image out: the image goes before the instruction
        text = text.replace(prompt, f"{processor.image_token}\n{prompt}", 1)
    return text


def _prepared(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return image


def _one_line(text: str, prompt: str) -> str:
    """The caption without the instruction (should a model repeat it), on one line."""
    # a caption file is text: no control characters, one line
    text = " ".join("".join(c for c in text if c.isprintable() or c.isspace()).split())
    if text.startswith(prompt):
        text = text[len(prompt) :].strip()
    return text
