"""inspect describes a file and names what is broken; bad input is one line and exit status 2;
module dropout drops whole modules in training only."""

from __future__ import annotations

import pytest
import torch
from conftest import run_main
from lora_helpers import adapted_family
from safetensors.torch import load_file, save_file

from stylelora.export.lora_file import save_lora_file
from stylelora.families.tiny import tiny_model_path


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    family, adapted = adapted_family(
        "sd15", rank=4, alpha=2.0, unet_targets="full", conv_rank=2, text_encoder=True
    )
    folder = tmp_path_factory.mktemp("inspect")
    return save_lora_file(folder / "good.safetensors", family, adapted, {"ss_output_name": "good"})


def test_inspect_describes_the_file(capsys, good_file):
    code, out, _ = run_main(capsys, "inspect", good_file)
    assert code == 0
    assert "format: kohya" in out and "family: sd15" in out
    assert "ranks: 2 (" in out and "4 (" in out
    assert "3x3 conv (LoCon)" in out and "cross-attention" in out and "feed-forward" in out
    assert "lora_te: " in out and "ss_output_name: good" in out and "MiB" in out


def test_inspect_names_a_truncated_file(tmp_path, capsys, good_file):
    data = good_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 3000])
    code, _, err = run_main(capsys, "inspect", cut)
    assert code == 2
    assert err.count("\n") == 1 and "truncated" in err and ".lora_" in err and str(cut) in err


def test_inspect_names_a_mismatched_pair(tmp_path, capsys, good_file):
    tensors = load_file(good_file)
    name = sorted(k for k in tensors if k.endswith("attn2_to_k.lora_up.weight"))[0]
    tensors[name] = torch.zeros(tensors[name].shape[0], 3)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, broken)
    code, _, err = run_main(capsys, "inspect", broken)
    assert code == 2
    assert name.removesuffix(".lora_up.weight") in err and "mismatched up/down pair" in err
    # The other tools refuse it with the same diagnosis.
    code, _, err = run_main(
        capsys, "resize", broken, "--rank", "2", "--out", tmp_path / "r.safetensors"
    )
    assert code == 2 and "mismatched" in err and not (tmp_path / "r.safetensors").exists()


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, good_file):
    tiny = tiny_model_path("sdxl")
    out = tmp_path / "m"
    cases = [
        (["inspect", tmp_path / "missing.safetensors"], "not found"),
        (["combine", f"{good_file}:strong", "--out", tmp_path / "c.safetensors"], "not a number"),
        (["merge", "--model", tiny, "--adapter", f"{good_file}:0.5", "--out", out], "sd_v1"),
        (["resize", good_file, "--energy", "1.5", "--out", tmp_path / "x.safetensors"], "energy"),
    ]
    for args, words in cases:
        code, _, err = run_main(capsys, *args)
        assert code == 2, args
        assert err.count("\n") == 1 and words in err, err
    assert not out.exists()


def test_module_dropout_drops_whole_modules_in_training_only():
    family, adapted = adapted_family("sd15", rank=4, module_dropout=0.5, dropout=0.25)
    from peft.tuners.lora import LoraLayer

    layer = next(m for m in family.unet.modules() if isinstance(m, LoraLayer))
    assert layer.lora_dropout["default"].p == 0.25  # PEFT's lora_dropout
    x = torch.randn(4, layer.in_features)
    with torch.no_grad():
        base = layer.get_base_layer()(x)
        layer.eval()
        full = layer(x)
        assert all(torch.equal(layer(x), full) for _ in range(10))  # eval: never dropped
        layer.train()
        dropped = [torch.equal(layer(x), base) for _ in range(200)]
    assert 60 < sum(dropped) < 140  # p = 0.5
    assert not layer._disable_adapters  # switched back on after every call
