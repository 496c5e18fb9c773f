"""The interface every model family implements; config, CLI, trainer, sampler, exporter and UI
use only this and the registry.

A family is one folder, `families/<name>/`: its class (a subclass of `ModelFamily`, or of
`UNetFamily` for the Stable Diffusion UNets) in `__init__.py`, and beside it whatever else
differs: its bundled component configs (`skeleton/`), its VRAM presets (`presets/`), its shipped
demo model (`demo/`, where it has one) and its own helper modules. It declares the files a user
may give separately (`parts`) and the settings only it takes (`options`); config, CLI and UI
build their keys and flags from those declarations. Nothing here is a model's behaviour: what a
family must answer is abstract, so a family that forgets an answer cannot be instantiated.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from pydantic import Field

from stylelora.errors import UserError
from stylelora.families.objective import DDPMObjective, FlowMatchObjective

if TYPE_CHECKING:  # config builds its models from the families' declarations
    from stylelora.adapters.targets import Targets
    from stylelora.config import AdapterConfig
    from stylelora.families.objective import Objective

# One CPU generator for a whole batch, or one per sample.
Generators = torch.Generator | list[torch.Generator]
# The key under which the adapted denoiser travels (kohya's prefix for it).
DENOISER = "lora_unet"


@dataclass(frozen=True)
class Part:
    """A file of a model that users keep apart from the rest (kohya's `--ae`, musubi's `--vae`):
    a top-level config key holding a path, and the flag `--<key>` of `sample` and `merge`."""

    key: str
    attr: str  # the pipeline attribute it fills
    usual: str  # the file users hold, as messages name it
    help: str


@dataclass(frozen=True)
class Option:
    """A setting only some families take: a config field (dotted for a section, such as
    `adapter.train_blocks`), with `flag` also an option of `sample` (argparse's keywords)."""

    key: str
    annotation: Any  # the field's pydantic type
    default: Any
    help: str
    flag: dict[str, Any] | None = None

    @property
    def section(self) -> str:
        """The config section, "" for the top level."""
        return self.key.rpartition(".")[0]

    @property
    def field(self) -> str:
        return self.key.rpartition(".")[2]


# Declarations the transformer families with LLM text encoders share (one declaration a key).
VAE_FILE = Part("vae", "vae", "VAE file", "the model's VAE (a file or a diffusers folder)")
TEXT_ENCODER_FILE = Part(
    "text_encoder",
    "text_encoder",
    "text encoder file",
    "the model's text encoder (a file or a diffusers folder)",
)
MAX_SEQUENCE_LENGTH = Option(
    "max_sequence_length",
    Annotated[int, Field(ge=1, le=1024)] | None,
    None,
    "text tokens per prompt for an LLM text encoder (diffusers' max_sequence_length); unset: "
    "what the model's pipeline uses",
    flag={"type": int, "help": "LLM text encoders: tokens per prompt (default: the pipeline's)"},
)

# Keys of the shared config sections that act on something only some denoisers have; a family
# without it has no use for them (`ModelFamily.unused_keys`).
BLOCK_WISE_KEYS = (  # kohya's UNet blocks (adapters/blocks.py)
    "train.down_lr_weight",
    "train.mid_lr_weight",
    "train.up_lr_weight",
    "train.block_lr_zero_threshold",
    "adapter.block_dims",
    "adapter.block_alphas",
    "adapter.conv_block_dims",
    "adapter.conv_block_alphas",
)
TEXT_ENCODER_ADAPTER_KEYS = (  # text encoders that take an adapter
    "adapter.text_encoder",
    "adapter.text_encoder_rank",
    "adapter.text_encoder_alpha",
    "adapter.text_encoder_targets",
    "train.text_encoder_lr",
)
BLOCK_SWAP_KEYS = ("train.blocks_to_swap",)  # blocks alike enough to swap by count
SAMPLER_KEYS = ("sample.scheduler",)  # preview samplers to choose from


class ModelFamily(ABC):
    """A loaded model of one family, and what its family says about models like it."""

    # The family's one name: its folder, `tiny:<name>`, `stylelora inspect`'s answer.
    name: ClassVar[str]
    # How messages call it ("SD1.x", "Flux.1").
    title: ClassVar[str]
    # The pipeline attribute holding the denoiser (diffusers' files name it so).
    denoiser_attr: ClassVar[str]
    # The keyword the denoiser takes its noisy latents by, when the pipeline calls it.
    denoiser_input: ClassVar[str]
    # Adapter prefix -> pipeline attribute of each text encoder that may take an adapter.
    text_encoder_attrs: ClassVar[dict[str, str]]
    # Every pipeline attribute a prompt runs through (adapted or not).
    prompt_encoder_attrs: ClassVar[tuple[str, ...]]
    # The files a user may give on their own, and the settings only this family takes.
    parts: ClassVar[tuple[Part, ...]] = ()
    options: ClassVar[tuple[Option, ...]] = ()
    # The layout of its adapter files (what the UIs read): "kohya" (`lora_unet_...`, with
    # lora_down/lora_up/alpha) or "comfyui" (`diffusion_model.<module>.lora_A/lora_B`).
    native_format: ClassVar[Literal["kohya", "comfyui"]]
    # The name prefix of the denoiser's modules in its adapter files (`lora_unet_`,
    # `diffusion_model.`; a text encoder's is its key in `text_encoder_attrs` and "_"), and
    # whether a module there may fuse several of the model's (Flux's qkv).
    denoiser_prefix: ClassVar[str]
    fuses_modules: ClassVar[bool] = False
    # Every `ss_base_model_version` whose adapters fit this family's modules, and the prefix
    # they share (a file's family is told by it: "sdxl" also covers "sdxl_base_v0-9").
    base_versions: ClassVar[tuple[str, ...]]
    base_version_prefix: ClassVar[str]
    # The `sample.scheduler` values its previews may use ("default": the model's own).
    sample_schedulers: ClassVar[tuple[str, ...]] = ("default",)
    # A demo model (`demo/`) whose folder leaves out parts it shares with another family's:
    # (that family, the pipeline folders it takes from it).
    demo_shares: ClassVar[tuple[str, tuple[str, ...]] | None] = None
    # The objective class `training_objective` returns, whose `own_keys` only its models use.
    objective_type: ClassVar[type[Objective]]
    # Whether the denoiser has kohya's block-wise layout (`kohya_blocks` answers rather than
    # refuses), and blocks to swap (`swappable_blocks` is not empty).
    block_wise: ClassVar[bool]
    swaps_blocks: ClassVar[bool]

    def __init__(self, pipe: DiffusionPipeline):
        self.pipe = pipe
        # Things the user should hear about this model and config, said once at start.
        self.notes: list[str] = []
        # This family's options as configured (`configure`), by dotted key.
        self.settings: dict[str, Any] = {}
        self.configure({})

    @classmethod
    def file_prefixes(cls) -> tuple[str, ...]:
        """The name prefixes of its adapter files' modules."""
        return (cls.denoiser_prefix, *(f"{prefix}_" for prefix in cls.text_encoder_attrs))

    @classmethod
    def unused_keys(cls) -> set[str]:
        """The shared config keys its models have no use for: the other objectives', and those
        acting on what its denoiser or text encoders lack. (Other families' parts and options:
        `registry.keys_not_taken`.)"""
        unused = {
            key
            for objective in (DDPMObjective, FlowMatchObjective)
            if objective is not cls.objective_type
            for key in objective.own_keys
        }
        lacks = {
            BLOCK_WISE_KEYS: not cls.block_wise,
            TEXT_ENCODER_ADAPTER_KEYS: not cls.text_encoder_attrs,
            BLOCK_SWAP_KEYS: not cls.swaps_blocks,
            SAMPLER_KEYS: len(cls.sample_schedulers) < 2,
        }
        return unused | {key for keys, lacking in lacks.items() if lacking for key in keys}

    @classmethod
    def folder(cls) -> Path:
        """The family's folder: its skeleton, presets and demo model live there."""
        return Path(inspect.getfile(cls)).resolve().parent

    # --- recognising and loading its models -----------------------------------------------

    @classmethod
    @abstractmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        """Whether a loaded pipeline is of this family."""

    @classmethod
    @abstractmethod
    def reads_single_file(cls, keys: list[str]) -> bool:
        """Whether a single file with these tensor names is this family's checkpoint."""

    @classmethod
    @abstractmethod
    def load_single_file(
        cls, path: Path, dtype: torch.dtype, config: str | None, parts: dict[str, Path | None]
    ) -> DiffusionPipeline:
        """Load the family's single file offline, with component configs from `config` (a
        diffusers folder) or the skeleton, and the separately kept files of `parts`."""

    @abstractmethod
    def single_file_state(self) -> dict[str, torch.Tensor]:
        """Every weight under its name in the family's single files (what `merge` writes)."""

    @classmethod
    def claims_names(cls, names: list[str]) -> bool:
        """Whether an adapter's module names (any layout) can only be this family's."""
        return False

    @classmethod
    @abstractmethod
    def build_tiny(cls, folder: Path) -> DiffusionPipeline:
        """A tiny random pipeline of this layout (its tokenizers written into `folder`)."""

    @classmethod
    @abstractmethod
    def on_meta_device(cls) -> ModelFamily:
        """The real architecture, from the bundled configs, on the meta device (no weights,
        no memory): what names adapters when no model is given, and what memory is counted on."""

    @classmethod
    def variant_on_meta_device(cls, model: str | None) -> ModelFamily:
        """The real architecture of the variant `model` names (a preset's hub id, an adapter's
        `ss_base_model_version`), for a family whose models come in several sizes; else
        `on_meta_device`."""
        return cls.on_meta_device()

    def configure(self, settings: dict[str, Any]) -> None:
        """Take this family's options (dotted key -> value; the loader has refused any other
        family's that is set); `apply_settings` acts on them."""
        self.settings = {o.key: settings.get(o.key, o.default) for o in self.options}
        self.apply_settings()

    @abstractmethod
    def apply_settings(self) -> None:
        """Check and act on `self.settings`."""

    # --- its parts --------------------------------------------------------------------------

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser, a UNet or a transformer (`denoiser_attr`); the trainer calls it so."""
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders that may take an adapter, keyed by their adapter prefix."""
        return {prefix: getattr(self.pipe, a) for prefix, a in self.text_encoder_attrs.items()}

    def prompt_encoders(self) -> list[torch.nn.Module]:
        """Every module encoding a prompt runs. They move together: to the device to encode,
        to the CPU after."""
        return [getattr(self.pipe, attr) for attr in self.prompt_encoder_attrs]

    def modules(self) -> list[torch.nn.Module]:
        """The denoiser, the VAE and the prompt encoders: what holds weights."""
        return [self.unet, self.vae, *self.prompt_encoders()]

    @property
    def text_device(self) -> torch.device:
        """Where prompts are encoded: the prompt encoders' device, which may not be the
        denoiser's (caching runs them on the GPU while the denoiser waits on the CPU)."""
        return next(self.prompt_encoders()[0].parameters()).device

    @property
    @abstractmethod
    def default_resolution(self) -> int:
        """The side the model was trained at."""

    @property
    def size_step(self) -> int:
        """What an image's sides must be a multiple of for the family's pipeline (previews
        are rounded down to it): the VAE's downscale (8), where the pipeline rounds the
        patches itself."""
        return 8

    # --- latents ----------------------------------------------------------------------------

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype the VAE runs in when the other weights are in `weight_dtype`."""
        return weight_dtype

    def cast_vae(self, weight_dtype: torch.dtype) -> None:
        """Put the VAE in `vae_dtype`; latents of another dtype are cast on their way in."""
        dtype = self.vae_dtype(weight_dtype)
        self.vae.to(dtype=dtype)
        if dtype == weight_dtype:
            return
        # The pipelines decode latents in the denoiser's dtype; the VAE's first layer takes them.
        first = getattr(self.vae, "post_quant_conv", None) or self.vae.decoder.conv_in
        first.register_forward_pre_hook(lambda _, args: tuple(a.to(dtype) for a in args))

    def vae_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] as the VAE's encoder takes them (a video VAE: with a frame axis)."""
        return pixels.to(self.vae.dtype)

    @abstractmethod
    def scale_latents(self, sample: torch.Tensor) -> torch.Tensor:
        """A sample of the VAE's posterior as the denoiser's training latents (scaled,
        shifted, normalised, patchified: whatever the family's pipeline does)."""

    def encode_images(self, pixels: torch.Tensor, generator: Generators) -> torch.Tensor:
        """Pixels in [-1, 1] to training latents, sampling the VAE posterior with `generator`."""
        sample = self.vae.encode(self.vae_input(pixels)).latent_dist.sample(generator)
        return self.scale_latents(sample)

    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] to the VAE posterior's (mean, std), unscaled: what a cache keeps."""
        posterior = self.vae.encode(self.vae_input(pixels)).latent_dist
        return posterior.mean, posterior.std

    def sample_latents(
        self, mean: torch.Tensor, std: torch.Tensor, generator: Generators
    ) -> torch.Tensor:
        """Training latents from a cached posterior; the same draw `encode_images` makes."""
        noise = randn_tensor(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return self.scale_latents(mean + std * noise)

    # --- conditioning, the denoiser and its objective ---------------------------------------

    @abstractmethod
    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions to the denoiser's text conditioning (tensors with a batch axis)."""

    def join_prompts(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Captions encoded one by one (the text cache), as one batch: a sequence shorter
        than the longest is padded with zeros (its mask, with False, says where)."""
        joined = {}
        for key in rows[0]:
            values = [row[key] for row in rows]
            longest = max(value.shape[1] if value.dim() > 1 else 0 for value in values)
            values = [pad_sequence_axis(value, longest) for value in values]
            joined[key] = torch.cat(values)
        return joined

    @abstractmethod
    def training_objective(self) -> Objective:
        """What the denoiser is trained on (families/objective.py)."""

    @abstractmethod
    def denoise(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
        batch: dict[str, Any],
    ) -> torch.Tensor:
        """The denoiser's prediction for `noisy` latents at the objective's `timesteps`, in
        the objective's terms (what its `target` compares with)."""

    @abstractmethod
    def pipeline_text_kwargs(
        self, prompt: str, negative: str, size: tuple[int, int]
    ) -> dict[str, Any]:
        """The text arguments of a pipeline call that conditions as training does, for an
        image of `size` (width, height)."""

    def pipeline_guidance_kwargs(self, scale: float) -> dict[str, Any]:
        """The pipeline argument `sample.guidance_scale` sets (diffusers calls it so)."""
        return {"guidance_scale": scale}

    # --- adapters: where they go, and what their files call them ----------------------------

    @abstractmethod
    def denoiser_targets(self, cfg: AdapterConfig) -> Targets:
        """The denoiser's modules `cfg.unet_targets` (and the family's block options) adapt."""

    @abstractmethod
    def text_encoder_targets(self, preset: str) -> Targets:
        """The text encoders' modules a preset adapts; a UserError where they take none."""

    @abstractmethod
    def file_module(self, prefix: str, module_path: str) -> tuple[str, tuple[str, ...]]:
        """The module's name in the family's adapter files (`prefix`: its component's key in
        `text_encoder_attrs`, or DENOISER), and the paths of every module fused into that
        one in output order (just `module_path` where nothing is fused). A ValueError for a
        module the layout has no name for."""

    @abstractmethod
    def metadata(self) -> dict[str, str]:
        """Family-specific `ss_*` keys of an exported adapter."""

    @property
    @abstractmethod
    def base_version(self) -> str:
        """The `ss_base_model_version` of this model's adapters."""

    @property
    @abstractmethod
    def modelspec_architecture(self) -> str:
        """The SAI model-spec architecture id (`modelspec.architecture`, "/lora" appended)."""

    @abstractmethod
    def swappable_blocks(self) -> list[torch.nn.Module]:
        """The denoiser's blocks in the order they run, for block swapping (none: [])."""

    @abstractmethod
    def kohya_blocks(self) -> tuple[int, int, int, bool]:
        """kohya's block-wise layout (adapters/blocks.py): blocks on the down path, in the
        middle, on the up path, and whether a block at each end adds to them; a UserError
        for a denoiser that has none."""

    @abstractmethod
    def kohya_block_index(self, name: str) -> int:
        """The block of a module by its file name (-1: none, trained at the full rate)."""

    # --- what memory is counted on (benchmarks/preset_memory.py) ----------------------------

    @abstractmethod
    def example_inputs(
        self, batch: int, side: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """Latents, text conditioning and batch of the shapes a training step gives `denoise`
        for `batch` images of `side` pixels (zeros; on `device`, the meta device for a count)."""

    @abstractmethod
    def example_prompt_pass(self, device: torch.device) -> None:
        """Run every prompt encoder on one caption of the length training encodes (token ids
        of zeros): what filling the text cache holds on the device."""


def pad_sequence_axis(value: torch.Tensor, length: int) -> torch.Tensor:
    """`value` (batch, sequence, ...) padded with zeros along the sequence to `length`."""
    if value.dim() < 2 or value.shape[1] == length:
        return value
    pad = value.new_zeros(value.shape[0], length - value.shape[1], *value.shape[2:])
    return torch.cat([value, pad], dim=1)


def padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of different lengths (each (length, width)) as one zero-padded batch, and
    the mask of their real positions."""
    longest = max(row.shape[0] for row in rows)
    batch = torch.stack([pad_sequence_axis(row[None], longest)[0] for row in rows])
    mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=batch.device)
    for index, row in enumerate(rows):
        mask[index, : row.shape[0]] = True
    return batch, mask


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a module computes in: its first floating-point weight's (a quantized layer's
    packed weight is uint8)."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def no_text_encoder_adapters(family: ModelFamily) -> UserError:
    """The refusal of a family whose text encoders take no adapter."""
    return UserError(
        f"adapter.text_encoder: a {family.title} model's text encoder takes no adapter here "
        "(the UIs and diffusers load its adapters into the transformer only); set it to false"
    )


def no_block_wise(family: ModelFamily, choose: str = "") -> UserError:
    """The refusal of block-wise options by a denoiser without kohya's UNet blocks."""
    return UserError(
        "block-wise rates and dims (down_lr_weight, block_dims, ...) are for UNets; a "
        f"{family.title} transformer has no such blocks" + (f": {choose}" if choose else "")
    )


def autoencoder_kl_latents(vae: torch.nn.Module, sample: torch.Tensor) -> torch.Tensor:
    """diffusers' AutoencoderKL convention (SD, SDXL, Flux.1, Z-Image): shift, then scale."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (sample - shift) * vae.config.scaling_factor
