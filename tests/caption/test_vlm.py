"""The vision-language captioners on tiny random models: loading, batching, prompts, errors.

A random model writes noise; these tests check what the captioner does around the model (one
clean line per image, batches equal to single images, the instruction not echoed, one-line
errors), never what a caption says.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from stylelora.caption.models import VLM_NAMES, CaptionOptions, Device, load_captioner
from stylelora.caption.vlm import NATURAL_PROMPT, TAGS_PROMPT
from stylelora.errors import UserError

CPU = Device("cpu", torch.float32)
KINDS = ["florence2", "qwen2_5_vl", "qwen3_vl", "llava"]
# what each model is asked by default (Florence-2's processor turns its task token into words)
ASKED = {
    "florence2": [
        "<MORE_DETAILED_CAPTION>",
        "Describe with a paragraph what is shown in the image.",
    ],
    "qwen2_5_vl": [NATURAL_PROMPT],
    "qwen3_vl": [NATURAL_PROMPT],
    "llava": [NATURAL_PROMPT],
}
TEMPLATE_WORDS = ["<|im_start|>", "<|start_header_id|>", "assistant", "<image>", "</s>"]


def images() -> list[Image.Image]:
    """Three images of different sizes and contents (for Qwen-VL: different token counts)."""
    return [
        Image.new("RGB", (40, 30), (200, 30, 30)),
        Image.new("L", (24, 56), 90),
        Image.effect_noise((64, 64), 60).convert("RGB"),
    ]


def load(folder: Path | str, **options):
    return load_captioner(str(folder), CaptionOptions(max_tokens=8, **options), CPU)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("kind", KINDS)
def test_one_clean_line_per_image(tiny_vlm, kind):
    captioner = load(tiny_vlm(kind), batch_size=3)
    captions = captioner.caption(images())
    assert len(captions) == 3
    for caption in captions:
        assert isinstance(caption, str) and caption
        assert caption == caption.strip() and caption.isprintable()  # no newline, no control
        for asked in ASKED[kind]:
            assert asked not in caption
        assert not any(word in caption for word in TEMPLATE_WORDS)
    assert captioner.description == f"{VLM_NAMES[kind]} ({tiny_vlm(kind)})"
    assert captioner.settings["prompt"] == ASKED[kind][0]
    assert captioner.settings["max_tokens"] == 8


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_captions_as_single_images_do(tiny_vlm, kind):
    batched = load(tiny_vlm(kind), batch_size=3).caption(images())
    single = load(tiny_vlm(kind), batch_size=1)
    assert batched == [single.caption([image])[0] for image in images()]


def test_qwen_batches_pad_on_the_left(tiny_vlm):
    """Images of different sizes give Qwen-VL prompts of different lengths, padded in front so
    that every row's answer starts at the same place: what the batch test above relies on."""
    captioner = load(tiny_vlm("qwen2_5_vl"), batch_size=3)
    text = "<|vision_start|><|image_pad|><|vision_end|>Describe."
    mask = captioner.processor(text=[text] * 3, images=images(), padding=True)["attention_mask"]
    assert len({sum(row) for row in mask}) == 3
    assert all(row[-1] == 1 for row in mask) and not all(row[0] == 1 for row in mask)


def test_prompt_and_tags_style_for_chat_models(tiny_vlm):
    asked = "Name the main colour in the picture."
    captioner = load(tiny_vlm("qwen3_vl"), prompt=asked)
    caption = captioner.caption(images()[:1])[0]
    assert captioner.settings["prompt"] == asked and asked not in caption
    tagger = load(tiny_vlm("llava"), style="tags")
    assert tagger.settings["prompt"] == TAGS_PROMPT and tagger.settings["style"] == "tags"
    assert tagger.caption(images()[:1])[0]


def test_florence_takes_its_caption_task_tokens_only(tiny_vlm):
    folder = tiny_vlm("florence2")
    captioner = load(folder, prompt="<CAPTION>")
    assert captioner.settings["prompt"] == "<CAPTION>"
    assert "What does the image describe?" not in captioner.caption(images()[:1])[0]
    for wrong in ["<OD>", "Describe the image."]:
        with pytest.raises(UserError) as excinfo:
            load(folder, prompt=wrong)
        message = one_line_error(excinfo)
        assert "<MORE_DETAILED_CAPTION>" in message and repr(wrong) in message
    with pytest.raises(UserError) as excinfo:
        load(folder, style="tags")
    assert "not tags" in one_line_error(excinfo)


def test_joycaption_template_without_image_token(tiny_vlm, tmp_path):
    """A LLaVA chat template that leaves the image out still gets the image before the text."""
    folder = shutil.copytree(tiny_vlm("llava"), tmp_path / "joy")
    template = folder / "chat_template.jinja"
    template.write_text(template.read_text().replace("<image>", ""))
    assert load(folder).caption(images()[:2])[1]


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_original_florence_layout_is_refused(tmp_path):
    config = {
        "model_type": "florence2",
        "auto_map": {
            "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"
        },
        "vision_config": {"model_type": "davit"},
    }
    with pytest.raises(UserError) as excinfo:
        load(write_config(tmp_path / "Florence-2-base", config))
    message = one_line_error(excinfo)
    assert "florence-community/Florence-2-base" in message and "Florence-2-large" in message


def test_remote_code_is_refused(tmp_path):
    auto_map = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    with pytest.raises(UserError) as excinfo:
        load(write_config(tmp_path / "own", {"model_type": "qwen2_5_vl", "auto_map": auto_map}))
    assert "own model code" in one_line_error(excinfo)
    with pytest.raises(UserError) as excinfo:
        load(write_config(tmp_path / "unknown", {"model_type": "phi3_v", "auto_map": auto_map}))
    assert "supported captioners" in one_line_error(excinfo)


def test_unsupported_model_type(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load(write_config(tmp_path / "bert", {"model_type": "bert", "hidden_size": 16}))
    message = one_line_error(excinfo)
    assert "is a bert" in message
    assert (
        "supported captioners: Florence-2, Qwen2.5-VL, Qwen3-VL, JoyCaption (LLaVA), WD v3"
        in message
    )


@pytest.mark.parametrize("kind", KINDS)
def test_missing_processor_files(tiny_vlm, tmp_path, kind):
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ["config.json", "generation_config.json", "model.safetensors"]:
        shutil.copy(tiny_vlm(kind) / name, weights_only / name)
    # transformers would make an empty tokenizer here, without a word
    no_tokenizer = shutil.copytree(tiny_vlm(kind), tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    for folder, lacks in [
        (weights_only, "lacks tokenizer.json and preprocessor_config.json"),
        (no_tokenizer, "lacks tokenizer.json;"),
    ]:
        with pytest.raises(UserError) as excinfo:
            load(folder)
        message = one_line_error(excinfo)
        assert f"{folder} {lacks}" in message and "download the whole model folder" in message


def test_corrupt_weights(tiny_vlm, tmp_path):
    folder = shutil.copytree(tiny_vlm("qwen3_vl"), tmp_path / "corrupt")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError) as excinfo:
        load(folder)
    assert "weights do not load" in one_line_error(excinfo)


def test_four_bit_loading(tiny_vlm):
    """nf4 through bitsandbytes: its CPU backend does it here; on a GPU the same call."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    captioner = load(tiny_vlm("qwen3_vl"), load_in_4bit=True)
    four_bit = [
        name for name, module in captioner.model.named_modules() if isinstance(module, Linear4bit)
    ]
    assert any(".language_model." in name for name in four_bit)
    assert not any(".visual." in name or "lm_head" in name for name in four_bit)
    assert captioner.settings["load_in_4bit"] is True
    assert len(captioner.caption(images()[:2])) == 2


def test_missing_chat_template(tiny_vlm, tmp_path):
    folder = shutil.copytree(tiny_vlm("qwen2_5_vl"), tmp_path / "no-template")
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(UserError) as excinfo:
        load(folder)
    assert "(no chat template); download the whole model folder" in one_line_error(excinfo)
