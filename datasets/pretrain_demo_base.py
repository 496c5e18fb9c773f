"""Pretrain the small SD1.5-layout base model that stylelora ships as `demo:sd15`.

Trains from scratch, on flat pictures of many subjects in many colours (`flat_shapes.py`, drawn
in memory, nothing written but the model):

1. the VAE (`AutoencoderKL`, 64 px images to 8x8x4 latents, SD1.5's factor 8) on
   reconstruction (per pixel and in the mean colour of 4x4 areas) + a small KL;
2. the text encoder (`CLIPTextModel`, the real CLIP BPE tokenizer) and the UNet
   (`UNet2DConditionModel` with cross-attention) together, on the epsilon loss with min-SNR
   weighting and the caption dropped 10 % of the time (classifier-free guidance);
3. the VAE decoder alone, on the frozen encoder's latents, for sharper pictures.

Two processes share each step (torch's DistributedDataParallel over gloo, one thread each:
on two CPU cores about 1.6 times the steps two threads in one process make). Every batch is
drawn whole from one generator seeded by (seed, phase, step) and split between the processes,
so any number of processes draws the same pictures, noise and timesteps. The UNet and the text
encoder are written as their exponential moving average (diffusers' `EMAModel`).

The result is a complete diffusers folder (fp16 safetensors, the SD1.5 scheduler config) that
`DiffusionPipeline.from_pretrained` loads; its tokenizer folder holds the configs only, the
package adds the BPE files it already ships (see `stylelora/families/demo.py`).

    python datasets/pretrain_demo_base.py                  # stylelora/families/sd15/demo/
    python datasets/pretrain_demo_base.py --resume         # continue an interrupted run
    python datasets/pretrain_demo_base.py --tiny --processes 1 --out /tmp/base --steps 2

A resumed run is the run that was not interrupted, and two runs on one machine (same torch,
same number of processes) write bitwise-identical weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import codec_pictures  # noqa: E402
import flat_shapes  # noqa: E402

from stylelora.export.atomic import give_umask_modes  # noqa: E402
from stylelora.families.skeletons import skeleton_dir, source_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "stylelora" / "families" / "sd15" / "demo"
SIZE = 64
# SD1.5's training schedule; sampling uses PNDM with the same betas, as SD1.5's model_index.
SCHEDULE = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
)
SAMPLING = dict(steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)


@dataclass(frozen=True)
class Sizes:
    """Widths of the three models; `--tiny` takes the smallest that still run."""

    vae_channels: tuple[int, ...]
    vae_groups: int
    text_width: int
    text_layers: int
    unet_channels: tuple[int, ...]
    unet_groups: int
    unet_heads: int


# One group in the VAE's norms: groups of a few channels would normalise away most of what
# says a flat picture's colour. The VAE's 64 px level is what costs most per picture; at 8
# wide its encoder lost colours it had not seen often (cream came back pink): 16 wide.
FULL = Sizes((16, 32, 64, 64), 1, 64, 3, (64, 128, 128), 32, 8)
TINY = Sizes((8, 8, 8, 8), 4, 16, 1, (16, 16, 16), 4, 2)
LATENT_SIZE = SIZE // 8  # four VAE blocks, three downsamplings, as in SD1.5


def make_vae(s: Sizes) -> AutoencoderKL:
    n = len(s.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=s.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=s.vae_groups,
        sample_size=SIZE,
        shift_factor=0.0,  # FluxPipeline, which samples the Flux twin through it, reads it
    )
    # Start with a narrow posterior (std ~0.05): under SD's tiny KL weight the log-variance
    # would otherwise start at 0 and take Adam thousands of steps to shrink, while the decoder
    # learns from latents drowned in noise.
    with torch.no_grad():
        vae.quant_conv.bias[4:] = -6.0
    return vae


def make_text_encoder(s: Sizes, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.text_width,
        intermediate_size=4 * s.text_width,
        num_hidden_layers=s.text_layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        projection_dim=s.text_width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_unet(s: Sizes) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        block_out_channels=s.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=s.text_width,
        attention_head_dim=s.unet_heads,
        norm_num_groups=s.unet_groups,
    )


def load_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer, from the SD1.5 skeleton the package ships."""
    return CLIPTokenizer.from_pretrained(skeleton_dir("sd15") / "tokenizer")


# --- data ---------------------------------------------------------------------------------


def make_pool(count: int, seed: int, tokenizer: CLIPTokenizer,
              quiet: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """`count` training pictures (uint8, N x 3 x 64 x 64), their captions and token ids
    (N x 77)."""
    images, captions = [], []
    pictures = flat_shapes.training_images(count, SIZE, seed)
    for img, caption in tqdm(pictures, total=count, desc="drawing", leave=False, disable=quiet):
        images.append(img)
        captions.append(caption)
    return {
        "pixels": stack_pixels(images),
        "ids": tokenize(tokenizer, captions),
        "captions": captions,
    }


def codec_pool(count: int, seed: int, quiet: bool = False) -> torch.Tensor:
    """`count` generic pictures for the VAE (uint8, N x 3 x 64 x 64), no captions."""
    pictures = (codec_pictures.codec_picture(i, SIZE, seed) for i in range(count))
    return stack_pixels(list(tqdm(pictures, total=count, desc="drawing for the VAE", leave=False,
                                  disable=quiet)))  # fmt: skip


def stack_pixels(images: list) -> torch.Tensor:
    """RGB pictures as one uint8 N x 3 x H x W tensor."""
    return (
        torch.from_numpy(np.stack([np.asarray(img) for img in images]))
        .permute(0, 3, 1, 2)
        .contiguous()
    )


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids  # fmt: skip


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1


def step_generator(seed: int, phase: str, step: int) -> torch.Generator:
    """The generator of every random draw in one step: resuming replays the same draws."""
    # flux, zimage: the twins
    offset = {"vae": 1, "diffusion": 2, "decoder": 3, "flux": 4, "zimage": 5}[phase]
    return torch.Generator().manual_seed(seed * 1_000_003 + offset * 10_000_019 + step)


@dataclass(frozen=True)
class Team:
    """This process's place among the processes that share each step."""

    rank: int = 0
    size: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's slice of a batch drawn whole: the draws do not depend on `size`."""
        return batch.chunk(self.size)[self.rank]

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` with its gradients averaged over the team at each backward pass."""
        return DistributedDataParallel(module) if self.size > 1 else module

    def wait(self) -> None:
        """Until every process of the team is here."""
        if self.size > 1:
            dist.barrier()


# --- checkpoints: safetensors for tensors, JSON for the rest (no pickles) ------------------


def save_state(folder: Path, name: str, modules: dict[str, torch.nn.Module], opt, sched,
               step: int, ema: EMAModel | None = None) -> None:  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    for key, module in modules.items():
        save_model(module, str(folder / f"{name}-{key}.safetensors"))  # tied weights once
    state = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    save_file(tensors, folder / f"{name}-optimizer.safetensors")
    meta = {"step": step, "param_groups": state["param_groups"], "lr": sched.state_dict()}
    if ema is not None:
        save_file({str(i): p for i, p in enumerate(ema.shadow_params)},
                  folder / f"{name}-ema.safetensors")  # fmt: skip
        meta["ema_step"] = ema.optimization_step
    tmp = folder / f"{name}.json.tmp"
    tmp.write_text(json.dumps(meta))
    tmp.replace(folder / f"{name}.json")  # written last: the checkpoint is complete


def load_state(folder: Path, name: str, modules: dict[str, torch.nn.Module], opt, sched,
               ema: EMAModel | None = None) -> int:  # fmt: skip
    """Restore a checkpoint written by `save_state`; return its step (0 if there is none)."""
    meta_path = folder / f"{name}.json"
    if not meta_path.exists():
        return 0
    meta = json.loads(meta_path.read_text())
    for key, module in modules.items():
        load_model(module, str(folder / f"{name}-{key}.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for flat, tensor in load_file(folder / f"{name}-optimizer.safetensors").items():
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["lr"])
    if ema is not None:
        shadow = load_file(folder / f"{name}-ema.safetensors")
        ema.load_state_dict({"shadow_params": [shadow[str(i)] for i in range(len(shadow))],
                             "optimization_step": meta["ema_step"]})  # fmt: skip
    return meta["step"]


# --- phase 1: the VAE -----------------------------------------------------------------------


class Roundtrip(torch.nn.Module):
    """Encode, sample the posterior with the given noise, decode: one module for DDP to wrap.
    `whole=False` keeps the encoder out of the graph (the decoder phase)."""

    def __init__(self, vae: AutoencoderKL, whole: bool) -> None:
        super().__init__()
        self.vae, self.whole = vae, whole

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(self.whole and torch.is_grad_enabled()):
            posterior = self.vae.encode(x).latent_dist
            latents = posterior.mean + posterior.std * noise
        return self.vae.decode(latents).sample, posterior.kl().mean()


def train_autoencoder(vae: AutoencoderKL, pixels: torch.Tensor, args: argparse.Namespace,
                      phase: str, team: Team) -> None:  # fmt: skip
    """Phase 'vae': the whole VAE on reconstruction + a small KL. Phase 'decoder': the decoder
    alone, on latents of the now frozen encoder (those the UNet learned), for sharper pictures
    in truer colours, as SD's VAE decoder was fine-tuned after the fact."""
    whole = phase == "vae"
    steps = args.vae_steps if whole else args.decoder_steps
    vae.requires_grad_(True)
    if not whole:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.vae_lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, steps // 20, steps)
    start = load_state(args.work, phase, {"model": vae}, opt, sched) if args.resume else 0
    model = team.wrap(Roundtrip(vae, whole))
    vae.train()
    bar = tqdm(range(start, steps), desc="VAE" if whole else "VAE decoder", initial=start,
               total=steps, disable=not team.leader)  # fmt: skip
    for step in bar:
        gen = step_generator(args.seed, phase, step)
        idx = torch.randint(len(pixels), (args.vae_batch,), generator=gen)
        noise = torch.randn((args.vae_batch, 4, LATENT_SIZE, LATENT_SIZE), generator=gen)
        x = to_unit(pixels[team.share(idx)])
        recon, kl = model(x, team.share(noise))
        rec = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        # Colour over 4x4 areas: what halftone and hatching average to, and what the pixel
        # losses let drift while they chase edges.
        rec = rec + args.colour_weight * F.mse_loss(F.avg_pool2d(recon, 4), F.avg_pool2d(x, 4))
        loss = rec + args.kl_weight * kl if whole else rec
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{rec.item():.4f}")
        if team.leader and ((step + 1) % args.save_every == 0 or step + 1 == steps):
            save_state(args.work, phase, {"model": vae}, opt, sched, step + 1)
    vae.requires_grad_(False)
    vae.eval()


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, pixels: torch.Tensor, team: Team, batch: int = 256) -> dict:
    """Each picture's posterior mean and std (the diffusion phase samples from them), and the
    VAE's scaling factor: 1 / RMS of the sampled latents, as SD derives its 0.18215."""
    means, stds = [], []
    for start in tqdm(range(0, len(pixels), batch), desc="encoding", leave=False,
                      disable=not team.leader):  # fmt: skip
        posterior = vae.encode(to_unit(pixels[start : start + batch])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    mean, std = torch.cat(means), torch.cat(stds)
    spread = (mean.pow(2).mean() + std.pow(2).mean()).sqrt().item()
    vae.register_to_config(scaling_factor=round(1.0 / spread, 5))
    return {"mean": mean, "std": std}


# --- phase 2: text encoder and UNet --------------------------------------------------------


class Denoiser(torch.nn.Module):
    """The text encoder and the UNet as one module: what DDP wraps in the diffusion phase."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(tokens)[0]
        return self.unet(noisy, t, encoder_hidden_states=hidden).sample


def diffusion_loss(model: torch.nn.Module, scheduler: DDPMScheduler, latents: dict, ids,
                   empty_ids, gen: torch.Generator, args, team: Team) -> torch.Tensor:  # fmt: skip
    """Epsilon loss with min-SNR-gamma weights, on this process's share of a batch."""
    n, shape = args.batch, (args.batch, 4, LATENT_SIZE, LATENT_SIZE)
    idx = torch.randint(len(ids), (n,), generator=gen)
    sample_noise = torch.randn(shape, generator=gen)
    drop = torch.rand(n, generator=gen) < args.caption_dropout
    noise = torch.randn(shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=gen)
    idx, sample_noise, drop, noise, t = (team.share(x) for x in (idx, sample_noise, drop, noise, t))

    mean, std = latents["mean"][idx], latents["std"][idx]
    z = (mean + std * sample_noise) * args.scaling_factor
    tokens = ids[idx].clone()
    tokens[drop] = empty_ids
    pred = model(scheduler.add_noise(z, noise, t), t, tokens)
    snr = compute_snr(scheduler, t)
    weight = torch.clamp(snr, max=args.min_snr_gamma) / snr
    per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weight).mean()


def train_diffusion(unet, text_encoder, latents: dict, ids: torch.Tensor, empty_ids, args,
                    team: Team) -> None:  # fmt: skip
    """Train both; on return they hold the moving average of their weights."""
    scheduler = DDPMScheduler(**SCHEDULE, prediction_type="epsilon")
    modules = {"unet": unet, "text_encoder": text_encoder}

    def loss_of(model: torch.nn.Module, gen: torch.Generator) -> torch.Tensor:
        return diffusion_loss(model, scheduler, latents, ids, empty_ids, gen, args, team)

    train_denoiser(Denoiser(unet, text_encoder), modules, "diffusion", loss_of, args, team)


def train_denoiser(denoiser: torch.nn.Module, modules: dict[str, torch.nn.Module], phase: str,
                   loss_of, args: argparse.Namespace, team: Team) -> None:  # fmt: skip
    """`args.steps` steps of AdamW (warm-up, cosine) on `loss_of(model, generator)`, with an
    EMA of the weights, checkpoints of `modules` every `args.save_every` steps and `--resume`;
    on return `denoiser` holds the moving average. Both demo bases train so."""
    params = list(denoiser.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, min(200, args.steps // 10), args.steps)
    ema = EMAModel(params, decay=args.ema_decay, use_ema_warmup=True, power=3 / 4)
    start = load_state(args.work, phase, modules, opt, sched, ema) if args.resume else 0
    model = team.wrap(denoiser)
    denoiser.train()
    desc = " + ".join(modules)
    bar = tqdm(range(start, args.steps), desc=desc, initial=start, total=args.steps,
               disable=not team.leader)  # fmt: skip
    average = None
    for step in bar:
        loss = loss_of(model, step_generator(args.seed, phase, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        average = loss.item() if average is None else 0.98 * average + 0.02 * loss.item()
        bar.set_postfix(loss=f"{average:.4f}")
        if team.leader and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            save_state(args.work, phase, modules, opt, sched, step + 1, ema)
        if step + 1 == args.stop_after:
            # A process that stopped first would have the others ended, the leader perhaps
            # halfway through that checkpoint: each stops once it is written.
            team.wait()
            raise SystemExit(f"stopped after step {step + 1} (--stop-after); go on with --resume")
    ema.copy_to(params)
    denoiser.eval()


# --- the result -----------------------------------------------------------------------------


def write_pipeline(out: Path, vae, text_encoder, unet, tokenizer: CLIPTokenizer) -> None:
    """A complete SD1.5-layout diffusers folder in fp16, minus the tokenizer's BPE files."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SCHEDULE, **SAMPLING),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if out.exists():
        shutil.rmtree(out)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    ship_tokenizer_configs(out)
    give_umask_modes(out)  # save_pretrained writes safetensors 0600


def ship_tokenizer_configs(out: Path) -> None:
    """Replace the saved tokenizer (a 3.6 MB tokenizer.json) by the SD1.5 skeleton's tokenizer
    configs: the package ships the BPE files once, gzipped, and adds them when it loads."""
    shutil.rmtree(out / "tokenizer")
    shutil.copytree(source_dir("sd15") / "tokenizer", out / "tokenizer")


def pretraining_parser(description: str, out: Path, work: str) -> argparse.ArgumentParser:
    """The options both demo bases' scripts take: output, checkpoints, data and the joint
    diffusion phase's steps, batch and rates, processes and threads."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=out, help="the folder to write")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / work,
                   help=f"checkpoints, for --resume (default: runs/{work})")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny models, for tests")
    p.add_argument("--images", type=int, default=12000, help="captioned flat pictures drawn")
    p.add_argument("--steps", type=int, default=4000, help="denoiser + text encoder steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--save-every", type=int, default=250, help="checkpoint every N steps")
    p.add_argument("--stop-after", type=int, help="stop at this step, as if interrupted (tests)")
    p.add_argument("--processes", type=int, default=2, help="processes sharing each step")
    # One thread per process: bitwise reproducible on any machine with the same torch, and on
    # a 2-core machine faster than threads waiting on each other.
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    return p


def check_batches(p: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Each batch is split evenly between the processes."""
    for name in names:
        if getattr(args, name) % args.processes:
            p.error(f"--{name.replace('_', '-')} must be a multiple of --processes")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = pretraining_parser(__doc__.splitlines()[0], DEFAULT_OUT, "demo-base-pretrain")
    p.add_argument("--codec-images", type=int, default=12000, help="generic pictures, for the VAE")
    p.add_argument("--vae-steps", type=int, default=4000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--colour-weight", type=float, default=10.0, help="4x4 mean colour loss")
    p.add_argument("--decoder-steps", type=int, default=1000, help="decoder-only steps, last")
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    args = p.parse_args(argv)
    check_batches(p, args, "batch", "vae_batch")
    return args


def main(argv: list[str] | None = None) -> None:
    launch(parse_args(argv), pretrain)


def launch(args: argparse.Namespace, pretrain) -> None:
    """Run `pretrain(args, team)` in this process, or in `args.processes` that share each step."""
    if args.processes == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            pretrain(args, Team())
        finally:  # called in-process (the tests), the caller keeps its own thread count
            torch.set_num_threads(threads)
        return
    try:
        mp.spawn(worker, args=(args, free_port(), pretrain), nprocs=args.processes)
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as exc:
        raise SystemExit(f"pretraining stopped ({exc}); --resume goes on from the last "
                         "checkpoint") from None  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, args: argparse.Namespace, port: int, pretrain) -> None:
    torch.set_num_threads(args.threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.processes)  # fmt: skip
    try:
        pretrain(args, Team(rank, args.processes))
    finally:
        dist.destroy_process_group()


def pretrain(args: argparse.Namespace, team: Team) -> None:
    if team.leader and not args.resume and args.work.exists():
        shutil.rmtree(args.work)
    started = time.perf_counter()
    sizes = TINY if args.tiny else FULL
    tokenizer = load_tokenizer()
    pool = make_pool(args.images, args.seed, tokenizer, quiet=not team.leader)
    # The VAE learns from the flat pictures and as many generic ones (codec_pictures.py)
    codec = codec_pool(args.codec_images, args.seed, quiet=not team.leader)
    vae_pixels = torch.cat([pool["pixels"], codec])
    torch.manual_seed(args.seed)
    vae, text_encoder, unet = make_vae(sizes), make_text_encoder(sizes, tokenizer), make_unet(sizes)
    train_autoencoder(vae, vae_pixels, args, "vae", team)
    latents = encode_pool(vae, pool["pixels"], team)
    args.scaling_factor = vae.config.scaling_factor
    empty_ids = tokenize(tokenizer, [""])[0]
    train_diffusion(unet, text_encoder, latents, pool["ids"], empty_ids, args, team)
    train_autoencoder(vae, vae_pixels, args, "decoder", team)
    if not team.leader:
        return
    write_pipeline(args.out, vae, text_encoder, unet, tokenizer)
    minutes = (time.perf_counter() - started) / 60
    size_mb = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 1e6
    print(f"wrote {args.out} ({size_mb:.1f} MB) in {minutes:.1f} min")


if __name__ == "__main__":
    main()
