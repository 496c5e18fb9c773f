"""sample and the tools agree on the PEFT layout `export --format peft` writes; sample refuses an
adapter holding NaN (it would render a black image). All through the real CLI."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_helpers import adapted_family
from PIL import Image
from safetensors.torch import load_file, save_file

from stylelora.cli import main
from stylelora.export.lora_file import save_lora_file
from stylelora.families.tiny import tiny_model_path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A kohya file (alpha != rank, LoCon convs) and the PEFT folder export writes from it."""
    folder = tmp_path_factory.mktemp("sample-files")
    family, adapted = adapted_family("sd15", rank=4, alpha=2.0, unet_targets="full", conv_rank=2)
    kohya = save_lora_file(folder / "style.safetensors", family, adapted, {"ss_output_name": "s"})
    peft = folder / "peft"
    tiny = str(tiny_model_path("sd15"))
    args = ["export", str(kohya), "--model", tiny, "--format", "peft", "--out", str(peft)]
    assert main(args) == 0
    return {"kohya": kohya, "peft": peft, "peft_file": peft / "unet" / "adapter_model.safetensors"}


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sample(capsys, out: Path, adapter: Path | None = None) -> tuple[int, str]:
    args = ["sample", "--model", tiny_model_path("sd15"), "--prompt", "zqxstyle, a fish"]
    args += ["--steps", "3", "--width", "64", "--height", "64", "--seed", "3", "--out", out]
    code, _, err = run(capsys, *args, *(["--adapter", adapter] if adapter else []))
    return code, err


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=int)


def same_tensors(a: Path, b: Path) -> bool:
    first, second = load_file(a), load_file(b)
    return set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_export_converts_the_peft_folder_and_file_it_writes_back_to_kohya(files, tmp_path, capsys):
    tiny = tiny_model_path("sd15")
    for source in (files["peft"], files["peft_file"], files["peft_file"].parent):
        back = tmp_path / f"{source.name}-back.safetensors"
        code, out, err = run(
            capsys, "export", source, "--model", tiny, "--format", "kohya", "--out", back
        )
        assert code == 0, err
        assert "(peft -> kohya" in out
        assert same_tensors(files["kohya"], back)


@pytest.mark.parametrize("given", ["peft", "peft_file"])
def test_inspect_advises_a_command_that_works(files, capsys, given):
    code, out, _ = run(capsys, "inspect", files[given])
    assert code == 0 and "format: peft" in out
    command = out.split("convert with: ", 1)[1].strip()
    words = shlex.split(command)
    assert words[0] == "stylelora"
    code, out, err = run(capsys, *words[1:])
    assert code == 0, err
    assert same_tensors(files["kohya"], Path(words[words.index("--out") + 1]))


def test_sample_renders_a_peft_folder_and_file_as_the_kohya_file(files, tmp_path, capsys):
    assert sample(capsys, tmp_path / "kohya.png", files["kohya"]) == (0, "")
    assert sample(capsys, tmp_path / "base.png")[0] == 0
    assert np.abs(pixels(tmp_path / "kohya.png") - pixels(tmp_path / "base.png")).max() > 8
    for given in ("peft", "peft_file"):
        code, err = sample(capsys, tmp_path / f"{given}.png", files[given])
        assert code == 0, err
        assert np.abs(pixels(tmp_path / f"{given}.png") - pixels(tmp_path / "kohya.png")).max() <= 1


def test_merge_names_the_export_command_that_converts_a_peft_file(files, tmp_path, capsys):
    tiny = tiny_model_path("sd15")
    merged = tmp_path / "m.safetensors"
    code, _, err = run(
        capsys, "merge", "--model", tiny, "--adapter", files["peft_file"], "--out", merged
    )
    assert code == 2 and err.count("\n") == 1 and not merged.exists()
    command = err.split("convert it with: ", 1)[1].strip()
    assert run(capsys, *shlex.split(command)[1:])[0] == 0


def with_nan(source: Path, path: Path, key_part: str) -> tuple[Path, str]:
    tensors = load_file(source)
    key = sorted(k for k in tensors if key_part in k)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, path)
    return path, key


def test_sample_refuses_an_adapter_holding_nan(files, tmp_path, capsys):
    cases = [with_nan(files["kohya"], tmp_path / "nan.safetensors", "attn2_to_k.lora_up")]
    diffusers = tmp_path / "diffusers.safetensors"
    tiny = tiny_model_path("sd15")
    args = ["export", files["kohya"], "--model", tiny, "--format", "diffusers", "--out", diffusers]
    assert run(capsys, *args)[0] == 0
    cases.append(with_nan(diffusers, tmp_path / "nan-diffusers.safetensors", "attn2.to_k.lora_B"))
    for path, key in cases:
        out = tmp_path / f"{path.stem}.png"
        code, err = sample(capsys, out, path)
        assert code == 2 and err.count("\n") == 1, err
        assert str(path) in err and key in err and "NaN" in err
        assert not out.exists()
