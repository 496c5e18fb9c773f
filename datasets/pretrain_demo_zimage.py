"""Pretrain the tiny Z-Image-layout twin of the demo base that stylelora ships as `demo:zimage`.

The twin shares `demo:sd15`'s VAE (64 px images to 8x8x4 latents, 4x4 tokens of 2x2 patches)
and trains from scratch, on the same flat pictures (`flat_shapes.py`):

- a Qwen3 text encoder (`Qwen3Model`, with a byte-level BPE tokenizer learned here from the
  captions, Qwen's special tokens and chat template) and
- a `ZImageTransformer2DModel` (Z-Image's layout: noise and caption refiners, the single-stream
  main blocks, 3D rotary positions),

together, on stylelora's own rectified-flow objective (`FlowMatchObjective`: target noise
minus latents, logit-normal sigmas) through the Z-Image family's own call (`ZImage.denoise`:
each caption's real tokens, the second-to-last hidden state as ZImagePipeline takes it, the
timestep as 1 - sigma, the output negated), with the caption dropped 10 % of the time.

As `pretrain_demo_base.py`: two processes share each step, every batch is drawn from one
generator seeded by (seed, step), the weights are written as their moving average, a resumed
run is the run that was not interrupted, and two runs on one machine write bitwise-identical
weights. The folder written holds the transformer, Qwen3 and its tokenizer and the scheduler;
the package links in the VAE of `demo:sd15` when it assembles the model.

    python datasets/pretrain_demo_zimage.py                  # stylelora/families/zimage/demo/
    python datasets/pretrain_demo_zimage.py --resume         # continue an interrupted run
    python datasets/pretrain_demo_zimage.py --tiny --processes 1 --out /tmp/z --steps 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from tqdm import tqdm
from transformers import AutoTokenizer, Qwen2TokenizerFast, Qwen3Config, Qwen3Model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_demo_base import (  # noqa: E402
    Team,
    check_batches,
    launch,
    load_tokenizer,
    make_pool,
    pretraining_parser,
    to_unit,
    train_denoiser,
)

from stylelora.config import TrainConfig  # noqa: E402
from stylelora.export.atomic import give_umask_modes  # noqa: E402
from stylelora.families import load_family  # noqa: E402
from stylelora.families.objective import FlowMatchObjective, NoisedBatch  # noqa: E402
from stylelora.families.skeletons import source_dir  # noqa: E402
from stylelora.families.tiny import QWEN_CHAT_TEMPLATE  # noqa: E402
from stylelora.families.zimage import ZImage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "stylelora" / "families" / "zimage" / "demo"
# Qwen tokens per caption, chat template included (a word a token; the captions have at most 15
# words, the template 12 tokens).
TEXT_LENGTH = 40
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_qwen_tokenizer(folder: Path, captions: list[str], tiny: bool) -> Qwen2TokenizerFast:
    """A byte-level BPE tokenizer (as Qwen's) whose merges, learned from the captions and the
    chat template's words, make their words single tokens; any other word is spelled in pieces."""
    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=400 if tiny else 1200,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    template = ["user\n", "assistant\n", "\n"] * 20
    backend.train_from_iterator([*captions, *template], trainer)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL[1:],
        model_max_length=TEXT_LENGTH,
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def make_text_encoder(vocab_size: int, pad: int, tiny: bool) -> Qwen3Model:
    width = 16 if tiny else 64
    return Qwen3Model(
        Qwen3Config(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2 if tiny else 3,  # ZImagePipeline takes the second-to-last
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=width // 4,
            max_position_embeddings=TEXT_LENGTH,
            pad_token_id=pad,
        )
    )


def make_transformer(text_width: int, tiny: bool) -> ZImageTransformer2DModel:
    return ZImageTransformer2DModel(
        in_channels=4,  # the demo base's VAE
        dim=32 if tiny else 128,
        n_layers=1 if tiny else 4,
        n_refiner_layers=1,
        n_heads=2 if tiny else 4,
        n_kv_heads=2 if tiny else 4,
        cap_feat_dim=text_width,
        axes_dims=[4, 6, 6] if tiny else [8, 12, 12],  # the heads' width: 16 or 32
        axes_lens=[128, 16, 16],
    )


class Denoiser(torch.nn.Module):
    """Qwen3 and the transformer as one module (what DDP wraps), the captions encoded as
    ZImagePipeline encodes them (its second-to-last hidden state, each caption's real tokens)
    and the transformer called as the Z-Image family calls it."""

    def __init__(self, family: ZImage) -> None:
        super().__init__()
        self.family = family
        self.text_encoder, self.transformer = family.pipe.text_encoder, family.pipe.transformer

    def forward(self, noisy, sigmas, ids, mask) -> torch.Tensor:
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        text = {"cap_feats": hidden.hidden_states[-2], "cap_mask": mask.bool()}
        return self.family.denoise(self.transformer, noisy, sigmas, text, {})


def conditioning(family: ZImage, captions: list[str]) -> dict:
    """Each caption in Qwen's chat template, as token ids and attention mask."""
    tokenizer = family.pipe.tokenizer
    templated = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": caption}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        for caption in captions
    ]
    tokens = tokenizer(
        templated, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
        return_tensors="pt",
    )  # fmt: skip
    return {"ids": tokens.input_ids, "mask": tokens.attention_mask}


@torch.no_grad()
def encode_latents(family: ZImage, pixels: torch.Tensor, batch: int = 256) -> dict:
    """Each picture's VAE posterior (mean, std): the twin's latents are the SD1.5 base's."""
    means, stds = [], []
    for start in tqdm(range(0, len(pixels), batch), desc="encoding", leave=False):
        mean, std = family.encode_posterior(to_unit(pixels[start : start + batch]))
        means.append(mean)
        stds.append(std)
    return {"mean": torch.cat(means), "std": torch.cat(stds)}


def flow_loss(model, family, objective, latents, cond, empty, gen, args, team) -> torch.Tensor:
    n = args.batch
    side = latents["mean"].shape[-1]
    idx = torch.randint(len(cond["ids"]), (n,), generator=gen)
    sample_noise = torch.randn((n, 4, side, side), generator=gen)
    drop = torch.rand(n, generator=gen) < args.caption_dropout
    noise, sigmas = objective.draw((n, 4, side, side), gen, args.options)
    idx, sample_noise, drop, noise, sigmas = (
        team.share(x) for x in (idx, sample_noise, drop, noise, sigmas)
    )
    z = family.scale_latents(latents["mean"][idx] + latents["std"][idx] * sample_noise)
    ids, mask = cond["ids"][idx].clone(), cond["mask"][idx].clone()
    ids[drop], mask[drop] = empty["ids"], empty["mask"]
    noised = NoisedBatch(z, noise, sigmas)
    prediction = model(objective.noisy(noised), sigmas, ids, mask)
    return F.mse_loss(prediction, objective.target(noised))


def train_zimage(family: ZImage, latents, cond, empty, args, team: Team) -> None:
    """Train Qwen3 and the transformer; on return they hold the moving average of their weights."""
    objective = FlowMatchObjective(dict(family.pipe.scheduler.config))
    denoiser = Denoiser(family)
    modules = {"transformer": denoiser.transformer, "text_encoder": denoiser.text_encoder}

    def loss_of(model: torch.nn.Module, gen: torch.Generator) -> torch.Tensor:
        return flow_loss(model, family, objective, latents, cond, empty, gen, args, team)

    train_denoiser(denoiser, modules, "zimage", loss_of, args, team)


def twin(args: argparse.Namespace, folder: Path, captions: list[str]) -> ZImage:
    """The untrained twin around the demo base's VAE, as a Z-Image family."""
    base = load_family("demo:sd15").pipe
    tokenizer = write_qwen_tokenizer(folder / "tokenizer", captions, args.tiny)
    torch.manual_seed(args.seed)
    text_encoder = make_text_encoder(len(tokenizer), tokenizer.pad_token_id, args.tiny)
    transformer = make_transformer(text_encoder.config.hidden_size, args.tiny)
    pipe = ZImagePipeline(
        # Z-Image-Turbo's sampling schedule (sigmas shifted by 3)
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(
            source_dir("zimage") / "scheduler"
        ),
        vae=base.vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.vae.requires_grad_(False)
    # ZImagePipeline reads the second-to-last hidden state: the last layer and the final norm
    # never reach the output (DDP must not wait for their gradients); they keep their init.
    text_encoder.layers[-1].requires_grad_(False)
    text_encoder.norm.requires_grad_(False)
    family = ZImage(pipe)
    family.configure({"max_sequence_length": TEXT_LENGTH})
    return family


def write_twin(out: Path, family: ZImage) -> None:
    """The twin's own parts in fp16: transformer, Qwen3, its tokenizer, scheduler, model index
    (the shared VAE comes from demo:sd15 when the package assembles it)."""
    staging = out.with_name(out.name + ".writing")
    if staging.exists():
        shutil.rmtree(staging)
    family.pipe.to(torch.float16).save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(staging / "vae")
    give_umask_modes(staging)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = pretraining_parser(__doc__.splitlines()[0], DEFAULT_OUT, "demo-zimage-pretrain")
    args = p.parse_args(argv)
    check_batches(p, args, "batch")
    # Sigmas as the flow transformers are pretrained: logit-normal, no shift.
    args.options = TrainConfig(timestep_sampling="logit_normal")
    return args


def main(argv: list[str] | None = None) -> None:
    launch(parse_args(argv), pretrain)


def pretrain(args: argparse.Namespace, team: Team) -> None:
    if team.leader and not args.resume and args.work.exists():
        shutil.rmtree(args.work)
    started = time.perf_counter()
    scratch = args.work / "tokenizer" if team.leader else args.work / f"tokenizer-{team.rank}"
    pool = make_pool(args.images, args.seed, load_tokenizer(), quiet=not team.leader)
    family = twin(args, scratch, pool["captions"])
    cond = conditioning(family, pool["captions"])
    empty = {key: value[0] for key, value in conditioning(family, [""]).items()}
    latents = encode_latents(family, pool["pixels"])
    train_zimage(family, latents, cond, empty, args, team)
    if not team.leader:
        return
    write_twin(args.out, family)
    minutes = (time.perf_counter() - started) / 60
    size_mb = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 1e6
    print(f"wrote {args.out} ({size_mb:.1f} MB) in {minutes:.1f} min")


if __name__ == "__main__":
    main()
