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
    caption_extension: str = ".txt"
    # one side, or several: each image then also trains at every larger one it has the pixels for
    resolution: PositiveInt | list[PositiveInt] = 512
    center_crop: bool = True
    flip: bool = False
    repeats: PositiveInt = 1
    trigger_word: str = ""
    # auto: none when training on the CPU (a worker would take a core from the step) or when
    # every draw comes from memory; else a few, loading the next batches during the step
    num_workers: NonNegInt | Literal["auto"] = "auto"
    strict: bool = False
    shuffle_caption: bool = False
    keep_tokens: NonNegInt = 0
    caption_dropout_rate: Probability = 0.0
    caption_tag_dropout_rate: Probability = 0.0
    alpha_background: tuple[ColorByte, ColorByte, ColorByte] = (255, 255, 255)
    enable_buckets: bool = True
    bucket_step: PositiveInt = 64
    min_image_size: PositiveInt | None = None  # skip images whose shorter side is below it
    min_bucket_side: PositiveInt | None = None
    max_bucket_side: PositiveInt | None = None
    bucket_no_upscale: bool = False
    # auto: on wherever a cache cannot change what a step trains on (see cache_plan)
    cache_latents: bool | Literal["auto"] = "auto"
    cache_text_encoder_outputs: bool | Literal["auto"] = "auto"
    cache_dir: Path | None = None
    # decoded images (or, cached, their latents) stay in memory when all of them fit in this
    memory_cache_mb: NonNegInt = 2048
    # loss masks (train.masked_loss): a folder laid out like the images (kohya's
    # conditioning_data_dir), or each image's transparency (kohya's alpha_mask)
    mask_dir: Path | None = None
    alpha_mask: bool = False
    # regularisation (class) images, kohya's reg_data_dir: `N_class` folders, drawn as often as
    # the training images each epoch, their loss weighted by train.prior_loss_weight
    reg_dir: Path | None = None

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
    type: Literal["lora", "loha", "lokr"] = "lora"
    rank: PositiveInt = 16
    alpha: PositiveFloat = 8.0
    unet_targets: Literal["cross-attn", "attention", "attn-mlp", "full"] = "cross-attn"
    text_encoder: bool = False
    text_encoder_rank: PositiveInt | None = None
    text_encoder_alpha: PositiveFloat | None = None
    init: Literal["kaiming", "gaussian"] = "kaiming"
    dropout: Probability = 0.0
    text_encoder_targets: Literal["attention", "attn-mlp"] = "attention"
    conv_rank: PositiveInt | None = None  # 3x3 convolutions of the `full` preset; unset: rank
    conv_alpha: PositiveFloat | None = None  # unset: alpha
    use_dora: bool = False
    module_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0

    # kohya's block-wise ranks for UNets, one value per block (adapters/blocks.py; 0: none)
    block_dims: list[NonNegInt] | None = None
    block_alphas: list[PositiveFloat] | None = None
    conv_block_dims: list[NonNegInt] | None = None
    conv_block_alphas: list[PositiveFloat] | None = None
    # LoKr (LyCORIS's `factor` and `decompose_both`): each weight is kron(w1, w2) with w1's sides
    # as close to `lokr_factor` as they divide (-1: near the square root); w2 is a rank-`rank`
    # product unless the rank reaches half its side, w1 too with `decompose_both`
    lokr_factor: Annotated[int, Field(ge=-1)] = -1
    decompose_both: bool = False

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
    max_steps: PositiveInt = 1000
    batch_size: PositiveInt = 1
    gradient_accumulation_steps: PositiveInt = 1
    learning_rate: PositiveFloat = 1e-4
    text_encoder_lr: PositiveFloat | None = None
    lr_scheduler: Literal["constant", "cosine", "cosine_with_restarts", "linear", "polynomial"] = (
        "constant"
    )
    lr_warmup_steps: NonNegInt = 0
    lr_cycles: PositiveInt = 1  # cosine_with_restarts: how many hard restarts
    lr_power: PositiveFloat = 1.0  # polynomial: the decay's power (1: linear)
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy", "lion8bit"] = "adamw"
    optimizer_args: dict[str, Any] = Field(default_factory=dict)
    adam_beta1: Probability = 0.9
    adam_beta2: Probability = 0.999
    adam_epsilon: PositiveFloat = 1e-8
    weight_decay: Annotated[float, Field(ge=0)] = 1e-2
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    attention: Literal["sdpa", "xformers"] = "sdpa"
    gradient_checkpointing: bool = False
    quantize_base: Literal["no", "nf4", "int8"] = "no"
    # The denoiser's last N blocks wait on the CPU and visit the device for their forward and
    # its recomputation (kohya's blocks_to_swap; Flux: 19 double then 38 single blocks).
    blocks_to_swap: NonNegInt = 0
    min_snr_gamma: PositiveFloat | None = None
    noise_offset: Annotated[float, Field(ge=0)] = 0.0
    multires_noise_iterations: NonNegInt = 0
    multires_noise_discount: Probability = 0.3
    min_timestep: NonNegInt = 0
    max_timestep: Annotated[PositiveInt | None, Unsettable] = None
    loss_type: Literal["l2", "huber", "smooth_l1"] = "l2"
    huber_c: PositiveFloat = 0.1
    # kohya's masked_loss: each pixel's loss weighted by the image's mask; where the mask is
    # black, by `unmasked_weight` (OneTrainer's "unmasked weight"; kohya: 0)
    masked_loss: bool = False
    unmasked_weight: Probability = 0.0
    # kohya's block-wise learning rates for UNets (adapters/blocks.py): weights per block, or a
    # named curve such as "sine+0.5"; a block at or below the threshold is not trained
    down_lr_weight: list[NonNegFloat] | str | None = None
    mid_lr_weight: list[NonNegFloat] | NonNegFloat | None = None
    up_lr_weight: list[NonNegFloat] | str | None = None
    block_lr_zero_threshold: NonNegFloat = 0.0
    # Flow-matching models (Flux): how sigmas are drawn (kohya's --timestep_sampling; "auto" is
    # "shift" for them, uniform timesteps for the DDPM models, which take no other), the
    # logit-normal's mean and spread (kohya's sigmoid_scale), the constant shift, and the loss
    # weighting (diffusers' weighting schemes).
    timestep_sampling: Literal["auto", "uniform", "logit_normal", "shift", "flux_shift"] = "auto"
    logit_mean: float = 0.0
    logit_std: PositiveFloat = 1.0
    discrete_flow_shift: PositiveFloat = 3.1582  # kohya's advice for Flux.1
    flow_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    # kohya's prior_loss_weight: the loss weight of data.reg_dir's images
    prior_loss_weight: NonNegFloat = 1.0
    # prior preservation without class images (ai-toolkit's differential output preservation):
    # each caption with the trigger word replaced by `prior_preservation_class` is trained
    # toward the frozen model's own prediction for it, with this weight
    prior_preservation: bool = False
    prior_preservation_weight: PositiveFloat = 1.0
    prior_preservation_class: str = ""
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    ema_export: Literal["beside", "instead"] = "beside"
    loraplus_lr_ratio: Annotated[PositiveFloat | None, Unsettable] = None
    checkpoint_every_n_steps: NonNegInt = 500
    checkpoints_keep: PositiveInt = 2
    max_nonfinite_steps: PositiveInt = 10
    log_with: Literal["tensorboard", "none"] = "tensorboard"

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
    prompts: list[str] = Field(default_factory=list)
    prompts_file: Annotated[Path | None, Unsettable] = None
    every_n_steps: NonNegInt = 0
    num_inference_steps: PositiveInt = 20
    guidance_scale: Annotated[float, Field(ge=0)] = 7.5
    negative_prompt: str = ""
    seed: int = 0
    width: PositiveInt | None = None
    height: PositiveInt | None = None
    scheduler: Literal["default", "euler", "euler_a", "ddim", "dpmpp_2m"] = "default"
    every_n_epochs: NonNegInt = 0


class ValidationConfig(Section):
    dir: Path | None = Field(default=None, description="Folder of held-out images and captions.")
    split: Annotated[float, Field(ge=0, lt=1)] = 0.0
    every_n_steps: NonNegInt = 100
    timesteps: list[NonNegInt] = Field(default_factory=lambda: [100, 300, 500, 700, 900])
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.dir or self.split) and self.every_n_steps > 0 and bool(self.timesteps)


class Config(Section):
    preset: str | None = Field(
        default=None, description="A VRAM preset (or a TOML path) this file overrides."
    )
    name: Annotated[str, Field(min_length=1, pattern=r"^[\w.\-]+$")]
    model: str = Field(
        description="A hub id, a diffusers folder, a single-file checkpoint, demo:FAMILY (a "
        "shipped pretrained demo model) or tiny:FAMILY (random weights)."
    )
    single_file_config: Path | None = Field(
        default=None, description="Diffusers folder of component configs for a single file."
    )
    output_dir: Path = Path("output")
    seed: int = 0
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
