"""The adapter tools end to end, through the CLI: merge, resize, combine, export, inspect."""

from __future__ import annotations

import torch
from lora_helpers import adapted_family, fresh_pipe, max_diff, rendered
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stylelora.adapters.state import read_adapter
from stylelora.cli import main
from stylelora.export.lora_file import save_lora_file
from stylelora.families import load_family
from stylelora.families.tiny import tiny_model_path


def adapter_file(tmp_path, tiny, name, seed=0, **options):
    """A kohya file of random non-zero adapters, and the image our in-memory model renders."""
    options = {"rank": 4, "alpha": 2.0, **options}
    family, adapted = adapted_family(tiny, seed=seed, **options)
    meta = {"ss_output_name": name}
    path = save_lora_file(tmp_path / f"{name}.safetensors", family, adapted, meta)
    return path, rendered(family.pipe)


def with_adapters(tiny, weighted):
    """What diffusers renders with these files loaded together at these weights."""
    pipe = fresh_pipe(tiny)
    names = []
    for index, (path, _) in enumerate(weighted):
        pipe.load_lora_weights(str(path), adapter_name=f"a{index}")
        names.append(f"a{index}")
    pipe.set_adapters(names, adapter_weights=[w for _, w in weighted])
    return rendered(pipe)


def test_merge_into_a_folder_and_a_single_file(tmp_path, capsys):
    path, _ = adapter_file(tmp_path, "sd15", "a", unet_targets="full", text_encoder=True)
    expected = with_adapters("sd15", [(path, 0.7)])
    tiny = str(tiny_model_path("sd15"))
    folder, single = tmp_path / "merged", tmp_path / "merged.safetensors"
    for out in (folder, single):
        args = ["merge", "--model", tiny, "--adapter", f"{path}:0.7", "--out", str(out)]
        assert main([*args, "--dtype", "fp32"]) == 0
    assert max_diff(rendered(load_family(str(folder)).pipe), expected) < 1e-4
    # The single file loads back through diffusers' from_single_file (the tiny model's configs).
    from_file = load_family(str(single), config=tiny)
    assert max_diff(rendered(from_file.pipe), expected) < 1e-4
    assert max_diff(rendered(fresh_pipe("sd15")), expected) > 1e-2

    half = tmp_path / "half.safetensors"
    assert main(["merge", "--model", tiny, "--adapter", str(path), "--out", str(half)]) == 0
    with safe_open(str(half), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in list(handle.keys())} == {torch.float16}
    assert "merged a.safetensors:0.7" in capsys.readouterr().out


def test_merge_and_sample_apply_dora_files(tmp_path):
    path, ours = adapter_file(
        tmp_path, "sdxl", "dora", unet_targets="attn-mlp", use_dora=True, text_encoder=True
    )
    out = tmp_path / "merged"
    tiny = str(tiny_model_path("sdxl"))
    assert main(["merge", "--model", tiny, "--adapter", str(path), "--out", str(out)]) == 0
    merged = load_family(str(out))
    merged.pipe.to(torch.float32)
    assert max_diff(rendered(merged.pipe), ours) < 2e-2  # saved in fp16

    from stylelora.sample.adapter import apply_adapter

    family = load_family(tiny)
    apply_adapter(family, path, 1.0)
    assert max_diff(rendered(family.pipe), ours) < 1e-4


def test_third_party_sdxl_names_load_in_sample_and_merge(tmp_path):
    """An SDXL file with diffusers-path kohya names (lora_unet_down_blocks_...), as some
    trainers write, renders what the sgm-named file renders."""
    path, ours = adapter_file(tmp_path, "sdxl", "sgm", unet_targets="full", text_encoder=True)
    family = load_family(str(tiny_model_path("sdxl")))
    from stylelora.export.names import family_targets

    renamed = {}
    targets = family_targets(family)
    for key, value in load_file(path).items():
        name, _, part = key.partition(".")
        target = targets[name]
        if target.component == "unet":
            name = "lora_unet_" + target.path.replace(".", "_")
        renamed[f"{name}.{part}"] = value
    assert any("_down_blocks_" in k for k in renamed) and not any(
        "input_blocks" in k for k in renamed
    )
    other = tmp_path / "diffusers-named.safetensors"
    save_file(renamed, other)

    from stylelora.sample.adapter import apply_adapter

    apply_adapter(family, other, 1.0)
    assert max_diff(rendered(family.pipe), ours) < 1e-4
    out = tmp_path / "m"
    tiny = str(tiny_model_path("sdxl"))
    assert (
        main(
            [
                "merge",
                "--model",
                tiny,
                "--adapter",
                str(other),
                "--out",
                str(out),
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    assert max_diff(rendered(load_family(str(out)).pipe), ours) < 1e-4


def test_resize(tmp_path, capsys):
    path, _ = adapter_file(
        tmp_path, "sd15", "big", rank=8, alpha=3.0, unet_targets="full", conv_rank=4
    )
    original = read_adapter(path)
    full = tmp_path / "full.safetensors"
    assert main(["resize", str(path), "--rank", "8", "--out", str(full)]) == 0
    resized = read_adapter(full)
    worst = max(
        ((resized.modules[n].delta() - m.delta()).abs().max() / m.delta().abs().max()).item()
        for n, m in original.modules.items()
    )
    assert worst < 1e-5
    assert (
        max_diff(with_adapters("sd15", [(full, 1.0)]), with_adapters("sd15", [(path, 1.0)])) < 1e-4
    )

    errors = []
    for rank in (1, 2, 4, 6):
        out = tmp_path / f"r{rank}.safetensors"
        assert main(["resize", str(path), "--rank", str(rank), "--out", str(out)]) == 0
        small = read_adapter(out)
        assert {m.rank for m in small.modules.values()} <= {1, 2, 4, 6} and max(
            m.rank for m in small.modules.values()
        ) <= rank
        assert small.metadata["ss_network_dim"] == str(rank)
        errors.append(
            sum(
                (small.modules[n].delta() - m.delta()).norm() ** 2
                for n, m in original.modules.items()
            ).item()
        )
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 4
    printed = capsys.readouterr().out
    assert "energy kept" in printed and "error" in printed

    out = tmp_path / "energy.safetensors"
    assert main(["resize", str(path), "--energy", "0.9", "--out", str(out)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "rank 8 ->" in x][0]
    kept = float(line.split("energy kept ")[1].split("%")[0])
    assert kept >= 90.0
    assert read_adapter(out).metadata["stylelora_resized"] == "energy=0.9"


def test_combine_is_loading_both_at_those_weights(tmp_path):
    a, _ = adapter_file(tmp_path, "sd15", "a", seed=0, unet_targets="cross-attn", text_encoder=True)
    b, _ = adapter_file(tmp_path, "sd15", "b", seed=1, unet_targets="full", alpha=6.0, conv_rank=2)
    out = tmp_path / "c.safetensors"
    assert main(["combine", f"{a}:0.7", f"{b}:0.5", "--out", str(out)]) == 0
    expected = with_adapters("sd15", [(a, 0.7), (b, 0.5)])
    assert max_diff(with_adapters("sd15", [(out, 1.0)]), expected) < 1e-4
    assert max_diff(with_adapters("sd15", [(a, 1.0)]), expected) > 1e-2

    low = tmp_path / "c2.safetensors"
    assert main(["combine", f"{a}:0.7", f"{b}:0.5", "--out", str(low), "--rank", "2"]) == 0
    assert max(m.rank for m in read_adapter(low).modules.values()) == 2


OPTIONS = dict(unet_targets="full", conv_rank=2, conv_alpha=5.0, text_encoder=True)


def test_export_to_diffusers_and_peft_and_back(tmp_path):
    """SDXL (sgm names), LoCon with its own conv rank/alpha, alpha != rank, text encoders."""
    path, ours = adapter_file(tmp_path, "sdxl", "x", **OPTIONS)
    tiny = str(tiny_model_path("sdxl"))
    as_diffusers = tmp_path / "diffusers.safetensors"
    args = [
        "export",
        str(path),
        "--model",
        tiny,
        "--format",
        "diffusers",
        "--out",
        str(as_diffusers),
    ]
    assert main(args) == 0
    pipe = fresh_pipe("sdxl")
    pipe.load_lora_weights(str(as_diffusers))
    assert max_diff(rendered(pipe), ours) < 1e-4

    back = tmp_path / "back.safetensors"
    args = ["export", str(as_diffusers), "--model", tiny, "--format", "kohya", "--out", str(back)]
    assert main(args) == 0
    original, again = load_file(path), load_file(back)
    assert set(original) == set(again)
    assert all(torch.equal(original[k], again[k]) for k in original)
    assert read_adapter(back).metadata["ss_output_name"] == "x"

    folder = tmp_path / "peft"
    args = ["export", str(path), "--model", tiny, "--format", "peft", "--out", str(folder)]
    assert main(args) == 0
    assert (folder / "text_encoder_2" / "adapter_config.json").is_file()
    from_peft = tmp_path / "from-peft.safetensors"
    args = ["export", str(folder), "--model", tiny, "--format", "kohya", "--out", str(from_peft)]
    assert main(args) == 0
    again = load_file(from_peft)
    assert set(original) == set(again)
    assert all(torch.equal(original[k], again[k]) for k in original)
    from peft import PeftModel

    ours_unet = adapted_family("sdxl", seed=0, rank=4, alpha=2.0, **OPTIONS)[0].unet
    theirs_unet = PeftModel.from_pretrained(fresh_pipe("sdxl").unet, folder / "unet")
    config = ours_unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([10]))
    inputs += (torch.randn(1, 7, config.cross_attention_dim),)
    added = {
        "text_embeds": torch.randn(1, pooled),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    }
    with torch.no_grad():
        theirs = theirs_unet(*inputs, added_cond_kwargs=added).sample
        mine = ours_unet(*inputs, added_cond_kwargs=added).sample
    assert (theirs - mine).abs().max() < 1e-4
