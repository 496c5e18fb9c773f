"""What the Stable Diffusion UNet families (SD1.x, SD2.x, SDXL) share: CLIP text encoders, a
DDPM schedule with epsilon or v-prediction, AUTOMATIC1111's single files and kohya's names."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline
from pydantic import Field

from stylelora.adapters.targets import Targets, unet_targets
from stylelora.errors import UserError, first_line
from stylelora.families.base import (
    DENOISER,
    ModelFamily,
    Option,
    autoencoder_kl_latents,
    compute_dtype,
)
from stylelora.families.clip import check_clip_skip, clip_targets, kohya_clip_name
from stylelora.families.objective import DDPMObjective, Objective
from stylelora.families.skeletons import skeleton_dir

if TYPE_CHECKING:
    from stylelora.config import AdapterConfig

KOHYA_UNET_BLOCK = re.compile(
    r"(up|down)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_"
)

PREDICTION_TYPE = Option(
    "prediction_type",
    Literal["auto", "epsilon", "v_prediction"],
    "auto",
    "auto: the model's scheduler; epsilon; v_prediction (kohya's --v_parameterization)",
    flag={
        "choices": ["auto", "epsilon", "v_prediction"],
        "help": "override the model's prediction type (auto: its scheduler config)",
    },
)
CLIP_SKIP = Option(
    "clip_skip",
    Annotated[int, Field(gt=0)] | None,
    None,
    "counted as kohya and AUTOMATIC1111 do: 2 = penultimate layer",
    flag={"type": int, "help": "as kohya and AUTOMATIC1111 count it: 2 = penultimate layer"},
)
ZERO_TERMINAL_SNR = Option(
    "train.zero_terminal_snr",
    bool,
    False,
    "rescale the betas to zero terminal SNR (v-prediction models; previews then use trailing "
    "timesteps)",
)


class UNetFamily(ModelFamily):
    """SD1.x's behaviour; SD2.x and SDXL override what they change."""

    denoiser_attr = "unet"
    denoiser_input = "sample"
    text_encoder_attrs: ClassVar[dict[str, str]] = {"lora_te": "text_encoder"}
    prompt_encoder_attrs: ClassVar[tuple[str, ...]] = ("text_encoder",)
    options = (PREDICTION_TYPE, CLIP_SKIP, ZERO_TERMINAL_SNR)
    native_format = "kohya"
    denoiser_prefix = "lora_unet_"
    sample_schedulers = ("default", "euler", "euler_a", "ddim", "dpmpp_2m")
    objective_type = DDPMObjective
    block_wise = True
    swaps_blocks = False
    # The diffusers pipeline class its models load as (single files too).
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    # A tensor-name prefix only this family's AUTOMATIC1111-layout single files have.
    single_file_marker: ClassVar[str]
    # The UNet's cross-attention width: tells an adapter file without metadata by its shapes.
    context_width: ClassVar[int]
    # Pipeline attribute of each text encoder -> (key prefix, layout) in an AUTOMATIC1111 file.
    single_file_text_encoders: ClassVar[dict[str, tuple[str, str]]] = {
        "text_encoder": ("cond_stage_model.transformer.", "clip")
    }
    modelspec: ClassVar[str]

    def __init__(self, pipe: DiffusionPipeline):
        self.clip_skip: int | None = None  # diffusers' count: 1 takes the penultimate layer
        super().__init__(pipe)

    def apply_settings(self) -> None:
        self.clip_skip = self.layers_skipped(self.settings[CLIP_SKIP.key])
        self.set_schedule(self.settings["prediction_type"], self.settings[ZERO_TERMINAL_SNR.key])

    def layers_skipped(self, clip_skip: int | None) -> int | None:
        """The text encoder layers kohya's `clip_skip` skips (diffusers' count), if any."""
        if not clip_skip or clip_skip == 1:
            return None
        check_clip_skip(clip_skip - 1, self.text_encoders().values())
        return clip_skip - 1

    @classmethod
    def reads_single_file(cls, keys: list[str]) -> bool:
        """AUTOMATIC1111's layout: the UNet under `model.diffusion_model.`, and the marker."""
        return any(k.startswith("model.diffusion_model.") for k in keys) and any(
            k.startswith(cls.single_file_marker) for k in keys
        )

    @classmethod
    def load_single_file(
        cls, path: Path, dtype: torch.dtype, config: str | None, parts: dict[str, Path | None]
    ) -> DiffusionPipeline:
        try:
            pipe = cls.pipeline_class.from_single_file(
                str(path),
                config=str(config or skeleton_dir(cls.name)),
                local_files_only=True,
                torch_dtype=dtype,
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise UserError(
                f"{path}: could not load this {cls.title} checkpoint ({first_line(exc)})"
            ) from None
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def single_file_state(self) -> dict[str, torch.Tensor]:
        """AUTOMATIC1111's layout: what `merge` writes to a .safetensors."""
        from stylelora.families.ldm import TEXT_ENCODER_LAYOUTS, unet_state, vae_state

        tensors = {f"model.diffusion_model.{k}": v for k, v in unet_state(self.unet).items()}
        tensors.update({f"first_stage_model.{k}": v for k, v in vae_state(self.vae).items()})
        for attr, (prefix, layout) in self.single_file_text_encoders.items():
            state = TEXT_ENCODER_LAYOUTS[layout](getattr(self.pipe, attr))
            tensors.update({prefix + k: v for k, v in state.items()})
        return tensors

    @classmethod
    def on_meta_device(cls) -> ModelFamily:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        folder = skeleton_dir(cls.name)
        parts = {}
        with torch.device("meta"):
            config = UNet2DConditionModel.load_config(folder / "unet")
            parts["unet"] = UNet2DConditionModel.from_config(config)
            parts["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            parts["vae_scale_factor"] = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
            classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
            for attr, text_cls in classes.items():
                if (folder / attr).is_dir():
                    parts[attr] = text_cls(CLIPTextConfig.from_pretrained(folder / attr))
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        parts["scheduler"] = SimpleNamespace(config=scheduler)
        return cls(SimpleNamespace(**parts))

    def set_schedule(self, prediction_type: str = "auto", zero_terminal_snr: bool = False) -> None:
        """Override the scheduler's prediction type; rescale its betas to zero terminal SNR.

        The training scheduler and the previews both build on the pipeline's scheduler config,
        so changing it here changes both.
        """
        if prediction_type == "auto" and not zero_terminal_snr:
            return
        scheduler = self.pipe.scheduler
        if prediction_type != "auto":
            scheduler = type(scheduler).from_config(
                scheduler.config, prediction_type=prediction_type
            )
        if zero_terminal_snr:
            if scheduler.config.get("prediction_type") != "v_prediction":
                raise UserError(
                    "train.zero_terminal_snr needs a v-prediction model "
                    '(set prediction_type = "v_prediction")'
                )
            cls = type(scheduler)
            if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
                cls = DDIMScheduler
            scheduler = cls.from_config(
                scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
            )
        self.pipe.scheduler = scheduler

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def default_resolution(self) -> int:
        return self.unet.config.sample_size * self.pipe.vae_scale_factor

    @property
    def base_version(self) -> str:
        return self.base_versions[0]

    @property
    def modelspec_architecture(self) -> str:
        return self.modelspec

    def scale_latents(self, sample: torch.Tensor) -> torch.Tensor:
        return autoencoder_kl_latents(self.vae, sample)

    def training_objective(self) -> Objective:
        """DDPM noising with the model's own betas and prediction type (its scheduler config,
        after `set_schedule`)."""
        return DDPMObjective(DDPMScheduler.from_config(self.pipe.scheduler.config))

    def denoise(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
        batch: dict[str, Any],
    ) -> torch.Tensor:
        dtype = compute_dtype(denoiser)
        return denoiser(noisy.to(dtype), timesteps, **self.unet_inputs(text, batch)).sample

    def unet_inputs(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for the UNet beyond the noisy latents and timesteps."""
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions to the UNet's text conditioning, through the pipeline's own encoder code."""
        if self.clip_skip:
            return {"encoder_hidden_states": self.skipped_embeds(captions)}
        embeds, _ = self.pipe.encode_prompt(
            captions,
            device=self.text_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return {"encoder_hidden_states": embeds}

    def skipped_embeds(self, captions: list[str]) -> torch.Tensor:
        """What diffusers' encode_prompt gives with `clip_skip`, computed here because its own
        code reaches for `text_encoder.text_model`, which transformers 5's CLIPTextModel lacks.
        """
        tokenizer, encoder = self.pipe.tokenizer, self.pipe.text_encoder
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_device)
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-(self.clip_skip + 1)]
        text_model = getattr(encoder, "text_model", encoder)
        return text_model.final_layer_norm(hidden)

    def pipeline_text_kwargs(
        self, prompt: str, negative: str, size: tuple[int, int]
    ) -> dict[str, Any]:
        """With clip_skip the embeddings are made here, for the negative prompt too (as kohya's
        and AUTOMATIC1111's samplers do); diffusers would skip layers for the prompt only."""
        if not self.clip_skip:
            return {"prompt": prompt, "negative_prompt": negative or None}
        with torch.no_grad():
            embeds = self.encode_prompts([prompt, negative])["encoder_hidden_states"]
        return {"prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:]}

    def denoiser_targets(self, cfg: AdapterConfig) -> Targets:
        """kohya's target presets for SD UNets."""
        return unet_targets(self.unet, cfg.unet_targets)

    def text_encoder_targets(self, preset: str) -> Targets:
        return clip_targets(preset)

    def swappable_blocks(self) -> list[torch.nn.Module]:
        return []  # a UNet's blocks differ too much in size to swap them by count

    def kohya_name(self, prefix: str, module_path: str) -> str:
        """kohya's name of an adapted module: prefix + dotted path with '_' for '.'."""
        if prefix == DENOISER:
            return f"{prefix}_{module_path.replace('.', '_')}"
        return kohya_clip_name(prefix, module_path)

    def file_module(self, prefix: str, module_path: str) -> tuple[str, tuple[str, ...]]:
        return self.kohya_name(prefix, module_path), (module_path,)

    def kohya_blocks(self) -> tuple[int, int, int, bool]:
        """SD1.x and SD2: 12, 1, 12 (block 0 holds no module)."""
        return 12, 1, 12, False

    def kohya_block_index(self, name: str) -> int:
        """`3 * i + j` for the j-th resnet or attention of `down_blocks_i` (plus 1) or
        `up_blocks_i` (plus 13), `3 * i + 2` for its sampler, 12 for the middle block."""
        found = KOHYA_UNET_BLOCK.search(name)
        if found:
            side, i, kind, j = found.groups()
            index = 3 * int(i) + (2 if kind.endswith("samplers") else int(j))
            return index + (1 if side == "down" else 13)
        return 12 if "mid_block_" in name else -1

    def example_inputs(
        self, batch: int, side: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        config = self.unet.config
        latent = side // self.pipe.vae_scale_factor
        latents = torch.zeros(batch, config.in_channels, latent, latent, dtype=dtype, device=device)
        tokens = self.prompt_encoders()[0].config.max_position_embeddings
        shape = (batch, tokens, config.cross_attention_dim)
        text = {"encoder_hidden_states": torch.zeros(shape, dtype=dtype, device=device)}
        return latents, text, {}

    def example_prompt_pass(self, device: torch.device) -> None:
        for encoder in self.prompt_encoders():
            tokens = encoder.config.max_position_embeddings
            encoder(torch.zeros(1, tokens, dtype=torch.long, device=device))

    def metadata(self) -> dict[str, str]:
        return {
            "ss_base_model_version": self.base_version,
            "ss_v2": "False",
            "ss_clip_skip": str(self.settings[CLIP_SKIP.key]),
            "ss_zero_terminal_snr": str(self.settings[ZERO_TERMINAL_SNR.key]),
        }
