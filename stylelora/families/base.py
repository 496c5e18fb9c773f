"""The interface every model family implements; the trainer, sampler and exporter use only this.

A family wraps a loaded diffusers pipeline and answers what differs between SD1.x, SD2.x and
SDXL: how prompts are encoded, how the denoiser is called and what extra conditioning it takes,
the training objective (`objective.py`), and how kohya names the adapted modules.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from stylelora.adapters.targets import TEXT_ENCODER_TARGETS, Targets, unet_targets
from stylelora.config import AdapterConfig
from stylelora.errors import UserError, first_line
from stylelora.families.objective import DDPMObjective, Objective

KOHYA_UNET_BLOCK = re.compile(
    r"(up|down)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_"
)

# One CPU generator for a whole batch, or one per sample.
Generators = torch.Generator | list[torch.Generator]


class ModelFamily:
    """Base class: SD1.x behaviour; subclasses override what their family changes.

    A family is one module: this class with its tables below, its bundled component configs
    (`skeletons/<name>/`, for single files and for naming without a model) and its tiny builder.
    """

    # The family's one name: `tiny:<name>`, `skeletons/<name>/`, `stylelora inspect`'s answer.
    name: ClassVar[str]
    # The diffusers pipeline class its models load as (single files too).
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    # A tensor-name prefix only this family's AUTOMATIC1111-layout single files have.
    single_file_marker: ClassVar[str]
    # The UNet's cross-attention width: tells an adapter file without metadata by its shapes.
    context_width: ClassVar[int]
    # Whether kohya's layout fuses several of the denoiser's modules into one (`kohya_part`).
    kohya_fuses: ClassVar[bool] = False
    # The pipeline attribute holding the denoiser (diffusers' files name it so).
    denoiser_attr: ClassVar[str] = "unet"
    # The keyword the denoiser takes its noisy latents by, when the pipeline calls it.
    denoiser_input: ClassVar[str] = "sample"
    # The `ss_base_model_version` AUTOMATIC1111 and ComfyUI read to tell families apart.
    kohya_base_version: ClassVar[str]
    # Every `ss_base_model_version` whose adapters fit this family's modules, and the prefix
    # they share (an adapter file's family is told by it: "sdxl" also covers "sdxl_base_v0-9").
    kohya_versions: ClassVar[tuple[str, ...]]
    kohya_version_prefix: ClassVar[str]
    # The SAI model-spec architecture id (`modelspec.architecture`, with "/lora" appended).
    modelspec_architecture: ClassVar[str]
    # kohya key prefix -> pipeline attribute of each text encoder.
    text_encoder_attrs: ClassVar[dict[str, str]] = {"lora_te": "text_encoder"}
    # Pipeline attribute of each text encoder -> (key prefix, layout) in an AUTOMATIC1111 file.
    single_file_text_encoders: ClassVar[dict[str, tuple[str, str]]] = {
        "text_encoder": ("cond_stage_model.transformer.", "clip")
    }

    def __init__(self, pipe: DiffusionPipeline, clip_skip: int | None = None):
        """`clip_skip` counts as diffusers does: 1 takes the penultimate layer's output."""
        self.pipe = pipe
        self.clip_skip = clip_skip or None
        # Things the user should hear about this model and config, said once at start.
        self.notes: list[str] = []
        if self.clip_skip:
            check_clip_skip(self.clip_skip, self.text_encoders().values())

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        raise NotImplementedError

    @classmethod
    def reads_single_file(cls, keys: list[str]) -> bool:
        """Whether a single file with these tensor names is this family's checkpoint
        (AUTOMATIC1111's layout: the UNet under `model.diffusion_model.`, and the marker)."""
        return any(k.startswith("model.diffusion_model.") for k in keys) and any(
            k.startswith(cls.single_file_marker) for k in keys
        )

    @classmethod
    def load_single_file(
        cls, path: Path, dtype: torch.dtype, config: str | None, parts: dict[str, Path | None]
    ) -> DiffusionPipeline:
        """Load the family's single file offline, with component configs from `config` (a
        diffusers folder) or the skeleton. `parts`: the VAE and text encoders' own files, for
        families whose files hold the denoiser only (Flux)."""
        from stylelora.families.skeletons import skeleton_dir

        if given := [key for key, value in parts.items() if value is not None]:
            raise UserError(
                f"{given[0]}: names a Flux.1 transformer file's other parts; {path} is a whole "
                f"{cls.name} checkpoint, so remove it"
            )
        try:
            pipe = cls.pipeline_class.from_single_file(
                str(path),
                config=str(config or skeleton_dir(cls.name)),
                local_files_only=True,
                torch_dtype=dtype,
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise UserError(
                f"{path}: could not load this {cls.name} checkpoint ({first_line(exc)})"
            ) from None
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def single_file_state(self) -> dict[str, torch.Tensor]:
        """Every weight under its name in the family's single files (AUTOMATIC1111's layout:
        what `merge` writes to a .safetensors)."""
        from stylelora.families.ldm import TEXT_ENCODER_LAYOUTS, unet_state, vae_state

        tensors = {f"model.diffusion_model.{k}": v for k, v in unet_state(self.unet).items()}
        tensors.update({f"first_stage_model.{k}": v for k, v in vae_state(self.vae).items()})
        for attr, (prefix, layout) in self.single_file_text_encoders.items():
            state = TEXT_ENCODER_LAYOUTS[layout](getattr(self.pipe, attr))
            tensors.update({prefix + k: v for k, v in state.items()})
        return tensors

    @classmethod
    def claims_names(cls, names: list[str]) -> bool:
        """Whether an adapter's module names (kohya or diffusers) can only be this family's."""
        return False

    @classmethod
    def build_tiny(cls, folder: Path) -> DiffusionPipeline:
        """A tiny random pipeline of this layout (its tokenizers written into `folder`)."""
        raise NotImplementedError

    @classmethod
    def on_meta_device(cls) -> ModelFamily:
        """The real architecture, from the bundled configs, on the meta device (no weights,
        no memory): what names kohya files when no model is given."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from stylelora.families.skeletons import skeleton_dir

        folder = skeleton_dir(cls.name)
        parts = {}
        with torch.device("meta"):
            config = UNet2DConditionModel.load_config(folder / "unet")
            parts["unet"] = UNet2DConditionModel.from_config(config)
            classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
            for attr, text_cls in classes.items():
                if (folder / attr).is_dir():
                    parts[attr] = text_cls(CLIPTextConfig.from_pretrained(folder / attr))
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        parts["scheduler"] = SimpleNamespace(config=scheduler)
        return cls(SimpleNamespace(**parts))

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser, a UNet or a transformer (`denoiser_attr`); the trainer calls it so."""
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype the VAE runs in when the other weights are in `weight_dtype`."""
        return weight_dtype

    def cast_vae(self, weight_dtype: torch.dtype) -> None:
        """Put the VAE in `vae_dtype`; latents of another dtype are cast on their way in."""
        dtype = self.vae_dtype(weight_dtype)
        self.vae.to(dtype=dtype)
        if dtype == weight_dtype:
            return
        # The pipelines decode latents in the UNet's dtype; the VAE's first layer takes them.
        first = self.vae.post_quant_conv or self.vae.decoder.conv_in
        first.register_forward_pre_hook(lambda _, args: tuple(a.to(dtype) for a in args))

    def set_schedule(self, prediction_type: str = "auto", zero_terminal_snr: bool = False) -> None:
        """Override the scheduler's prediction type; rescale its betas to zero terminal SNR.

        The training scheduler and the previews both build on the pipeline's scheduler config,
        so changing it here changes both.
        """
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

    def denoiser_targets(self, cfg: AdapterConfig) -> Targets:
        """The denoiser's modules `cfg.unet_targets` adapts (kohya's rules for SD UNets)."""
        chosen = {
            "train_blocks": cfg.train_blocks != "all",
            "double_block_indices": cfg.double_block_indices is not None,
            "single_block_indices": cfg.single_block_indices is not None,
        }
        if field := next((f for f, on in chosen.items() if on), None):
            raise UserError(
                f"adapter.{field}: chooses a transformer's blocks (Flux); a {self.name} UNet "
                "takes adapter.unet_targets only"
            )
        return unet_targets(self.unet, cfg.unet_targets)

    def swappable_blocks(self) -> list[torch.nn.Module]:
        """The denoiser's blocks in the order they run, for block swapping (none in a UNet)."""
        return []

    def text_encoder_targets(self, preset: str) -> Targets:
        """The text encoders' modules a target preset adapts (CLIP's names, as kohya)."""
        return Targets(main=list(TEXT_ENCODER_TARGETS[preset]))

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """Text encoders keyed by their kohya prefix."""
        return {
            prefix: getattr(self.pipe, attr) for prefix, attr in self.text_encoder_attrs.items()
        }

    def modules(self) -> list[torch.nn.Module]:
        """The UNet, the VAE and the text encoders: what holds weights."""
        return [self.unet, self.vae, *self.prompt_encoders()]

    def prompt_encoders(self) -> list[torch.nn.Module]:
        """Every module encoding a prompt runs: the text encoders, and those that never take an
        adapter (Flux's T5). They move together: to the device to encode, to the CPU after."""
        return list(self.text_encoders().values())

    @property
    def text_device(self) -> torch.device:
        """Where prompts are encoded: the text encoders' device, which may not be the UNet's
        (caching runs them on the GPU while the UNet waits on the CPU)."""
        encoder = next(iter(self.text_encoders().values()))
        return next(encoder.parameters()).device

    def training_objective(self) -> Objective:
        """What the denoiser is trained on: DDPM noising with the model's own betas and
        prediction type (its scheduler config, after `set_schedule`)."""
        return DDPMObjective(DDPMScheduler.from_config(self.pipe.scheduler.config))

    def denoise(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
        batch: dict[str, Any],
    ) -> torch.Tensor:
        """The denoiser's output for `noisy` latents (cast to its dtype) at `timesteps`."""
        dtype = compute_dtype(denoiser)
        return denoiser(noisy.to(dtype), timesteps, **self.unet_inputs(text, batch)).sample

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def default_resolution(self) -> int:
        return self.unet.config.sample_size * self.pipe.vae_scale_factor

    def encode_images(self, pixels: torch.Tensor, generator: Generators) -> torch.Tensor:
        """Pixels in [-1, 1] to scaled latents, sampling the VAE posterior with `generator`."""
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample(generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] to the VAE posterior's (mean, std), unscaled: what a cache keeps."""
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return posterior.mean, posterior.std

    def sample_latents(
        self, mean: torch.Tensor, std: torch.Tensor, generator: Generators
    ) -> torch.Tensor:
        """Scaled latents from a cached posterior; the same draw `encode_images` makes."""
        noise = randn_tensor(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (mean + std * noise - shift) * self.vae.config.scaling_factor

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

    def set_t5_options(self, max_length: int | None, attention_mask: bool) -> None:
        """T5 tokens per prompt and whether padding is masked, for families with T5."""
        if max_length or attention_mask:
            field = "t5_max_length" if max_length else "apply_t5_attn_mask"
            raise UserError(f"{field}: a {self.name} model has no T5 text encoder; remove it")

    def pipeline_text_kwargs(
        self, prompt: str, negative: str, size: tuple[int, int]
    ) -> dict[str, Any]:
        """The text arguments of a pipeline call that conditions as training does, for an
        image of `size` (width, height).

        With clip_skip the embeddings are made here, for the negative prompt too (as kohya's
        and AUTOMATIC1111's samplers do); diffusers would skip layers for the prompt only.
        """
        if not self.clip_skip:
            return {"prompt": prompt, "negative_prompt": negative or None}
        with torch.no_grad():
            embeds = self.encode_prompts([prompt, negative])["encoder_hidden_states"]
        return {"prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:]}

    def unet_inputs(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for the UNet beyond the noisy latents and timesteps."""
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    def kohya_name(self, prefix: str, module_path: str) -> str:
        """kohya's name of an adapted module: prefix + dotted path with '_' for '.'.

        transformers 5 dropped the `text_model.` level from CLIPTextModel's module paths;
        kohya names (and the UIs that read them) still carry it.
        """
        if prefix != "lora_unet" and not module_path.startswith("text_model."):
            module_path = "text_model." + module_path
        return f"{prefix}_{module_path.replace('.', '_')}"

    def kohya_part(self, prefix: str, module_path: str) -> tuple[str, tuple[str, ...]]:
        """kohya's module for `module_path`, and the paths of every module fused into it in
        output order: just `module_path`, unless the family's kohya layout fuses (Flux)."""
        return self.kohya_name(prefix, module_path), (module_path,)

    def kohya_blocks(self) -> tuple[int, int, int, bool]:
        """kohya's block-wise layout of the UNet (adapters/blocks.py): blocks on the down path,
        in the middle, on the up path, and whether a block at each end adds to them. SD1.x and
        SD2: 12, 1, 12 (block 0 holds no module)."""
        return 12, 1, 12, False

    def kohya_block_index(self, kohya_name: str) -> int:
        """kohya's block of a UNet module by its kohya name (-1: none, trained at the full rate):
        `3 * i + j` for the j-th resnet or attention of `down_blocks_i` (plus 1) or `up_blocks_i`
        (plus 13), `3 * i + 2` for its sampler, 12 for the middle block."""
        found = KOHYA_UNET_BLOCK.search(kohya_name)
        if found:
            side, i, kind, j = found.groups()
            index = 3 * int(i) + (2 if kind.endswith("samplers") else int(j))
            return index + (1 if side == "down" else 13)
        return 12 if "mid_block_" in kohya_name else -1

    def metadata(self) -> dict[str, str]:
        """Family-specific `ss_*` keys of an exported adapter."""
        return {"ss_base_model_version": self.kohya_base_version, "ss_v2": "False"}


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a module computes in: its first floating-point weight's (a quantized layer's
    packed weight is uint8)."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def check_clip_skip(clip_skip: int, encoders) -> None:
    """kohya's clip_skip N takes the output N-1 layers before the last: it must leave one."""
    layers = min(encoder.config.num_hidden_layers for encoder in encoders)
    if clip_skip >= layers:
        raise UserError(
            f"clip_skip = {clip_skip + 1}: the text encoder has {layers} layers, so clip_skip "
            f"can be 1 to {layers} (2 = penultimate, the usual choice)"
        )
