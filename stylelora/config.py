"""The training config: pydantic models of the TOML file, and the one place defaults live.

The keys only some model families take (a Flux.1 transformer file's `ae`, `clip_skip`,
`adapter.train_blocks`, ...) are declared by those families (families/base.py's `Part` and
`Option`) and added here to their section; the loaded model's family refuses another's.
Relative paths written in a config file resolve against the file's folder, so a config runs the
same from any working directory; paths given on the command line resolve against the current one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from stylelora.data.scan import IMAGE_EXTENSIONS
from stylelora.errors import UserError
from stylelora.families.registry import declared_options, declared_parts, preset_files

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, which kohya's installers still use
    import tomli as tomllib


PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
ColorByte = Annotated[int, Field(ge=0, le=255)]
# An optional setting that `--set section.key=''` takes away again (back to unset)
Unsettable = BeforeValidator(lambda value: None if value == "" else value)


class Section(BaseModel):
    # inf and nan parse as TOML floats; no setting here means anything with them
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def with_family_keys(section: type[Section], key: str) -> type[Section]:
    """`section` (the config's `[key]` table, "" the top level) with a field for each family
    option declared there, and at the top level one for each family part (a path)."""
    fields: dict[str, Any] = {
        option.field: (option.annotation, Field(default=option.default, description=option.help))
        for option in declared_options().values()
        if option.section == key
    }
    if not key:
        fields |= {
            part.key: (Path | None, Field(default=None, description=part.help))
            for part in declared_parts().values()
        }
    return create_model(section.__name__, __base__=section, __module__=__name__, **fields)


# ".txt", ".caption", ".tags.txt": a dot, then name characters, no path separators or spaces
_CAPTION_EXTENSION = re.compile(r"(\.[\w-]+)+")


class DataConfig(Section):
    dir: Path = Field(description="Folder of images with caption files beside them.")
    caption_extension: str = Field(
        ".txt", description="Extension of the caption file beside each image (`txt` means `.txt`)."
    )
    # one side, or several: each image then also trains at every larger one it has the pixels for
    resolution: PositiveInt | list[PositiveInt] = Field(
        512,
        description="Training side in pixels, or a list of sides to train each image at several "
        "sizes.",
    )
    center_crop: bool = Field(
        True,
        description="Crop images to their bucket at the centre (true) or at a random place each "
        "draw.",
    )
    flip: bool = Field(
        False,
        description="Mirror images left to right at random (for subjects that look right "
        "mirrored).",
    )
    repeats: PositiveInt = Field(
        1,
        description="How often each image is drawn per epoch (a folder named `N_name` sets its "
        "own N).",
    )
    trigger_word: str = Field(
        "",
        description="Word put first in every caption that lacks it; use it in prompts to call the "
        "adapter up.",
    )
    # auto: none when training on the CPU (a worker would take a core from the step) or when
    # every draw comes from memory; else a few, loading the next batches during the step
    num_workers: NonNegInt | Literal["auto"] = Field(
        "auto",
        description="Processes loading images during the step; auto: none on the CPU or from "
        "memory, else up to 4.",
    )
    strict: bool = Field(
        False,
        description="Stop the run on any unusable file or caption that is not UTF-8, instead of "
        "skipping it.",
    )
    shuffle_caption: bool = Field(
        False, description="Shuffle the comma-separated tags of a caption at each draw."
    )
    keep_tokens: NonNegInt = Field(
        0, description="The first N tags stay in place when tags are shuffled or dropped."
    )
    caption_dropout_rate: Probability = Field(
        0.0, description="How often an image is trained on the empty caption."
    )
    caption_tag_dropout_rate: Probability = Field(
        0.0, description="How often each tag is dropped from a caption."
    )
    alpha_background: tuple[ColorByte, ColorByte, ColorByte] = Field(
        (255, 255, 255), description="RGB colour that transparent pixels are composited onto."
    )
    enable_buckets: bool = Field(
        True,
        description="Group images by aspect ratio into buckets instead of cropping them all "
        "square.",
    )
    bucket_step: PositiveInt = Field(
        64, description="Bucket sides are multiples of this many pixels (64; 32 also works)."
    )
    # skip images whose shorter side is below it
    min_image_size: PositiveInt | None = Field(
        None,
        description="Skip images whose shorter side is under this many pixels; unset: upscale "
        "them.",
    )
    min_bucket_side: PositiveInt | None = Field(
        None, description="Smallest bucket side; unset: half the resolution, at most 256."
    )
    max_bucket_side: PositiveInt | None = Field(
        None, description="Largest bucket side; unset: twice the resolution, at most 1024."
    )
    bucket_no_upscale: bool = Field(
        False, description="Never upscale an image to a larger bucket than its own size."
    )
    # auto: on wherever a cache cannot change what a step trains on (see cache_plan)
    cache_latents: bool | Literal["auto"] = Field(
        "auto",
        description="Encode the images with the VAE once and reuse the latents; auto: when crops "
        "are fixed.",
    )
    cache_text_encoder_outputs: bool | Literal["auto"] = Field(
        "auto", description="Encode the captions once and reuse them; auto: when they never change."
    )
    cache_dir: Path | None = Field(
        None,
        description="Where the caches are kept; unset: `.stylelora-cache` in the images folder.",
    )
    # decoded images (or, cached, their latents) stay in memory when all of them fit in this
    memory_cache_mb: NonNegInt = Field(
        2048,
        description="Keep cached latents or decoded images in memory when they fit in this many "
        "MB.",
    )
    # loss masks (train.masked_loss): a folder laid out like the images (kohya's
    # conditioning_data_dir), or each image's transparency (kohya's alpha_mask)
    mask_dir: Path | None = Field(
        None, description="Folder of loss masks laid out like the images (for train.masked_loss)."
    )
    alpha_mask: bool = Field(
        False, description="Use each image's transparency as its loss mask (for train.masked_loss)."
    )
    # regularisation (class) images, kohya's reg_data_dir: `N_class` folders, drawn as often as
    # the training images each epoch, their loss weighted by train.prior_loss_weight
    reg_dir: Path | None = Field(
        None,
        description="Folder of regularisation (class) images in `N_class` folders, kohya's "
        "reg_data_dir.",
    )

    @property
    def caption_randomness(self) -> bool:
        """Whether a caption can read differently from one draw to the next."""
        return bool(
            self.shuffle_caption or self.caption_dropout_rate or self.caption_tag_dropout_rate
        )

    @property
    def resolutions(self) -> list[int]:
        """Every training resolution, smallest first (one for a plain number)."""
        value = self.resolution
        return sorted(value) if isinstance(value, list) else [value]

    @property
    def largest_resolution(self) -> int:
        """The model's target size: previews, validation and the file's resolution use it."""
        return self.resolutions[-1]

    def bucket_sides(self, resolution: int | None = None) -> tuple[int, int]:
        """(min, max) bucket side at `resolution`; unset, kohya's 256 and 1024 at 512 px, scaled
        below that. Without `resolution`: the span over every training resolution."""
        if resolution is None:
            sides = [self.bucket_sides(r) for r in self.resolutions]
            return min(low for low, _ in sides), max(high for _, high in sides)
        step = self.bucket_step
        low = self.min_bucket_side or max(step, min(256, resolution // 2 // step * step))
        high = self.max_bucket_side or max(resolution, min(1024, 2 * resolution))
        return low, high

    @field_validator("resolution", mode="before")
    @classmethod
    def _sides_once_each(cls, value: Any) -> Any:
        """One message for any wrong value (pydantic's would name each branch of the union)."""
        sides = value if isinstance(value, list) else [value]
        if not all(isinstance(side, int) and not isinstance(side, bool) and side > 0
                   for side in sides) or not sides:  # fmt: skip
            raise ValueError(
                "expected a side such as 512, or a list of them such as [512, 768, 1024] "
                f"(got {value!r})"
            )
        twice = sorted({side for side in sides if sides.count(side) > 1})
        if twice:
            raise ValueError(f"lists {', '.join(map(str, twice))} twice; give each side once")
        return value

    @field_validator("caption_extension")
    @classmethod
    def _caption_extension_with_dot(cls, value: str) -> str:
        """`txt` means `.txt`, as kohya users often write it."""
        extension = value if value.startswith(".") else f".{value}"
        if not _CAPTION_EXTENSION.fullmatch(extension) or len(extension) > 32:
            raise ValueError(f'expected an extension such as ".txt" or ".caption" (got {value!r})')
        if extension.lower() in IMAGE_EXTENSIONS:
            raise ValueError(f"{extension} is an image's extension; captions are text files")
        return extension

    @model_validator(mode="after")
    def _buckets_fit(self) -> DataConfig:
        if self.bucket_step % 8:
            raise ValueError(f"data.bucket_step: must be a multiple of 8 (got {self.bucket_step})")
        if not self.enable_buckets:
            return self
        for resolution in self.resolutions:
            self._bucket_fits(resolution)
        return self

    def _bucket_fits(self, resolution: int) -> None:
        low, high = self.bucket_sides(resolution)
        if resolution % self.bucket_step:
            raise ValueError(
                f"data.resolution {resolution} must be a multiple of data.bucket_step "
                f"{self.bucket_step} (or set data.enable_buckets = false)"
            )
        if not low <= resolution <= high:
            raise ValueError(
                f"data.min_bucket_side {low} <= data.resolution {resolution} <= "
                f"data.max_bucket_side {high} must hold"
            )

    @model_validator(mode="after")
    def _cache_is_deterministic(self) -> DataConfig:
        if self.cache_latents is True and not self.center_crop:
            raise ValueError(
                "data.cache_latents needs data.center_crop = true: a random crop differs "
                "every draw, so its latents cannot be cached"
            )
        return self


class AdapterConfig(Section):
    # lora: kohya's LoRA (LoCon with `full`); loha, lokr: LyCORIS's Hadamard and Kronecker
    # products (PEFT's LoHa and LoKr), written in LyCORIS's key layout
    type: Literal["lora", "loha", "lokr"] = Field(
        "lora", description="Adapter kind: lora, or LyCORIS's loha or lokr."
    )
    rank: PositiveInt = Field(
        16,
        description="Size of the adapter's matrices: higher learns more detail and makes a larger "
        "file.",
    )
    alpha: PositiveFloat = Field(
        8.0, description="Scales the adapter's output by alpha / rank; lower is gentler."
    )
    unet_targets: Literal["cross-attn", "attention", "attn-mlp", "full"] = Field(
        "cross-attn",
        description="Which layers of the denoiser get adapters (cross-attn, attention, attn-mlp, "
        "full).",
    )
    text_encoder: bool = Field(False, description="Also train adapters on the text encoder(s).")
    text_encoder_rank: PositiveInt | None = Field(
        None, description="Rank of the text encoder's adapters; unset: adapter.rank."
    )
    text_encoder_alpha: PositiveFloat | None = Field(
        None, description="Alpha of the text encoder's adapters; unset: adapter.alpha."
    )
    init: Literal["kaiming", "gaussian"] = Field(
        "kaiming", description="How the down matrices start: kaiming (as kohya) or gaussian."
    )
    dropout: Probability = Field(
        0.0, description="Dropout on the adapter's input while training (PEFT's lora_dropout)."
    )
    text_encoder_targets: Literal["attention", "attn-mlp"] = Field(
        "attention", description="Which text encoder layers get adapters: attention, or attn-mlp."
    )
    # 3x3 convolutions of the `full` preset; unset: rank
    conv_rank: PositiveInt | None = Field(
        None,
        description="Rank of the 3x3 convolutions' adapters under `full`; unset: adapter.rank.",
    )
    # unset: alpha
    conv_alpha: PositiveFloat | None = Field(
        None,
        description="Alpha of the 3x3 convolutions' adapters under `full`; unset: adapter.alpha.",
    )
    use_dora: bool = Field(False, description="Train DoRA (a magnitude per output) on top of LoRA.")
    module_dropout: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="While training, skip a whole module's adapter with this probability."
    )

    # kohya's block-wise ranks for UNets, one value per block (adapters/blocks.py; 0: none)
    block_dims: list[NonNegInt] | None = Field(
        None, description="Rank per UNet block (kohya's block_dims; 0: no adapter there)."
    )
    block_alphas: list[PositiveFloat] | None = Field(
        None, description="Alpha per UNet block (kohya's block_alphas)."
    )
    conv_block_dims: list[NonNegInt] | None = Field(
        None, description="Convolution rank per UNet block, for `full`."
    )
    conv_block_alphas: list[PositiveFloat] | None = Field(
        None, description="Convolution alpha per UNet block, for `full`."
    )
    # LoKr (LyCORIS's `factor` and `decompose_both`): each weight is kron(w1, w2) with w1's sides
    # as close to `lokr_factor` as they divide (-1: near the square root); w2 is a rank-`rank`
    # product unless the rank reaches half its side, w1 too with `decompose_both`
    lokr_factor: Annotated[int, Field(ge=-1)] = Field(
        -1, description="LoKr's Kronecker factor (-1: near the square root of each side)."
    )
    decompose_both: bool = Field(
        False, description="LoKr: also decompose the smaller Kronecker factor into a rank product."
    )

    @model_validator(mode="after")
    def _lycoris_takes_its_own_options(self) -> AdapterConfig:
        if self.type != "lokr" and (self.lokr_factor != -1 or self.decompose_both):
            raise ValueError(
                "adapter.lokr_factor and adapter.decompose_both are LoKr's: "
                'set adapter.type = "lokr", or remove them'
            )
        if self.lokr_factor == 0:
            raise ValueError("adapter.lokr_factor must be -1 (automatic) or a positive factor")
        if self.type == "lora":
            return self
        lora_only = {"use_dora": self.use_dora, "dropout": self.dropout, "init": self.init}
        for key, value in lora_only.items():
            if value and value != "kaiming":
                raise ValueError(
                    f"adapter.{key} is LoRA's; adapter.type = {self.type!r} does not take it "
                    "(LoHa and LoKr take adapter.module_dropout)"
                )
        return self


AdapterConfig = with_family_keys(AdapterConfig, "adapter")


class TrainConfig(Section):
    max_steps: PositiveInt = Field(1000, description="How many optimizer steps to train for.")
    batch_size: PositiveInt = Field(1, description="Images per step on each device.")
    gradient_accumulation_steps: PositiveInt = Field(
        1, description="Micro-batches added up into one optimizer step."
    )
    learning_rate: PositiveFloat = Field(
        1e-4,
        description="The optimizer's step size (the text encoders' too, unless "
        "train.text_encoder_lr is set).",
    )
    text_encoder_lr: PositiveFloat | None = Field(
        None,
        description="Learning rate of the text encoders' adapters; unset: train.learning_rate.",
    )
    lr_scheduler: Literal["constant", "cosine", "cosine_with_restarts", "linear", "polynomial"] = (
        Field(
            "constant", description="How the learning rate changes over the run, after the warm-up."
        )
    )
    lr_warmup_steps: NonNegInt = Field(
        0, description="Steps over which the learning rate rises from 0 at the start."
    )
    # cosine_with_restarts: how many hard restarts
    lr_cycles: PositiveInt = Field(1, description="Hard restarts of cosine_with_restarts.")
    # polynomial: the decay's power (1: linear)
    lr_power: PositiveFloat = Field(
        1.0, description="Power of the polynomial schedule's decay (1: linear)."
    )
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy", "lion8bit"] = Field(
        "adamw",
        description="adamw, adamw8bit (less memory), adafactor, prodigy (finds its own rate) or "
        "lion8bit.",
    )
    optimizer_args: dict[str, Any] = Field(
        default_factory=dict,
        description="A table of the optimizer's own arguments, e.g. { d_coef = 0.5 }.",
    )
    adam_beta1: Probability = Field(
        0.9, description="Adam's first-moment decay, where the optimizer takes it."
    )
    adam_beta2: Probability = Field(
        0.999, description="Adam's second-moment decay, where the optimizer takes it."
    )
    adam_epsilon: PositiveFloat = Field(
        1e-8, description="Adam's epsilon, where the optimizer takes it."
    )
    weight_decay: Annotated[float, Field(ge=0)] = Field(
        1e-2, description="Weight decay, where the optimizer takes it."
    )
    max_grad_norm: Annotated[float, Field(ge=0)] = Field(
        1.0, description="Clip the gradients' norm to this (0: no clipping)."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="no, fp16 (GPU only) or bf16: the frozen weights' type and autocast."
    )
    attention: Literal["sdpa", "xformers"] = Field(
        "sdpa",
        description="Attention kernel: sdpa (PyTorch's), or xformers where installed on a CUDA "
        "GPU.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, slower steps."
    )
    quantize_base: Literal["no", "nf4", "int8"] = Field(
        "no", description="Quantize the frozen base to nf4 or int8 (QLoRA) to save memory."
    )
    # The denoiser's last N blocks wait on the CPU and visit the device for their forward and
    # its recomputation (kohya's blocks_to_swap; Flux: 19 double then 38 single blocks).
    blocks_to_swap: NonNegInt = Field(
        0, description="Keep the denoiser's last N blocks on the CPU, moving each in when it runs."
    )
    min_snr_gamma: PositiveFloat | None = Field(
        None, description="Min-SNR loss weighting (5 is usual); unset: off."
    )
    noise_offset: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Offset noise strength (e.g. 0.05) for darker darks and brighter brights."
    )
    multires_noise_iterations: NonNegInt = Field(
        0, description="Multi-resolution (pyramid) noise levels (0: off; 6 is usual)."
    )
    multires_noise_discount: Probability = Field(
        0.3, description="How much each coarser level of multi-resolution noise is weakened."
    )
    min_timestep: NonNegInt = Field(
        0, description="Train only on timesteps from this one on (0 to 1000)."
    )
    max_timestep: Annotated[PositiveInt | None, Unsettable] = Field(
        None, description="Train only on timesteps below this one; unset: up to the model's last."
    )
    loss_type: Literal["l2", "huber", "smooth_l1"] = Field(
        "l2", description="l2, huber or smooth_l1 (kohya's pseudo-Huber with train.huber_c)."
    )
    huber_c: PositiveFloat = Field(0.1, description="The Huber losses' constant.")
    # kohya's masked_loss: each pixel's loss weighted by the image's mask; where the mask is
    # black, by `unmasked_weight` (OneTrainer's "unmasked weight"; kohya: 0)
    masked_loss: bool = Field(
        False,
        description="Weight each pixel's loss by the image's mask (data.mask_dir or "
        "data.alpha_mask).",
    )
    unmasked_weight: Probability = Field(
        0.0, description="Loss weight where the mask is black (0: that part does not train)."
    )
    # kohya's block-wise learning rates for UNets (adapters/blocks.py): weights per block, or a
    # named curve such as "sine+0.5"; a block at or below the threshold is not trained
    down_lr_weight: list[NonNegFloat] | str | None = Field(
        None, description="Learning rate weight per down block, or a curve such as sine+0.5."
    )
    mid_lr_weight: list[NonNegFloat] | NonNegFloat | None = Field(
        None, description="Learning rate weight of the middle block."
    )
    up_lr_weight: list[NonNegFloat] | str | None = Field(
        None, description="Learning rate weight per up block, or a curve such as cosine."
    )
    block_lr_zero_threshold: NonNegFloat = Field(
        0.0, description="Blocks whose weight is at or below this are not trained."
    )
    # Flow-matching models (Flux): how sigmas are drawn (kohya's --timestep_sampling; "auto" is
    # "shift" for them, uniform timesteps for the DDPM models, which take no other), the
    # logit-normal's mean and spread (kohya's sigmoid_scale), the constant shift, and the loss
    # weighting (diffusers' weighting schemes).
    timestep_sampling: Literal["auto", "uniform", "logit_normal", "shift", "flux_shift"] = Field(
        "auto",
        description="How sigmas are drawn: auto (shift), uniform, logit_normal, shift or "
        "flux_shift.",
    )
    logit_mean: float = Field(0.0, description="Mean of logit_normal sampling.")
    logit_std: PositiveFloat = Field(
        1.0, description="Spread of logit_normal sampling (kohya's sigmoid_scale)."
    )
    # kohya's advice for Flux.1
    discrete_flow_shift: PositiveFloat = Field(
        3.1582, description="The shift of `shift` sampling (3.1582, as kohya advises)."
    )
    flow_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none", description="Loss weighting over sigmas: none, sigma_sqrt or cosmap."
    )
    # kohya's prior_loss_weight: the loss weight of data.reg_dir's images
    prior_loss_weight: NonNegFloat = Field(
        1.0, description="Loss weight of the regularisation images (data.reg_dir)."
    )
    # prior preservation without class images (ai-toolkit's differential output preservation):
    # each caption with the trigger word replaced by `prior_preservation_class` is trained
    # toward the frozen model's own prediction for it, with this weight
    prior_preservation: bool = Field(
        False,
        description="Train each caption with the trigger word replaced toward the base model's "
        "own prediction.",
    )
    prior_preservation_weight: PositiveFloat = Field(
        1.0, description="Loss weight of prior preservation."
    )
    prior_preservation_class: str = Field(
        "", description="What replaces the trigger word for prior preservation (empty: dropped)."
    )
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="Keep an exponential moving average of the adapter (e.g. 0.999; 0: off)."
    )
    ema_export: Literal["beside", "instead"] = Field(
        "beside",
        description="beside: also write NAME-ema.safetensors; instead: NAME.safetensors holds the "
        "EMA.",
    )
    loraplus_lr_ratio: Annotated[PositiveFloat | None, Unsettable] = Field(
        None,
        description="LoRA+: train the up matrices at this multiple of the learning rate; unset: "
        "off.",
    )
    checkpoint_every_n_steps: NonNegInt = Field(
        500, description="Save a checkpoint to resume from every N steps (0: none)."
    )
    checkpoints_keep: PositiveInt = Field(
        2, description="How many checkpoints to keep; older ones are removed."
    )
    max_nonfinite_steps: PositiveInt = Field(
        10, description="Stop after this many skipped (NaN or inf loss) steps in a row."
    )
    log_with: Literal["tensorboard", "none"] = Field(
        "tensorboard", description="tensorboard (logs/ in the run folder) or none."
    )

    @model_validator(mode="after")
    def _timestep_range(self) -> TrainConfig:
        if self.max_timestep is not None and self.max_timestep <= self.min_timestep:
            raise ValueError(
                f"train.max_timestep {self.max_timestep} must be above "
                f"train.min_timestep {self.min_timestep}"
            )
        return self


TrainConfig = with_family_keys(TrainConfig, "train")


class SampleConfig(Section):
    prompts: list[str] = Field(
        default_factory=list,
        description="Preview prompts written in the config (or use sample.prompts_file).",
    )
    prompts_file: Annotated[Path | None, Unsettable] = Field(
        None,
        description="Text file of preview prompts, one a line (kohya's format); unset: no "
        "previews.",
    )
    every_n_steps: NonNegInt = Field(
        0, description="Render previews every N steps (0: only at the end)."
    )
    num_inference_steps: PositiveInt = Field(20, description="Sampler steps per preview image.")
    guidance_scale: Annotated[float, Field(ge=0)] = Field(
        7.5, description="The pipeline's guidance for previews (classifier-free or embedded)."
    )
    negative_prompt: str = Field("", description="Negative prompt of the previews.")
    seed: int = Field(
        0, description="Seed of the previews' noise, so each grid compares with the last."
    )
    width: PositiveInt | None = Field(
        None, description="Preview width; unset: the training resolution."
    )
    height: PositiveInt | None = Field(
        None, description="Preview height; unset: the training resolution."
    )
    scheduler: Literal["default", "euler", "euler_a", "ddim", "dpmpp_2m"] = Field(
        "default",
        description="Preview sampler: default (the model's own), euler, euler_a, ddim or dpmpp_2m.",
    )
    every_n_epochs: NonNegInt = Field(
        0, description="Also render previews every N epochs (0: off)."
    )


class ValidationConfig(Section):
    dir: Path | None = Field(default=None, description="Folder of held-out images and captions.")
    split: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0,
        description="Hold out this share of the images for validation (e.g. 0.1), instead of "
        "validation.dir.",
    )
    every_n_steps: NonNegInt = Field(100, description="Compute the validation loss every N steps.")
    timesteps: list[NonNegInt] = Field(
        default_factory=lambda: [100, 300, 500, 700, 900],
        description="The fixed timesteps the held-out images are noised at.",
    )
    seed: int = Field(0, description="Seed of the validation noise.")
    measure: bool = Field(
        True,
        description="Measure style, content and copying of held-out prompts' renders while "
        "training (the report's curve and NAME-best.safetensors); false: off.",
    )
    measure_every_n_steps: NonNegInt = Field(
        250,
        description="Measure every N steps, at each checkpoint and at the end (0: at the end "
        "and the checkpoints only).",
    )
    measure_prompts: PositiveInt = Field(
        4,
        description="Prompts measured: the sample prompts first, then training captions with "
        "their subject swapped for another.",
    )
    measure_steps: PositiveInt | None = Field(
        10,
        description="Denoising steps of each measured render; unset: each prompt's own "
        "(sample.num_inference_steps).",
    )

    @property
    def enabled(self) -> bool:
        return bool(self.dir or self.split) and self.every_n_steps > 0 and bool(self.timesteps)


class Config(Section):
    preset: str | None = Field(
        default=None, description="A VRAM preset (or a TOML path) this file overrides."
    )
    name: Annotated[str, Field(min_length=1, pattern=r"^[\w.\-]+$")] = Field(
        description="The run's name: the adapter is written as NAME.safetensors."
    )
    model: str = Field(
        description="A hub id, a diffusers folder, a single-file checkpoint, demo:FAMILY (a "
        "shipped pretrained demo model) or tiny:FAMILY (random weights)."
    )
    single_file_config: Path | None = Field(
        default=None, description="Diffusers folder of component configs for a single file."
    )
    output_dir: Path = Field(
        Path("output"),
        description="Folder the run writes its adapter, checkpoints, previews and log into.",
    )
    seed: int = Field(
        0,
        description="Seed of all training randomness: the same seed and config give the same "
        "adapter.",
    )
    data: DataConfig
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    @model_validator(mode="after")
    def _prompts_from_one_place(self) -> Config:
        if self.sample.prompts and self.sample.prompts_file:
            raise ValueError("set sample.prompts or sample.prompts_file, not both")
        return self

    @model_validator(mode="after")
    def _masks_have_one_source(self) -> Config:
        data = self.data
        if data.mask_dir and data.alpha_mask:
            raise ValueError("set data.mask_dir or data.alpha_mask, not both")
        has_masks = bool(data.mask_dir or data.alpha_mask)
        if self.train.masked_loss and not has_masks:
            raise ValueError(
                "train.masked_loss needs masks: set data.mask_dir (a folder of masks laid out "
                "like the images) or data.alpha_mask = true (the images' transparency)"
            )
        if has_masks and not self.train.masked_loss:
            raise ValueError(
                "data.mask_dir / data.alpha_mask give masks that only train.masked_loss = true "
                "uses: set it, or remove them"
            )
        return self

    @model_validator(mode="after")
    def _priors_have_what_they_need(self) -> Config:
        data, train = self.data, self.train
        if train.prior_loss_weight != 1.0 and not data.reg_dir:
            raise ValueError(
                "train.prior_loss_weight weighs the regularisation images: set data.reg_dir "
                "(a folder of class images), or remove it"
            )
        if data.reg_dir and train.masked_loss:
            raise ValueError(
                "data.reg_dir with train.masked_loss: regularisation images have no masks; "
                "use one or the other"
            )
        if train.prior_preservation and not data.trigger_word:
            raise ValueError(
                "train.prior_preservation replaces the trigger word in each caption by "
                "train.prior_preservation_class: set data.trigger_word"
            )
        return self

    @model_validator(mode="after")
    def _lycoris_fits_the_training(self) -> Config:
        kind = self.adapter.type
        if kind == "lora":
            return self
        if self.train.loraplus_lr_ratio:
            raise ValueError(
                f"train.loraplus_lr_ratio speeds up LoRA's up matrices; adapter.type = {kind!r} "
                "has none: remove it"
            )
        if self.train.quantize_base != "no":
            raise ValueError(
                f'train.quantize_base = "{self.train.quantize_base}": PEFT\'s {kind} layers wrap '
                'only full-precision layers; use adapter.type = "lora" or quantize_base = "no"'
            )
        return self

    @model_validator(mode="after")
    def _validation_from_one_place(self) -> Config:
        if self.validation.dir and self.validation.split:
            raise ValueError("set validation.dir or validation.split, not both")
        return self

    def family_settings(self) -> dict[str, Any]:
        """Every family option's value by dotted key; the loaded model's family takes its own."""
        settings = {}
        for key in declared_options():
            value: Any = self
            for part in key.split("."):
                value = getattr(value, part)
            settings[key] = value
        return settings

    def part_paths(self) -> dict[str, Path | None]:
        """The files of the model given on their own, by the family part's key."""
        return {key: getattr(self, key) for key in declared_parts()}


Config = with_family_keys(Config, "")


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a TOML config, apply `key=value` overrides, validate; UserError names what is wrong."""
    path = Path(path)
    raw = _read_toml(path)
    for item in overrides:
        _apply_override(raw, item)
    raw = _layer_preset(raw, path.parent)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{path}: {describe_validation_error(exc)}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's table, with its relative paths resolved against its folder."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; give the config's .toml file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    _resolve_paths(raw, path.parent)
    return raw


def preset_names() -> list[str]:
    """The VRAM presets: complete configs each family ships (`families/<name>/presets/`), also
    layered under a user's file by `preset = "<name>"`."""
    return sorted(preset_files())


def preset_path(preset: str, base: Path) -> Path:
    """A preset's file: a family's preset by name (`sdxl-8gb`) or a TOML path (relative to
    `base`)."""
    if preset.endswith(".toml"):
        return base / preset
    files = preset_files()
    if preset in files:
        return files[preset]
    raise UserError(f"preset: no preset {preset!r} (known: {', '.join(sorted(files))})")


def _layer_preset(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """The preset's keys under the user's: the user's file and --set win, section by section."""
    preset = raw.get("preset")
    if preset is None:
        return raw
    if not isinstance(preset, str):
        raise UserError(f"preset: expected a preset name or a .toml path (got {preset!r})")
    layered = _read_toml(preset_path(preset, base))
    if "preset" in layered:
        raise UserError(f"preset: {preset!r} names another preset; presets do not chain")
    # A preset lends its settings, not its run: a file that forgets data.dir must not train
    # on the preset's demo images, nor write into the preset's folder.
    for key in _RUN_KEYS:
        layered.pop(key, None)
    if isinstance(layered.get("data"), dict):
        layered["data"].pop("dir", None)
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(layered.get(key), dict):
            layered[key] = {**layered[key], **value}
        else:
            layered[key] = value
    return layered


_RUN_KEYS = ("name", "output_dir")

_PATH_KEYS = (
    ("data", "dir"),
    ("data", "cache_dir"),
    ("data", "mask_dir"),
    ("data", "reg_dir"),
    ("sample", "prompts_file"),
    ("output_dir",),
    ("single_file_config",),
    *((key,) for key in declared_parts()),
    ("validation", "dir"),
)


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    for keys in _PATH_KEYS:
        parent = raw
        for key in keys[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and isinstance(parent.get(keys[-1]), str):
            parent[keys[-1]] = os.path.normpath(base / parent[keys[-1]])
    model = raw.get("model")
    if isinstance(model, str) and model.startswith(".") and (base / model).exists():
        raw["model"] = os.path.normpath(base / model)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected key=value, e.g. train.learning_rate=1e-4")
    *parents, leaf = key.strip().split(".")
    target = raw
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise UserError(f"--set {key}: {part} is not a section")
    target[leaf] = _parse_value(text.strip())


def _parse_value(text: str) -> Any:
    """A TOML value (number, bool, quoted string, array); anything else is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem as one line: dotted key, what is wrong, and the value given."""
    key, message = validation_problem(exc.errors()[0])
    if key != "config":
        message = f"{key}: {message}"
    more = len(exc.errors()) - 1
    return message + (f" (and {more} more problems)" if more else "")


def validation_problem(error: dict[str, Any]) -> tuple[str, str]:
    """One of pydantic's errors as (dotted key, what is wrong and the value given); the key is
    "config" for a problem of the whole file."""
    key = ".".join(str(part) for part in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        return key, "unknown key (check the spelling; see configs/demo.toml for every key)"
    if error["type"] == "missing":
        return key, "required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    if isinstance(given, (str, int, float, bool)) and error["type"] != "value_error":
        message += f" (got {given!r})"
    return key, message
