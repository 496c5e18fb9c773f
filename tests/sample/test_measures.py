"""The style, content and copying measures on cases whose answer is known, on the demo base."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_DATA
from PIL import Image

from stylelora.adapters.inject import inject_adapters
from stylelora.config import AdapterConfig
from stylelora.families import load_family
from stylelora.sample.adapter import take_out_adapters
from stylelora.sample.measures import measure, reference
from stylelora.sample.pick import pick
from stylelora.sample.prompts import SamplePrompt
from stylelora.train.measuring import Measurer, swapped_caption

PROMPTS = [
    SamplePrompt("a ghost, zqxstyle", width=64, height=64, seed=3, guidance_scale=2.0, steps=4),
    SamplePrompt("a rocket, zqxstyle", width=64, height=64, seed=4, guidance_scale=2.0, steps=4),
]


@pytest.fixture(scope="module")
def demo():
    family = load_family("demo:sd15")
    family.pipe.set_progress_bar_config(disable=True)
    return family


@pytest.fixture(scope="module")
def training() -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in sorted(DEMO_DATA.glob("*.png"))[:12]]


@pytest.fixture(scope="module")
def base(demo, training, tmp_path_factory):
    """The prompts rendered without an adapter, and the measurer that rendered them."""
    measurer = Measurer(demo, PROMPTS, training, tmp_path_factory.mktemp("measures"))
    adapted = inject_adapters(demo, AdapterConfig(rank=4, unet_targets="attn-mlp"))
    try:  # a fresh LoRA: its up matrices are zero, an adapter of zero strength
        record = measurer.measure(step=0)
    finally:
        take_out_adapters(adapted)
    return measurer, record


def test_an_adapter_of_zero_strength_changes_nothing(base) -> None:
    measurer, record = base
    assert (measurer.output_dir / record["path"]).is_file()
    assert record["style"] == pytest.approx(0.0, abs=1e-4)
    assert record["content"] == pytest.approx(1.0, abs=1e-4)
    assert record["copying"] == pytest.approx(record["base_copying"], abs=1e-4)


def in_palette(image: Image.Image, palette: np.ndarray) -> Image.Image:
    pixels = np.asarray(image, np.float32).reshape(-1, 1, 3)
    nearest = np.linalg.norm(pixels - palette[None], axis=2).argmin(1)
    return Image.fromarray(palette[nearest].reshape(image.height, image.width, 3).astype(np.uint8))


def test_painting_every_render_in_the_style_palette_raises_style_and_lowers_content(
    demo, training, base
) -> None:
    measurer, _ = base
    mosaic = np.concatenate([np.asarray(image) for image in training], axis=1)
    quantised = Image.fromarray(mosaic).quantize(colors=6, kmeans=6)
    palette = np.array(quantised.getpalette(), np.float32).reshape(-1, 3)[:6]
    painted = measure(demo, measurer.reference, [in_palette(i, palette) for i in measurer.base])
    assert painted.style > 0.2  # toward the training images' statistics (0.50 measured)
    assert painted.content < 0.9  # the subject no longer stands out as it did (0.43)
    assert painted.copying < 0.9  # a palette is no copy of a training image (0.45, base 0.45)


def test_a_render_equal_to_a_training_image_scores_full_copying(demo, training, base) -> None:
    measurer, _ = base
    copied = measure(demo, measurer.reference, training[3:5])
    assert copied.copying == pytest.approx(1.0, abs=1e-5)
    assert copied.nearest == [3, 4]
    # as close as the training images are to each other: the style's floor
    assert 1 - copied.style_distance / copied.base_style_distance > 0
    assert measurer.reference.base_copying.max() < 0.99


def test_measures_are_the_same_whatever_the_reference_order(demo, training, base) -> None:
    measurer, _ = base
    again = reference(demo, list(reversed(training)), measurer.base)
    one = measure(demo, measurer.reference, training[:2])
    other = measure(demo, again, training[:2])
    assert one.style == pytest.approx(other.style, abs=1e-5)
    assert one.copying == pytest.approx(other.copying, abs=1e-6)


def records(styles: list[float]) -> list[dict]:
    return [
        {"step": 100 * (i + 1), "style": s, "content": 0.9 - 0.1 * i, "copying": 0.7 + 0.02 * i,
         "base_copying": 0.7}
        for i, s in enumerate(styles)
    ]  # fmt: skip


def test_the_pick_is_where_style_stops_gaining() -> None:
    chosen, reason = pick(records([0.1, 0.5, 0.8, 0.86, 0.88, 0.89]))
    # averaged with the steps beside: 0.30 0.47 0.72 0.85 0.88 0.89; the average from 400 to
    # the end is 0.877, 90 % of it 0.79; from 300, 0.8575 and 0.77, which 0.72 misses
    assert chosen["step"] == 400
    assert "reaches 90% of the average from there to the end (0.88)" in reason
    assert "copying 0.76 there, 0.78 to 0.80 later, content 0.60 there, 0.40 to 0.50" in reason
    # one stray measurement does not decide, early or late
    assert pick(records([0.1, 0.9, 0.2, 0.3, 0.85, 0.88, 0.9]))[0]["step"] == 600
    assert pick(records([0.1, 0.5, 0.8, 0.82, 0.8, 0.81, 0.8, 1.2]))[0]["step"] == 400
    # a style still rising at the end: a late step
    assert pick(records([0.1 * i for i in range(1, 11)]))[0]["step"] == 900


def test_a_captions_subject_is_swapped_everywhere_it_is_named() -> None:
    caption = "a circle, mustard circle, deep teal background, zqxstyle"
    assert swapped_caption(caption, "umbrella") == (
        "an umbrella, mustard umbrella, deep teal background, zqxstyle"
    )
    assert swapped_caption("zqxstyle, circle", "umbrella") is None


def test_pick_on_a_folder_without_checkpoints_is_one_line(tmp_path: Path) -> None:
    from stylelora.errors import UserError
    from stylelora.sample.pick_run import pick_run

    with pytest.raises(UserError, match="config.json: not found"):
        pick_run(tmp_path)
