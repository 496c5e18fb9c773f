"""The AUTOMATIC1111-layout writer on the real SD1.5, SD2.1 and SDXL architectures (meta device):
diffusers' own single-file converters map every written key back to every model weight."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from stylelora.families.ldm import TEXT_ENCODER_LAYOUTS, unet_state, vae_state
from stylelora.families.sd2 import SD2
from stylelora.families.sd15 import SD15
from stylelora.families.sdxl import SDXL
from stylelora.families.skeletons import skeleton_dir

CASES = {"sd15": SD15, "sd2": SD2, "sdxl": SDXL}
ENCODER_CLASSES = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


@pytest.mark.parametrize("skeleton", CASES)
def test_unet_and_vae_convert_back_key_for_key(skeleton):
    folder = skeleton_dir(skeleton)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet_state(unet).items()}
    checkpoint.update({f"first_stage_model.{k}": v for k, v in vae_state(vae).items()})
    assert shapes(sfu.convert_ldm_unet_checkpoint(checkpoint, unet.config)) == shapes(
        unet.state_dict()
    )
    assert shapes(sfu.convert_ldm_vae_checkpoint(checkpoint, vae.config)) == shapes(
        vae.state_dict()
    )


@pytest.mark.parametrize("skeleton", CASES)
def test_text_encoders_convert_back_key_for_key(skeleton):
    folder = skeleton_dir(skeleton)
    for attr, (prefix, layout) in CASES[skeleton].single_file_text_encoders.items():
        config = CLIPTextConfig.from_pretrained(folder / attr, local_files_only=True)
        with torch.device("meta"):
            encoder = ENCODER_CLASSES[attr](config)
        checkpoint = {prefix + k: v for k, v in TEXT_ENCODER_LAYOUTS[layout](encoder).items()}
        if layout == "openclip":
            back = sfu.convert_open_clip_checkpoint(encoder, checkpoint, prefix=prefix)
        else:
            back = sfu.convert_ldm_clip_checkpoint(checkpoint, remove_prefix=prefix)
        if not hasattr(encoder, "text_model"):  # transformers 5 flattened CLIPTextModel
            back = {k.removeprefix("text_model."): v for k, v in back.items()}
        expected = {k: v for k, v in encoder.state_dict().items() if "position_ids" not in k}
        assert shapes(back) == shapes(expected), attr
