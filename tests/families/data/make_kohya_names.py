"""Write kohya_names_<skeleton>.txt: the module names kohya sd-scripts gives a LoRA on each model.

An independent re-implementation of kohya's rule (networks/lora.py, create_modules): every
Linear or 1x1 Conv2d inside a Transformer2DModel (UNet) or a CLIPAttention / CLIPMLP (text
encoder) is named prefix + "_" + its module path with "." replaced by "_". SDXL's UNet paths are
the original (sgm) ones, counted here block by block as the sgm UNet builds them, not from a
formula. Only the JSON configs are read.

kohya_locon_names_<skeleton>.txt adds what LoCon (kohya's conv_dim, stylelora's `full` preset)
adapts: every Linear / Conv2d inside a ResnetBlock2D, Downsample2D or Upsample2D (conv1, conv2,
time_emb_proj, conv_shortcut where the channel count changes; the samplers' conv). Run from the
repository root:

    python tests/families/data/make_kohya_names.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKELETONS = HERE.parents[2] / "stylelora" / "families" / "skeletons"
TEXT_ENCODERS = {"sd15": {"lora_te": "text_encoder"}, "sd2": {"lora_te": "text_encoder"}}
TEXT_ENCODERS["sdxl"] = {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}


def transformer_modules(depth: int) -> list[str]:
    """The Linear / 1x1 conv paths inside one Transformer2DModel of `depth` blocks."""
    names = ["proj_in", "proj_out"]
    for k in range(depth):
        block = f"transformer_blocks.{k}"
        for attn in ("attn1", "attn2"):
            names += [f"{block}.{attn}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
        names += [f"{block}.ff.net.0.proj", f"{block}.ff.net.2"]
    return names


def per_level(value: int | list[int], levels: int) -> list[int]:
    return list(value) if isinstance(value, list) else [value] * levels


def diffusers_transformers(unet: dict) -> list[tuple[str, int]]:
    """(path, depth) of each Transformer2DModel, in diffusers' layout (SD1.x, SD2.x)."""
    levels = len(unet["down_block_types"])
    depth = per_level(unet.get("transformer_layers_per_block", 1), levels)
    layers = unet["layers_per_block"]
    found = []
    for i, kind in enumerate(unet["down_block_types"]):
        if kind.startswith("CrossAttn"):
            found += [(f"down_blocks.{i}.attentions.{j}", depth[i]) for j in range(layers)]
    found.append(("mid_block.attentions.0", depth[-1]))
    for i, kind in enumerate(unet["up_block_types"]):
        if kind.startswith("CrossAttn"):
            up_depth = depth[::-1][i]
            found += [(f"up_blocks.{i}.attentions.{j}", up_depth) for j in range(layers + 1)]
    return found


def sgm_transformers(unet: dict) -> list[tuple[str, int]]:
    """(path, depth) of each transformer in the sgm UNet, numbering its blocks one by one."""
    levels = len(unet["down_block_types"])
    depth = per_level(unet.get("transformer_layers_per_block", 1), levels)
    layers = unet["layers_per_block"]
    found, block = [], 1  # input_blocks.0 is conv_in
    for i, kind in enumerate(unet["down_block_types"]):
        for _ in range(layers):
            if kind.startswith("CrossAttn"):
                found.append((f"input_blocks.{block}.1", depth[i]))
            block += 1
        if i < levels - 1:
            block += 1  # the downsampler has a block of its own
    found.append(("middle_block.1", depth[-1]))
    block = 0
    for i, kind in enumerate(unet["up_block_types"]):
        for _ in range(layers + 1):
            if kind.startswith("CrossAttn"):
                found.append((f"output_blocks.{block}.1", depth[::-1][i]))
            block += 1
    return found


def kohya(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def names(skeleton: str) -> list[str]:
    folder = SKELETONS / skeleton
    unet = json.loads((folder / "unet" / "config.json").read_text())
    walk = sgm_transformers if skeleton == "sdxl" else diffusers_transformers
    found = [
        kohya("lora_unet", f"{path}.{module}")
        for path, depth in walk(unet)
        for module in transformer_modules(depth)
    ]
    for prefix, sub in TEXT_ENCODERS[skeleton].items():
        text = json.loads((folder / sub / "config.json").read_text())
        for layer in range(text["num_hidden_layers"]):
            base = f"text_model.encoder.layers.{layer}"
            modules = [f"self_attn.{p}_proj" for p in ("q", "k", "v", "out")]
            found += [kohya(prefix, f"{base}.{m}") for m in modules + ["mlp.fc1", "mlp.fc2"]]
    return sorted(found)


def resnet_channels(unet: dict) -> list[tuple[str, int, bool, bool]]:
    """(part, level, has shortcut, has attention) of every ResNet block, in the order the
    sgm UNet builds them; part is "down", "mid" or "up"."""
    out = unet["block_out_channels"]
    layers = unet["layers_per_block"]
    found = []
    for i, kind in enumerate(unet["down_block_types"]):
        for j in range(layers):
            channels_in = (out[i - 1] if i else out[0]) if j == 0 else out[i]
            found.append(("down", i, channels_in != out[i], kind.startswith("CrossAttn")))
    found += [("mid", 0, False, True)] * 2
    for i, kind in enumerate(unet["up_block_types"]):
        # An up block's ResNets take the skip connection's channels on top of their own.
        found += [("up", i, True, kind.startswith("CrossAttn"))] * (layers + 1)
    return found


DIFFUSERS_RESNET = ("conv1", "conv2", "time_emb_proj")
SGM_RESNET = ("in_layers.2", "out_layers.3", "emb_layers.1")


def locon_diffusers(unet: dict) -> list[str]:
    levels, layers = len(unet["block_out_channels"]), unet["layers_per_block"]
    found, count = [], {"down": {}, "mid": {}, "up": {}}
    for part, level, shortcut, _ in resnet_channels(unet):
        j = count[part].setdefault(level, 0)
        count[part][level] += 1
        block = "mid_block" if part == "mid" else f"{part}_blocks.{level}"
        modules = list(DIFFUSERS_RESNET) + (["conv_shortcut"] if shortcut else [])
        found += [f"{block}.resnets.{j}.{m}" for m in modules]
    for i in range(levels - 1):
        found += [f"down_blocks.{i}.downsamplers.0.conv", f"up_blocks.{i}.upsamplers.0.conv"]
    assert all(n < layers + 2 for c in count.values() for n in c.values())
    return found


def locon_sgm(unet: dict) -> list[str]:
    levels, layers = len(unet["block_out_channels"]), unet["layers_per_block"]
    found, block, ups, mids = [], {"down": 1, "up": 0}, 0, 0
    for part, level, shortcut, attention in resnet_channels(unet):
        modules = list(SGM_RESNET) + (["skip_connection"] if shortcut else [])
        if part == "mid":
            found += [f"middle_block.{2 * mids}.{m}" for m in modules]
            mids += 1
            continue
        name = "input_blocks" if part == "down" else "output_blocks"
        found += [f"{name}.{block[part]}.0.{m}" for m in modules]
        if part == "down" and (block[part] - 1) % (layers + 1) == layers - 1 and level < levels - 1:
            found.append(f"input_blocks.{block[part] + 1}.0.op")  # the downsampler's own block
            block[part] += 1
        if part == "up":
            ups += 1
            if ups % (layers + 1) == 0 and level < levels - 1:
                found.append(f"output_blocks.{block[part]}.{2 if attention else 1}.conv")
        block[part] += 1
    return found


def locon_names(skeleton: str) -> list[str]:
    unet = json.loads((SKELETONS / skeleton / "unet" / "config.json").read_text())
    walk = locon_sgm if skeleton == "sdxl" else locon_diffusers
    return sorted(kohya("lora_unet", path) for path in walk(unet))


if __name__ == "__main__":
    for skeleton in ("sd15", "sd2", "sdxl"):
        lines = names(skeleton)
        (HERE / f"kohya_names_{skeleton}.txt").write_text("\n".join(lines) + "\n")
        locon = locon_names(skeleton)
        (HERE / f"kohya_locon_names_{skeleton}.txt").write_text("\n".join(locon) + "\n")
        print(skeleton, len(lines), len(locon))
