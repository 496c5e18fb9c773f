"""A hand-made header that is JSON but not safetensors', and a pickle renamed `.safetensors`:
every command that opens adapters stops with one line naming the file and what is wrong."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

from stylelora.cli import main
from stylelora.families.tiny import tiny_model_path


def with_header(path: Path, header) -> Path:
    """A file of a well-formed safetensors length prefix and this JSON header, no tensors."""
    data = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(data)) + data)
    return path


@pytest.fixture(scope="module", autouse=True)
def tiny_sd15():
    """Built before any test captures output (building it prints a progress bar)."""
    return tiny_model_path("sd15")


def commands(path: Path, tmp_path: Path) -> dict[str, list]:
    """Every command that opens an adapter, given `path`."""
    tiny = str(tiny_model_path("sd15"))
    out = tmp_path / "out.safetensors"
    return {
        "inspect": ["inspect", path],
        "export": ["export", path, "--format", "kohya", "--out", out],
        "resize": ["resize", path, "--rank", "1", "--out", out],
        "combine": ["combine", path, path, "--out", out],
        "merge": ["merge", "--model", tiny, "--adapter", path, "--out", out],
        "sample": ["sample", "--model", tiny, "--adapter", path, "--prompt", "a fish"]
        + ["--steps", "1", "--width", "64", "--height", "64", "--out", tmp_path / "s.png"],
    }


def refused(capsys, args: list, *words: str) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, (args, err)
    assert err.count("\n") == 1 and all(w in err for w in words), err
    return err


BAD_HEADERS = {
    "a list": ([1, 2, 3], "a JSON list, not an object"),
    "metadata of numbers": ({"__metadata__": {"ss_network_dim": 4}}, "__metadata__ is not a map"),
    "metadata a list": ({"__metadata__": ["x"]}, "__metadata__ is not a map"),
    "entry a string": ({"lora_unet_x.alpha": "oops"}, "lora_unet_x.alpha has no valid"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_a_header_that_is_not_a_json_object_is_named_by_every_command(tmp_path, capsys, case):
    header, words = BAD_HEADERS[case]
    path = with_header(tmp_path / "hand-made.safetensors", header)
    for name, args in commands(path, tmp_path).items():
        err = refused(capsys, args, str(path), words)
        assert "Traceback" not in err, name
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "s.png").exists()


def torch_saved(path: Path) -> Path:
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, path)
    return path


def protocol_2_pickle(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"state_dict": [1.0, 2.0]}, protocol=2))
    return path


@pytest.mark.parametrize("write", [torch_saved, protocol_2_pickle])
def test_a_renamed_pickle_is_called_a_pickle(tmp_path, capsys, write):
    path = write(tmp_path / "renamed.safetensors")
    for args in commands(path, tmp_path).values():
        err = refused(capsys, args, f"{path} is a pickle (PyTorch .pt/.ckpt), not a safetensors")
        assert "truncated" not in err


def test_a_safetensors_header_640_bytes_long_is_not_taken_for_a_pickle(tmp_path, capsys):
    """Its length prefix starts b"\\x80\\x02" like a protocol-2 pickle."""
    from safetensors.torch import save_file

    path = tmp_path / "a.safetensors"
    for pad in range(0, 800):
        save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, path, metadata={"p": "x" * pad})
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    assert path.read_bytes()[:2] == b"\x80\x02"
    refused(capsys, ["inspect", path], "lora_down.weight is missing")
