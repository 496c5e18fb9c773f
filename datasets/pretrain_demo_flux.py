"""Pretrain the tiny Flux-layout twin of the demo base that stylelora ships as `demo:flux`.

The twin shares `demo:sd15`'s VAE (64 px images to 8x8x4 latents, packed into 4x4 tokens of
2x2 patches) and its CLIP text encoder (frozen: its pooled output is Flux's global
conditioning), and trains from scratch, on the same flat pictures (`flat_shapes.py`):

- a T5 encoder (`T5EncoderModel`, a character-level T5 tokenizer built here) and
- a `FluxTransformer2DModel` (Flux.1 dev's layout: double and single blocks, rotary position
  ids, the guidance embedding),

together, on stylelora's own rectified-flow objective (`FlowMatchObjective`: target noise
minus latents, logit-normal sigmas) through the Flux family's own packed call
(`Flux.denoise`), with the caption dropped 10 % of the time. The guidance embedding is trained
at 1.0, as stylelora trains Flux adapters; the twin is sampled with true classifier-free
guidance (FluxPipeline's `true_cfg_scale`).

As `pretrain_demo_base.py`: two processes share each step, every batch is drawn from one
generator seeded by (seed, step), the weights are written as their moving average, a resumed
run is the run that was not interrupted, and two runs on one machine write bitwise-identical
weights. The folder written holds the transformer, T5 and its tokenizer and the scheduler;
`stylelora/families/demo.py` adds the VAE and CLIP of `demo:sd15` when it assembles the model.

    python datasets/pretrain_demo_flux.py                  # stylelora/families/flux/demo/
    python datasets/pretrain_demo_flux.py --resume         # continue an interrupted run
    python datasets/pretrain_demo_flux.py --tiny --processes 1 --out /tmp/flux --steps 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer
from tokenizers.decoders import Metaspace as MetaspaceDecoder
from tokenizers.models import Unigram
from tokenizers.pre_tokenizers import Metaspace
from tqdm import tqdm
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

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
from stylelora.families.flux import Flux  # noqa: E402
from stylelora.families.objective import FlowMatchObjective, NoisedBatch  # noqa: E402
from stylelora.families.skeletons import source_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "stylelora" / "families" / "flux" / "demo"
# T5 tokens per caption: a word each (the captions have at most 15), with room for unknown
# words spelled out.
T5_LENGTH = 32


def write_t5_tokenizer(folder: Path, captions: list[str]) -> T5TokenizerFast:
    """A T5 tokenizer (SentencePiece's Unigram model and word-start marks, as T5's) whose pieces
    are the words of `captions`, and single characters that spell out any other word."""
    words = sorted({word for caption in captions for word in caption.replace(",", " ,").split()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, -1.0) for word in words] + [("\u2581", -4.0)]
    pieces += [(chr(c), -5.0) for c in range(33, 127)]
    tokenizer = Tokenizer(Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = Metaspace()
    tokenizer.decoder = MetaspaceDecoder()
    wrapped = T5TokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_ids=0, model_max_length=T5_LENGTH,
    )  # fmt: skip
    wrapped.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def make_t5(vocab_size: int, tiny: bool) -> T5EncoderModel:
    width = 16 if tiny else 64
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=width,
            d_kv=width // 4,
            d_ff=2 * width,
            num_layers=1 if tiny else 2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            decoder_start_token_id=0,
        )
    )


def make_transformer(text_width: int, pooled_width: int, tiny: bool) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 2x2 patches of 4 latent channels
        num_layers=1 if tiny else 2,
        num_single_layers=1 if tiny else 5,
        attention_head_dim=16 if tiny else 32,
        num_attention_heads=2 if tiny else 4,
        joint_attention_dim=text_width,
        pooled_projection_dim=pooled_width,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6) if tiny else (8, 12, 12),
    )


class Denoiser(torch.nn.Module):
    """T5 and the transformer as one module (what DDP wraps), called as the Flux family calls
    its denoiser."""

    def __init__(self, family: Flux) -> None:
        super().__init__()
        self.family = family
        self.t5, self.transformer = family.pipe.text_encoder_2, family.pipe.transformer

    def forward(self, noisy, sigmas, t5_ids, pooled) -> torch.Tensor:
        text = {"encoder_hidden_states": self.t5(t5_ids)[0], "pooled_projections": pooled}
        return self.family.denoise(self.transformer, noisy, sigmas, text, {})


def conditioning(family: Flux, captions: list[str], clip_ids: torch.Tensor) -> dict:
    """T5 token ids and CLIP's pooled output (CLIP is frozen: computed once) per caption."""
    tokenizer = family.pipe.tokenizer_2
    t5_ids = tokenizer(
        captions, padding="max_length", max_length=T5_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    clip = family.pipe.text_encoder
    with torch.no_grad():
        pooled = torch.cat(
            [clip(clip_ids[i : i + 512]).pooler_output for i in range(0, len(clip_ids), 512)]
        )
    return {"t5": t5_ids, "pooled": pooled}


@torch.no_grad()
def encode_latents(family: Flux, pixels: torch.Tensor, batch: int = 256) -> dict:
    """Each picture's VAE posterior (mean, std): the twin's latents are the SD1.5 base's."""
    means, stds = [], []
    for start in tqdm(range(0, len(pixels), batch), desc="encoding", leave=False):
        mean, std = family.encode_posterior(to_unit(pixels[start : start + batch]))
        means.append(mean)
        stds.append(std)
    return {"mean": torch.cat(means), "std": torch.cat(stds)}


def flow_loss(
    model, family: Flux, objective, latents, cond, empty, gen, args, team
) -> torch.Tensor:
    n = args.batch
    side = latents["mean"].shape[-1]
    idx = torch.randint(len(cond["t5"]), (n,), generator=gen)
    sample_noise = torch.randn((n, 4, side, side), generator=gen)
    drop = torch.rand(n, generator=gen) < args.caption_dropout
    noise, sigmas = objective.draw((n, 4, side, side), gen, args.options)
    idx, sample_noise, drop, noise, sigmas = (
        team.share(x) for x in (idx, sample_noise, drop, noise, sigmas)
    )
    scale = family.vae.config.scaling_factor
    z = (latents["mean"][idx] + latents["std"][idx] * sample_noise) * scale
    t5_ids, pooled = cond["t5"][idx].clone(), cond["pooled"][idx].clone()
    t5_ids[drop], pooled[drop] = empty["t5"], empty["pooled"]
    noised = NoisedBatch(z, noise, sigmas)
    prediction = model(objective.noisy(noised), sigmas, t5_ids, pooled)
    return F.mse_loss(prediction, objective.target(noised))


def train_flux(family: Flux, latents, cond, empty, args, team: Team) -> None:
    """Train T5 and the transformer; on return they hold the moving average of their weights."""
    objective = FlowMatchObjective(dict(family.pipe.scheduler.config))
    denoiser = Denoiser(family)
    modules = {"transformer": denoiser.transformer, "t5": denoiser.t5}

    def loss_of(model: torch.nn.Module, gen: torch.Generator) -> torch.Tensor:
        return flow_loss(model, family, objective, latents, cond, empty, gen, args, team)

    train_denoiser(denoiser, modules, "flux", loss_of, args, team)


def twin(args: argparse.Namespace, folder: Path, captions: list[str]) -> Flux:
    """The untrained twin around the demo base's VAE and CLIP, as a Flux family."""
    base = load_family("demo:sd15").pipe
    tokenizer_2 = write_t5_tokenizer(folder / "tokenizer_2", captions)
    torch.manual_seed(args.seed)
    t5 = make_t5(len(tokenizer_2), args.tiny)
    clip_width = base.text_encoder.config.hidden_size
    transformer = make_transformer(t5.config.d_model, clip_width, args.tiny)
    pipe = FluxPipeline(
        # Flux.1 dev's sampling schedule (the shift follows the image's token count)
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(source_dir("flux") / "scheduler"),
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    for frozen in (pipe.vae, pipe.text_encoder):
        frozen.requires_grad_(False)
    family = Flux(pipe)
    family.configure({"t5_max_length": T5_LENGTH})
    return family


def write_twin(out: Path, family: Flux) -> None:
    """The twin's own parts in fp16: transformer, T5, its tokenizer, scheduler, model index
    (the shared VAE, CLIP and tokenizer come from demo:sd15 when the package assembles it)."""
    staging = out.with_name(out.name + ".writing")
    if staging.exists():
        shutil.rmtree(staging)
    family.pipe.to(torch.float16).save_pretrained(staging, safe_serialization=True)
    for shared in ("vae", "text_encoder", "tokenizer"):
        shutil.rmtree(staging / shared)
    give_umask_modes(staging)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = pretraining_parser(__doc__.splitlines()[0], DEFAULT_OUT, "demo-flux-pretrain")
    args = p.parse_args(argv)
    check_batches(p, args, "batch")
    # Sigmas as SD3 and Flux were pretrained: logit-normal, no shift.
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
    cond = conditioning(family, pool["captions"], pool["ids"])
    empty = conditioning(family, [""], family.pipe.tokenizer([""], padding="max_length",
                         max_length=77, return_tensors="pt").input_ids)  # fmt: skip
    empty = {key: value[0] for key, value in empty.items()}
    latents = encode_latents(family, pool["pixels"])
    train_flux(family, latents, cond, empty, args, team)
    if not team.leader:
        return
    write_twin(args.out, family)
    minutes = (time.perf_counter() - started) / 60
    size_mb = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 1e6
    print(f"wrote {args.out} ({size_mb:.1f} MB) in {minutes:.1f} min")


if __name__ == "__main__":
    main()
