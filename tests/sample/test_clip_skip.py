"""Previews and `stylelora sample` condition on the layer clip_skip names, as training does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTextModel

from stylelora.cli import main
from stylelora.families import load_family
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import render

PROMPT = SamplePrompt(
    "a red fish", negative_prompt="blurry", width=64, height=64, seed=5, steps=3, guidance_scale=6
)


def without_last_layer(family) -> None:
    """The reference for clip skip 2: a text encoder one layer shorter (its final norm kept)."""
    encoder = family.pipe.text_encoder
    config = encoder.config
    config.num_hidden_layers -= 1
    shorter = CLIPTextModel(config)
    missing, _ = shorter.load_state_dict(encoder.state_dict(), strict=False)
    assert not missing
    family.pipe.text_encoder = shorter.eval()


@pytest.mark.parametrize("tiny", ["sd15", "sd2"])
def test_preview_with_clip_skip_matches_a_shortened_text_encoder(tiny):
    skipped = load_family(f"tiny:{tiny}", settings={"clip_skip": 2})
    ours = render(skipped.pipe, PROMPT, output_type="np", family=skipped)
    reference = load_family(f"tiny:{tiny}")
    plain = render(reference.pipe, PROMPT, output_type="np", family=reference)
    without_last_layer(reference)
    theirs = render(reference.pipe, PROMPT, output_type="np", family=reference)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(ours - plain).max() > 1e-3  # the skip changed the image


def test_sdxl_ignores_clip_skip_as_kohya_and_automatic1111_do():
    skipped = load_family("tiny:sdxl", settings={"clip_skip": 2})
    plain = load_family("tiny:sdxl")
    assert skipped.clip_skip is None
    assert "clip_skip = 2 is ignored for SDXL" in skipped.notes[0]
    with torch.no_grad():
        ours = skipped.encode_prompts(["a fish"])
        theirs = plain.encode_prompts(["a fish"])
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_sample_command_takes_clip_skip(tmp_path, capsys):
    args = ["sample", "--model", "tiny:sd15", "--prompt", PROMPT.prompt, "--negative", "blurry"]
    args += ["--seed", "5", "--steps", "3", "--guidance", "6"]
    assert main([*args, "--clip-skip", "2", "--out", str(tmp_path / "skip.png")]) == 0
    reference = load_family("tiny:sd15")
    without_last_layer(reference)
    expected = render(reference.pipe, PROMPT)
    written = np.asarray(Image.open(tmp_path / "skip.png"), dtype=int)
    assert np.abs(written - np.asarray(expected, dtype=int)).max() <= 1
    assert main([*args, "--clip-skip", "0", "--out", str(tmp_path / "bad.png")]) == 2
    assert "--clip-skip 0: Input should be greater than 0" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()
