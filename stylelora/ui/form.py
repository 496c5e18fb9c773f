"""The config form: every key of the config models, grouped as the README's config table, and
the checks the CLI makes, reported per key.

The form's state is a flat map of the keys a user set (`"train.learning_rate": "2e-4"`), the
same as `--set` overrides: values are TOML (a number, `true`, `[1, 2]`), or plain text for keys
that hold text or paths. Unset keys take the preset's or the model's default, shown beside them.
"""

from __future__ import annotations

import copy
import datetime
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ValidationError

from stylelora.config import (
    _PATH_KEYS,
    Config,
    _layer_preset,
    _parse_value,
    preset_names,
    tomllib,
    validation_problem,
)
from stylelora.errors import UserError
from stylelora.families.loading import families_of
from stylelora.families.registry import keys_not_taken
from stylelora.ui.roots import Roots


def keys(section: str, *names: str) -> list[str]:
    return [f"{section}.{name}" for name in names]


# Groups as in the README's config table: these keys by name, the rest by their section.
SPECIAL_GROUPS = {
    "[data] captions": keys(
        "data", "shuffle_caption", "keep_tokens", "caption_dropout_rate", "caption_tag_dropout_rate"
    ),
    "[data] buckets": keys(
        "data", "enable_buckets", "bucket_step", "min_bucket_side", "max_bucket_side",
        "bucket_no_upscale",
    ),
    "[data] caches": keys(
        "data", "cache_latents", "cache_text_encoder_outputs", "cache_dir", "memory_cache_mb"
    ),
    "[train] quality": keys(
        "train", "min_snr_gamma", "noise_offset", "multires_noise_iterations",
        "multires_noise_discount", "min_timestep", "max_timestep", "loss_type", "huber_c",
        "ema_decay", "ema_export", "loraplus_lr_ratio",
    ),
    "masked loss": [*keys("train", "masked_loss", "unmasked_weight"),
                    *keys("data", "mask_dir", "alpha_mask")],
    "regularisation": [
        "data.reg_dir",
        *keys("train", "prior_loss_weight", "prior_preservation", "prior_preservation_weight",
              "prior_preservation_class"),
    ],
    "block-wise (UNets)": [
        *keys("train", "down_lr_weight", "mid_lr_weight", "up_lr_weight",
              "block_lr_zero_threshold"),
        *keys("adapter", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"),
    ],
    "[train] flow matching": keys(
        "train", "timestep_sampling", "logit_mean", "logit_std", "discrete_flow_shift",
        "flow_weighting",
    ),
    "[train] safety": keys(
        "train", "checkpoint_every_n_steps", "checkpoints_keep", "max_nonfinite_steps", "log_with"
    ),
}  # fmt: skip
SECTION_GROUPS = {
    "": "top level",
    "data": "[data]",
    "adapter": "[adapter]",
    "train": "[train]",
    "sample": "[sample]",
    "validation": "[validation]",
}
# the rows of the README's config table, in its order
GROUP_ORDER = [
    "top level",
    "[data]",
    "[data] captions",
    "[data] buckets",
    "[data] caches",
    "[adapter]",
    "[train]",
    "[train] quality",
    "masked loss",
    "regularisation",
    "block-wise (UNets)",
    "[train] flow matching",
    "[train] safety",
    "[sample]",
    "[validation]",
]
PATH_KEYS = {".".join(keys) for keys in _PATH_KEYS}
# What a first run needs, in the order the page asks for it, each with a name in words; the
# rest of the keys wait under "All settings".
ESSENTIALS = {
    "name": "Name",
    "model": "Base model",
    "preset": "Preset",
    "data.dir": "Images folder",
    "data.trigger_word": "Trigger word",
    "data.resolution": "Resolution",
    "train.max_steps": "Steps",
    "train.learning_rate": "Learning rate",
    "adapter.rank": "Rank",
    "sample.prompts_file": "Sample prompts file",
    "output_dir": "Output folder",
}


@dataclass(frozen=True)
class FormField:
    key: str  # dotted, as --set takes it
    group: str
    kind: Literal["text", "number", "choice", "value"]  # value: any TOML value (lists, tables)
    choices: list[str]
    default: str  # shown when unset; "" for required keys
    required: bool
    help: str  # the config model's description of the key
    label: str  # the key in words where it is one of the essentials, else the key
    essential: bool


def form_fields() -> list[FormField]:
    """Every key of the config, in the README's groups."""
    fields = list(section_fields(Config, ""))
    order = {group: index for index, group in enumerate(GROUP_ORDER)}
    return sorted(fields, key=lambda field: order[field.group])


def section_fields(model: type[BaseModel], prefix: str):
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from section_fields(info.annotation, f"{key}.")
            continue
        kind, choices = field_kind(info.annotation)
        if key in PATH_KEYS:
            kind = "text"
        default = (
            "" if info.is_required() else value_text(info.get_default(call_default_factory=True))
        )
        yield FormField(
            key=key,
            group=group_of(key),
            kind=kind,
            choices=choices,
            default=default,
            required=info.is_required(),
            help=info.description or "",
            label=ESSENTIALS.get(key, key),
            essential=key in ESSENTIALS,
        )


def group_of(key: str) -> str:
    for group, keys in SPECIAL_GROUPS.items():
        if key in keys:
            return group
    section = key.split(".")[0] if "." in key else ""
    return SECTION_GROUPS[section]


def field_kind(annotation: Any) -> tuple[str, list[str]]:
    """How a key is edited: a choice among literals (and true/false), a number, text, or a
    TOML value for anything else."""
    options = [arg for arg in flatten(annotation) if arg is not type(None)]
    literals = [arg for arg in options if not isinstance(arg, type)]
    types_ = [arg for arg in options if isinstance(arg, type)]
    if (literals or bool in types_) and set(types_) <= {bool}:
        choices = literals + ([True, False] if bool in types_ else [])
        return "choice", [value_text(value) for value in choices]
    if types_ and all(t in (int, float) for t in types_):
        return "number", []
    if types_ in ([str], [Path]):
        return "text", []
    return "value", []


def flatten(annotation: Any) -> list[Any]:
    """The plain types and literal values an annotation allows."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return flatten(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [item for arg in typing.get_args(annotation) for item in flatten(arg)]
    if origin is Literal:
        return list(typing.get_args(annotation))
    if origin is not None:
        return [origin]  # list[int], dict[...], tuple[...]
    return [annotation]


def value_text(value: Any) -> str:
    """A value as the form shows it: text as it is, anything else as TOML."""
    if value is None:
        return ""
    if isinstance(value, (str, Path)):
        return str(value)
    return inline_toml(value)


def inline_toml(value: Any) -> str:
    """One TOML value on one line (tomli-w writes arrays and tables over several lines, which
    a form field cannot hold)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (datetime.date, datetime.time)):  # a TOML date: the setting refuses it
        return value.isoformat()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(str(k))} = {inline_toml(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    return "[" + ", ".join(inline_toml(item) for item in value) + "]"


FIELDS = {field.key: field for field in form_fields()}


# --- the form's state: a flat map of the keys set, and its TOML --------------------------------


def settings_to_raw(settings: dict[str, str]) -> dict[str, Any]:
    """The nested table the settings stand for, as a config file would hold it."""
    raw: dict[str, Any] = {}
    for key, text in settings.items():
        field = FIELDS.get(key)
        value = text if field is not None and field.kind == "text" else _parse_value(text)
        *parents, leaf = key.split(".")
        target = raw
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise UserError(f"{key}: {part} is a setting, not a section")
        target[leaf] = value
    return raw


def raw_to_settings(raw: dict[str, Any], prefix: str = "") -> dict[str, str]:
    settings = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and key not in FIELDS:
            settings.update(raw_to_settings(value, f"{key}."))
        else:
            settings[key] = value_text(value)
    return settings


def settings_from_toml(text: str) -> dict[str, str]:
    try:
        return raw_to_settings(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"not valid TOML: {exc}") from None


def toml_of(raw: dict[str, Any]) -> str:
    return tomli_w.dumps(raw)


@dataclass
class Checked:
    raw: dict[str, Any]  # relative paths resolved against the first root, as the run's file
    config: Config | None
    problems: dict[str, str]  # key ("config" for the whole) -> what is wrong
    preset: dict[str, str] = field(default_factory=dict)  # the preset's settings, as the form's
    not_taken: list[str] = field(default_factory=list)  # keys the model's family has no use for


def check_settings(settings: dict[str, str], roots: Roots) -> Checked:
    """What `stylelora train` would say of these settings, every problem with its key; and
    every path, the preset's included, resolved inside the roots (relative to the first)."""
    try:
        raw = settings_to_raw(settings)
    except UserError as exc:
        key = str(exc).split(":", 1)[0]
        return Checked({}, None, {key: str(exc).removeprefix(f"{key}: ")})
    problems = confine(raw, roots, roots.home)
    checked = Checked(raw, None, problems)
    if "preset" in problems:
        return checked
    try:
        checked.preset = preset_settings(raw.get("preset"), roots.home)
        layered = _layer_preset(copy.deepcopy(raw), roots.home)
        for key, problem in confine(layered, roots, roots.home).items():
            problems.setdefault(key, f"from the preset: {problem}")
        if "model" not in problems and isinstance(layered.get("model"), str):
            checked.not_taken = sorted(keys_not_taken(families_of(layered["model"])))
        checked.config = Config.model_validate(layered)
    except UserError as exc:
        problems.setdefault("preset", str(exc).removeprefix("preset: "))
    except ValidationError as exc:
        for error in exc.errors():
            key, message = validation_problem(error)
            problems.setdefault(key, message)
    if problems:
        checked.config = None
    return checked


def preset_settings(preset: Any, base: Path) -> dict[str, str]:
    """The settings a preset lends a config (not its run's name, folder or images), as the
    form holds them; {} without a preset."""
    if not isinstance(preset, str):
        return {}
    return raw_to_settings(_layer_preset({"preset": preset}, base)) | {"preset": preset}


def confine(raw: dict[str, Any], roots: Roots, base: Path) -> dict[str, str]:
    """Every path a config names (the preset file, the data and output folders, the prompts
    file, the model and its parts) resolved in place, relative to `base` (the folder the run's
    process reads it from), symlinks followed; the ones outside the roots as problems."""
    problems = {}
    for key in ("preset", *PATH_KEYS, "model"):
        value = lookup(raw, key)
        if not isinstance(value, str):
            continue
        if key == "preset" and (value in preset_names() or not value.endswith(".toml")):
            continue  # a preset by name: the package's own file
        try:
            if key == "model":
                resolved = roots.model(value, base)
            else:
                resolved = str(roots.resolve(value, base))
        except UserError as exc:
            problems[key] = str(exc)
            continue
        *parents, leaf = key.split(".")
        lookup_section(raw, parents)[leaf] = resolved
    return problems


def lookup_section(raw: dict[str, Any], parents: list[str]) -> dict[str, Any]:
    for part in parents:
        raw = raw[part]
    return raw


def lookup(raw: dict[str, Any], key: str) -> Any:
    value: Any = raw
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def form_description() -> dict[str, Any]:
    """What the page builds the form from."""
    return {
        "groups": GROUP_ORDER,
        "essentials": list(ESSENTIALS),
        "fields": [asdict(field) for field in FIELDS.values()],
        "presets": preset_names(),
    }
