"""LyCORIS LoHa and LoKr: PEFT's layers, our file, and the UIs' own formulas give one weight.

`automatic1111_delta` and `comfyui_delta` transcribe the UIs' application code
(AUTOMATIC1111: extensions-builtin/Lora/network_hada.py, network_lokr.py, lyco_helpers.py and
NetworkModule.finalize_updown in network.py; ComfyUI: comfy/weight_adapter/loha.py and lokr.py,
`calculate_weight`); diffusers does not read these files, so they stand in for loading.
"""

from __future__ import annotations

import json

import pytest
import torch
from lora_helpers import fresh_pipe, max_diff, rendered
from peft.tuners.lycoris_utils import LycorisLayer
from safetensors import safe_open

from stylelora.adapters.inject import inject_adapters
from stylelora.adapters.state import read_adapter
from stylelora.config import AdapterConfig
from stylelora.errors import UserError
from stylelora.export.apply import add_into_weights
from stylelora.export.lora_file import save_lora_file
from stylelora.export.names import family_targets
from stylelora.export.tools import run_combine, run_export, run_inspect, run_merge, run_resize
from stylelora.families import detect_family, load_family
from stylelora.families.tiny import tiny_model_path

# (type, rank, extra options): a LoKr of full matrices at rank 4 on the tiny models' widths
# (w2's side is at most 8), of rank products at rank 2, and with w1 a product too.
VARIANTS = {
    "loha": ("loha", 4, {}),
    "lokr-full": ("lokr", 4, {}),
    "lokr-product": ("lokr", 2, {}),
    "lokr-both": ("lokr", 1, {"decompose_both": True, "lokr_factor": 4}),
}
CASES = [(tiny, v) for tiny in ("sd15", "sd2", "sdxl") for v in ("loha", "lokr-product")]
CASES += [("sd15", "lokr-full"), ("sdxl", "lokr-both")]


def lycoris_family(tiny: str, variant: str, seed: int = 0):
    kind, rank, extra = VARIANTS[variant]
    family = load_family(str(tiny_model_path(tiny)))
    torch.manual_seed(seed)
    cfg = AdapterConfig(type=kind, rank=rank, alpha=3.0, unet_targets="full", conv_rank=2,
                        conv_alpha=1.0, text_encoder=True, **extra)  # fmt: skip
    adapted = inject_adapters(family, cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained adapters: no factor left at its zero initialisation
        for module in adapted.values():
            for param in module.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.4)
    return family, adapted


def make_weight_cp(t, wa, wb):  # AUTOMATIC1111's lyco_helpers
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def rebuild_conventional(up, down, shape):  # AUTOMATIC1111's lyco_helpers
    return (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape)


def automatic1111_delta(w: dict[str, torch.Tensor], orig_shape) -> torch.Tensor:
    """NetworkModuleHada / NetworkModuleLokr.calc_updown, then finalize_updown (multiplier 1)."""
    alpha = w["alpha"].item() if "alpha" in w else None
    dim = None
    if "hada_w1_a" in w:
        w1a, w1b, w2a, w2b = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
        dim = w1b.shape[0]
        output_shape = [w1a.size(0), w1b.size(1)]
        if "hada_t1" in w:
            output_shape = [w1a.size(1), w1b.size(1)]
            updown1 = make_weight_cp(w["hada_t1"], w1a, w1b)
            output_shape += w["hada_t1"].shape[2:]
        else:
            if len(w1b.shape) == 4:
                output_shape += w1b.shape[2:]
            updown1 = rebuild_conventional(w1a, w1b, output_shape)
        if "hada_t2" in w:
            updown2 = make_weight_cp(w["hada_t2"], w2a, w2b)
        else:
            updown2 = rebuild_conventional(w2a, w2b, output_shape)
        updown = updown1 * updown2
    else:
        if "lokr_w1_b" in w:
            dim = w["lokr_w1_b"].shape[0]
        if "lokr_w2_b" in w:
            dim = w["lokr_w2_b"].shape[0]
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
        elif "lokr_t2" not in w:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
        else:
            w2 = make_weight_cp(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
        output_shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if len(orig_shape) == 4:
            output_shape = orig_shape
        if len(w2.shape) == 4:  # make_kron
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous()).reshape(output_shape)
    if len(output_shape) == 4:
        updown = updown.reshape(output_shape)
    if torch.Size(orig_shape).numel() == updown.numel():
        updown = updown.reshape(orig_shape)
    scale = alpha / dim if dim is not None and alpha is not None else 1.0
    return updown * scale


def comfyui_delta(w: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """LoHaAdapter / LoKrAdapter.calculate_weight's addition at strength 1."""
    alpha = w["alpha"].item() if "alpha" in w else None
    if "hada_w1_a" in w:
        scale = alpha / w["hada_w1_b"].shape[0] if alpha is not None else 1.0
        m1 = torch.mm(w["hada_w1_a"], w["hada_w1_b"])
        m2 = torch.mm(w["hada_w2_a"], w["hada_w2_b"])
        return scale * (m1 * m2).reshape(shape)
    dim = None
    if "lokr_w1" in w:
        w1 = w["lokr_w1"]
    else:
        dim = w["lokr_w1_b"].shape[0]
        w1 = torch.mm(w["lokr_w1_a"], w["lokr_w1_b"])
    if "lokr_w2" in w:
        w2 = w["lokr_w2"]
    else:
        dim = w["lokr_w2_b"].shape[0]
        w2 = torch.mm(w["lokr_w2_a"], w["lokr_w2_b"])
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return scale * torch.kron(w1, w2).reshape(shape)


def file_modules(path) -> dict[str, dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as handle:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key in handle.keys():  # noqa: SIM118
            name, _, part = key.partition(".")
            grouped.setdefault(name, {})[part] = handle.get_tensor(key)
        return grouped


@pytest.mark.parametrize(("tiny", "variant"), CASES)
def test_the_uis_formulas_apply_the_weights_peft_trained(tmp_path, tiny, variant):
    family, adapted = lycoris_family(tiny, variant)
    path = save_lora_file(tmp_path / "a.safetensors", family, adapted, {})
    targets = family_targets(detect_family(fresh_pipe(tiny)))  # kohya name -> module path
    modules = file_modules(path)
    layers = [m for c in adapted.values() for m in c.modules() if isinstance(m, LycorisLayer)]
    assert len(modules) == len(layers)
    kind = VARIANTS[variant][0]
    prefix = "hada_" if kind == "loha" else "lokr_"
    assert all(any(p.startswith(prefix) for p in parts) for parts in modules.values())
    worst, convs = 0.0, 0
    for name, parts in modules.items():
        target = targets[name]
        layer = getattr(family.pipe, target.component).get_submodule(target.path)
        ours = layer.get_delta_weight("default")
        shape = layer.get_base_layer().weight.shape
        convs += len(shape) == 4 and shape[-1] == 3
        for ui in (automatic1111_delta, comfyui_delta):
            worst = max(worst, (ui(parts, shape) - ours).abs().max().item())
        assert ours.abs().max() > 1e-3  # a module that adds something
    assert worst < 1e-5
    assert convs > 0  # LoCon-style 3x3 convolutions, as LyCORIS does them
    if variant == "lokr-full":  # no rank product: the UIs scale by 1; alpha / r is in lokr_w1
        full = [n for n, parts in modules.items() if {"lokr_w1", "lokr_w2", "alpha"} == set(parts)]
        assert full
        for name in full:  # trained at scale 1, as LyCORIS does, so nothing is folded
            target = targets[name]
            layer = getattr(family.pipe, target.component).get_submodule(target.path)
            assert torch.equal(modules[name]["lokr_w1"], layer.lokr_w1["default"].float())
    if variant == "lokr-both":
        assert any("lokr_w1_a" in parts for parts in modules.values())


@pytest.mark.parametrize(("tiny", "variant"), [("sd15", "loha"), ("sdxl", "lokr-product")])
def test_sample_and_merge_render_what_the_adapted_model_renders(tmp_path, tiny, variant):
    family, adapted = lycoris_family(tiny, variant)
    ours = rendered(family.pipe)
    path = save_lora_file(tmp_path / "a.safetensors", family, adapted, {})
    adapter = read_adapter(path)
    assert adapter.algo == VARIANTS[variant][0]

    fresh = fresh_pipe(tiny)
    base = rendered(fresh)
    add_into_weights(detect_family(fresh), adapter, 1.0, str(path))  # what `sample` does
    assert max_diff(ours, rendered(fresh)) < 1e-4
    assert max_diff(ours, base) > 1e-2

    out = tmp_path / "merged"
    run_merge(str(tiny_model_path(tiny)), [f"{path}:1.0"], out, "fp32")
    merged = fresh_pipe(tiny).from_pretrained(out)
    merged.set_progress_bar_config(disable=True)
    assert max_diff(ours, rendered(merged)) < 1e-4


def test_tools_take_or_refuse_lycoris_files_in_one_line(tmp_path):
    family, adapted = lycoris_family("sd15", "lokr-product")
    metadata = {"ss_network_module": "lycoris.kohya"}
    path = save_lora_file(tmp_path / "k.safetensors", family, adapted, metadata)
    report = "\n".join(run_inspect(path))
    assert "(LyCORIS lokr)" in report and "3x3 conv (LoCon)" in report
    assert "ranks: 2 (" in report
    for call in (
        lambda: run_resize(path, 1, None, tmp_path / "r.safetensors"),
        lambda: run_combine([str(path)], tmp_path / "c.safetensors", None),
        lambda: run_export(path, "diffusers", tmp_path / "d.safetensors", None),
    ):
        with pytest.raises(UserError, match="lokr") as caught:
            call()
        assert "\n" not in str(caught.value)
    assert not list(tmp_path.glob("[rcd].safetensors"))
    copied = run_export(path, "kohya", tmp_path / "copy.safetensors", None)
    assert "kohya -> kohya" in copied
    assert read_adapter(tmp_path / "copy.safetensors").algo == "lokr"


def test_a_damaged_lycoris_module_is_named(tmp_path):
    from safetensors.torch import save_file

    name = "lora_unet_mid_block_attentions_0_proj_in"
    save_file({f"{name}.hada_w1_a": torch.ones(8, 2), f"{name}.hada_w1_b": torch.ones(2, 8),
               f"{name}.hada_w2_a": torch.ones(8, 2)}, tmp_path / "bad.safetensors")  # fmt: skip
    with pytest.raises(UserError, match=f"{name}: hada_w2_b missing"):
        read_adapter(tmp_path / "bad.safetensors")


def test_tucker_factors_from_other_trainers_follow_automatic1111():
    from stylelora.adapters.lycoris import LycorisModule

    g = torch.Generator().manual_seed(0)
    parts = {
        "hada_w1_a": torch.randn(3, 6, generator=g),
        "hada_w1_b": torch.randn(3, 4, generator=g),
        "hada_t1": torch.randn(3, 3, 3, 3, generator=g),
        "hada_w2_a": torch.randn(3, 6, generator=g),
        "hada_w2_b": torch.randn(3, 4, generator=g),
        "hada_t2": torch.randn(3, 3, 3, 3, generator=g),
    }
    shape = (6, 4, 3, 3)
    expected = automatic1111_delta({**parts, "alpha": torch.tensor(1.5)}, shape)
    assert (LycorisModule("loha", parts, 1.5).delta(shape) - expected).abs().max() < 1e-5


def test_a_run_trains_loha_and_records_lycoris_metadata(tiny_sd15_dir, demo_subset, tmp_path):
    from conftest import training_config

    from stylelora.train.trainer import train

    cfg = training_config(tmp_path, tiny_sd15_dir, demo_subset(2), "train.max_steps=2",
                          "adapter.type='lokr'", "adapter.rank=2", "adapter.lokr_factor=4",
                          "train.learning_rate=1e-2")  # fmt: skip
    result = train(cfg)
    modules = file_modules(result.adapter_path)
    assert modules and all("lokr_w1" in parts for parts in modules.values())
    # LyCORIS's initialisation leaves w2 zero; trained, it is not.
    assert any(parts["lokr_w2_b"].abs().max() > 0 for parts in modules.values())
    with safe_open(result.adapter_path, "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == "lokr"
    assert json.loads(meta["ss_network_args"])["factor"] == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"adapter": {"type": "loha", "use_dora": True}}, "adapter.use_dora is LoRA's"),
        ({"adapter": {"lokr_factor": 8}}, "adapter.lokr_factor and adapter.decompose_both"),
        ({"adapter": {"type": "lokr", "lokr_factor": 0}}, "adapter.lokr_factor must be -1"),
        ({"adapter": {"type": "loha"}, "train": {"loraplus_lr_ratio": 16}}, "loraplus_lr_ratio"),
        ({"adapter": {"type": "lokr"}, "train": {"quantize_base": "nf4"}}, "quantize_base"),
    ],
)
def test_options_lycoris_does_not_take_are_refused_in_one_line(tmp_path, overrides, message):
    import tomli_w

    from stylelora.config import load_config

    raw = {"name": "x", "model": "tiny:sd15", "data": {"dir": str(tmp_path)}, **overrides}
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(raw))
    with pytest.raises(UserError, match=message) as caught:
        load_config(path)
    assert "\n" not in str(caught.value)
