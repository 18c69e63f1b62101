"""`cnx pretrain-tiny OUT_DIR`: train the tiny stand-in SVD on synthetic dancers, on a CPU.

The random-weight stand-in (`cnx.tiny`) exercises every code path but has
nothing to fine-tune: its VAE cannot reconstruct a frame and its UNet knows no
video. This module trains one that plays the part of the pretrained SVD that
ControlNeXt training starts from, with the same component classes and configs
as `cnx.tiny.write_tiny_svd`, in two stages on fresh synthetic clips
(`cnx.synth`: a new random dancer for every clip of every step):

1. the VAE (`AutoencoderKLTemporalDecoder`): reconstruction, MSE on pixels (of crops)
   plus a small KL term and a colour anchor (`vae_loss`), the temporal decoder
   started per frame (`start_per_frame`) decoding clips of `vae_frames` frames, its temporal
   layers skipped in the first steps (`temporal_layers_skipped`), which draw a dancer per
   frame (`vae_batch`); scored by PSNR on held-out dancers (`cnx.metrics.psnr`);
2. the UNet as an image-to-video model without pose: SVD's objective exactly as
   `cnx.step.training_step` computes it (first frame -> reference latent and
   CLIP embedding, log-normal sigmas, EDM preconditioning, conditioning
   dropout), with the trained VAE and the stand-in's CLIP encoder frozen;
   scored by the loss on a fixed held-out batch with fixed noise and sigmas.

Both are stored in half precision (`cast_weights`) to keep the folder small.

Every random draw comes from a generator seeded by (stage, seed, step) through
`cnx.seeding`; the global RNGs are left as they were. The folder is written with
`save_pretrained` (safetensors) plus README.md and pretrain_report.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from cnx import edm
from cnx.seeding import derive_seed, stream_generator
from cnx.step import Models, Objective, heldout_step, training_step
from cnx.tiny import save_svd_folder

INITIAL_LOGVAR = -6.0  # the VAE posterior's starting log-variance (bias of quant_conv's logvar half)
HELDOUT_STREAM = "pretrain-heldout"  # held-out dancers: a stream no training step draws from


@dataclass(frozen=True)
class PretrainConfig:
    """The defaults fit about 30 minutes on 2 CPU cores that compute bfloat16 natively (measured;
    see the README it writes)."""

    seed: int = 0  # weights, data and noise are a function of the seed alone
    width: int = 128  # frame width in pixels (the tiny profile's)
    height: int = 192  # frame height in pixels
    unet_width: int = 64  # first UNet block width (SVD: 320); at 32 its norms lose the colour (`cnx.tiny`)
    unet_inner_width: int = 64  # second UNet block width (SVD: 640)
    vae_width: int = 64  # VAE block width; at 32 the decoder's last GroupNorm (32 groups) loses hue
    vae_steps: int = 4000  # VAE optimizer steps
    vae_batch_size: int = 4  # clips per VAE step; while the temporal layers are skipped, a dancer per frame
    vae_frames: int = 2  # frames per VAE clip: the temporal decoder decodes them together
    vae_crop: int = 64  # square crop of every VAE clip, a multiple of 8 (0: whole frames)
    vae_lr: float = 1e-3  # AdamW, cosine decay to 0 after a short warm-up
    kl_weight: float = 1e-6  # weight of the summed KL per frame (Stable Diffusion's VAE: 1e-6)
    colour_anchor: float = 1.0  # weight of the latents' colour anchor (`vae_loss`); 0: none
    anchor_decay: bool = True  # the anchor's weight follows the learning rate's cosine to 0
    per_frame_start: bool = True  # the decoder's temporal layers start as identity (`start_per_frame`)
    vae_skip_temporal: float = 0.8  # share of VAE steps, the first ones, that skip the temporal layers
    bf16: bool = True  # training steps under bfloat16 autocast (`training_precision`); held-out in float32
    float16: bool = True  # store the VAE and the UNet in float16 (half the bytes; they load as float32)
    unet_steps: int = 600  # UNet optimizer steps (800 at 3e-4: 30 minutes in slow spells, README)
    batch_size: int = 1  # clips per UNet step
    num_frames: int = 8  # frames per UNet clip, and the pipeline's default frame count
    interval: int = 3  # frames between clip frames (the tiny profile's interval_frame)
    unet_lr: float = 6e-4  # AdamW, cosine decay to 0 after a short warm-up; 3e-4 fell short at 600 steps
    heldout_clips: int = 8  # held-out dancers for the VAE's PSNR and the UNet's loss
    heldout_sigmas: int = 4  # noise levels per held-out clip (quantiles of the log-normal)
    warmup: int = 50  # learning-rate warm-up steps of both stages

    def problems(self) -> list[str]:
        """What is wrong with these settings, one line each (empty: fine), found before any training."""
        found = []
        for name in ("width", "height"):
            if getattr(self, name) < 16 or getattr(self, name) % 16:
                found.append(
                    f"--{name} must be a positive multiple of 16 (VAE 8x, UNet 2x), got {getattr(self, name)}"
                )
        for name in ("unet_width", "unet_inner_width", "vae_width"):
            if getattr(self, name) < 32 or getattr(self, name) % 32:
                found.append(
                    f"--{name} must be a positive multiple of 32 (32 norm groups), got {getattr(self, name)}"
                )
        counts = ("vae_batch_size", "vae_frames", "batch_size", "num_frames", "interval", "heldout_clips")
        for name in (*counts, "heldout_sigmas"):
            if getattr(self, name) < 1:
                found.append(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("vae_steps", "unet_steps", "warmup"):
            if getattr(self, name) < 0:
                found.append(f"--{name} must not be negative, got {getattr(self, name)}")
        for name in ("vae_lr", "unet_lr"):
            if not getattr(self, name) > 0:
                found.append(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("kl_weight", "colour_anchor"):
            if not getattr(self, name) >= 0:
                found.append(f"--{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.vae_skip_temporal <= 1:
            found.append(f"--vae_skip_temporal must be a share from 0 to 1, got {self.vae_skip_temporal}")
        elif self.vae_skip_temporal and not self.per_frame_start:
            found.append(
                "--vae_skip_temporal needs --per_frame_start True: only temporal layers started as "
                f"identity can be skipped, got {self.vae_skip_temporal} with --per_frame_start False"
            )
        if self.vae_crop and (
            self.vae_crop < 0 or self.vae_crop % 8 or self.vae_crop > min(self.width, self.height)
        ):
            found.append(
                f"--vae_crop must be 0 or a multiple of 8 that fits {self.width}x{self.height}, "
                f"got {self.vae_crop}"
            )
        return found


# ---------------------------------------------------------------------------------------------
# Synthetic clips


def synthetic_clip(rng: np.random.Generator, num_frames: int, interval: int, width: int, height: int):
    """(F, 3, H, W) float32 frames in [-1, 1]: a fresh random dancer, frames `interval` apart."""
    from cnx.synth import _background, random_dancer, render_frame

    span = (num_frames - 1) * interval + 1
    start = int(rng.integers(0, 2 * span))  # a random stretch of a longer dance
    dancer = random_dancer(rng, num_frames=start + span, width=width, height=height)
    background = _background(dancer)
    frames = [render_frame(dancer, start + i * interval, background)[0] for i in range(num_frames)]
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    return video / 127.5 - 1.0


def synthetic_batch(stream: tuple, batch_size: int, num_frames: int, interval: int, width: int, height: int):
    """(B, F, 3, H, W) clips, clip b from the numpy Generator seeded by (*stream, b)."""
    clips = [
        synthetic_clip(np.random.default_rng(derive_seed(*stream, b)), num_frames, interval, width, height)
        for b in range(batch_size)
    ]
    return torch.stack(clips)


def training_precision(config: PretrainConfig):
    """The autocast context of a training step: bfloat16 when `config.bf16`, else plain float32.

    Measured on 2 cores with native bfloat16 (avx512_bf16): a VAE step 547 -> 396 ms, a UNet step
    750 -> 450 ms. Weights, optimizer states and the loss stay float32. On a GPU (same recipe,
    2140 VAE steps) the held-out PSNR reached 26.5 dB under bf16 against 25.7 dB for 1620 float32
    steps, the same CPU time.
    """
    return torch.autocast("cpu", torch.bfloat16, enabled=config.bf16)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _optimizer(params, lr: float, total: int, warmup: int):
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, total, warmup))
    return optimizer, schedule


# ---------------------------------------------------------------------------------------------
# Stage 1: the VAE


def random_crop(clips: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """(B, F, 3, size, size): one square window per clip, at multiples of 8; size 0 keeps the frames.

    Small crops make VAE steps several times cheaper; the decoder is convolutional, so it
    reconstructs whole frames after training on crops (the held-out PSNR is on whole frames).
    """
    if not size:
        return clips
    height, width = clips.shape[-2:]
    if size % 8 or size > min(height, width):
        raise ValueError(f"vae_crop must be a multiple of 8 and fit {width}x{height}, got {size}")
    windows = []
    for clip in clips:
        y = int(rng.integers(0, (height - size) // 8 + 1)) * 8
        x = int(rng.integers(0, (width - size) // 8 + 1)) * 8
        windows.append(clip[..., y : y + size, x : x + size])
    return torch.stack(windows)


def vae_loss(
    vae, clips: torch.Tensor, kl_weight: float, generator: torch.Generator, colour_anchor: float = 0.0
) -> torch.Tensor:
    """MSE of the reconstruction of (B, F, 3, H, W) clips, plus kl_weight * KL per frame, plus
    colour_anchor * MSE between the posterior mean's first three channels and the frames
    averaged over the 8x8 pixels each latent covers.

    Why the anchor: on MSE alone the tiny VAE spends its 4 channels on brightness and edges,
    and its reconstructions stay grey for thousands of steps (chroma error equal to the
    chroma variance, measured). Pinning three channels to the local colour gives the decoder
    colour from the first step and leaves latents that look like a small image, as SVD's do.
    """
    num_frames = clips.shape[1]
    frames = clips.flatten(0, 1)  # (B*F, 3, H, W)
    posterior = vae.encode(frames).latent_dist
    latents = posterior.sample(generator=generator)  # (B*F, 4, H/8, W/8)
    recon = vae.decode(latents, num_frames=num_frames).sample.float()  # (B*F, 3, H, W)
    loss = (recon - frames).square().mean() + kl_weight * posterior.kl().float().mean()
    if colour_anchor:
        colour = torch.nn.functional.avg_pool2d(frames, 8)  # (B*F, 3, H/8, W/8)
        loss = loss + colour_anchor * (posterior.mean[:, :3].float() - colour).square().mean()
    return loss


@torch.no_grad()
def reconstruct(vae, clips: torch.Tensor) -> torch.Tensor:
    """(B, F, 3, H, W) reconstructions of clips in [-1, 1] from the posterior's mode, clamped."""
    batch, num_frames = clips.shape[:2]
    latents = vae.encode(clips.flatten(0, 1)).latent_dist.mode()
    recon = vae.decode(latents, num_frames=num_frames).sample.clamp(-1, 1)
    return recon.reshape(clips.shape)


def heldout_psnr(vae, clips: torch.Tensor) -> float:
    """Mean PSNR (dB, `cnx.metrics.psnr`) of the held-out frames through the VAE."""
    from cnx.metrics import psnr

    recon = reconstruct(vae, clips)
    to_unit = lambda x: ((x.flatten(0, 1) + 1) / 2).permute(0, 2, 3, 1)  # noqa: E731 (N, H, W, 3)
    return float(psnr(to_unit(recon), to_unit(clips)).mean())


@torch.no_grad()
def latent_scaling_factor(vae, clips: torch.Tensor) -> float:
    """1 / std of the held-out latents (Stable Diffusion's recipe): scaled latents have std ~1."""
    latents = vae.encode(clips.flatten(0, 1)).latent_dist.mode()
    return float(round(1.0 / latents.std().item(), 5))


def cast_weights(module: torch.nn.Module, *dtypes: torch.dtype) -> torch.nn.Module:
    """Cast the weights in place through each dtype in turn.

    With `float16` the VAE and the UNet are stored in float16 (half the bytes: 64-wide models
    then fit the 12 MB folder). `from_pretrained` loads float16 files as float32 unless told a
    dtype, so after each stage its weights are rounded through float16 and kept float32: the
    held-out figures, and the UNet stage, see exactly what users load.
    """
    for param in module.parameters():
        for dtype in dtypes:
            param.data = param.data.to(dtype)
    return module


@torch.no_grad()
def start_per_frame(vae) -> None:
    """Make the temporal decoder's time mixing start as identity: each frame decodes on its own.

    Its temporal resnets are residual, so a zero last conv makes them pass their input through,
    and `time_conv_out` becomes the identity on the centre frame. From random weights, a decoder
    trained on 2-frame clips learns to undo its own random mixing for a first and a last frame
    only: decoded 8 at a time, the validation dancer's middle frames came out blurred and tinted
    (21.2-25.3 dB against 27.1-27.8 in pairs, measured). Started per frame, the same 8 frames
    decode at 26.8-27.0 dB whole or in chunks.
    """
    for module in vae.decoder.modules():
        if type(module).__name__ == "TemporalResnetBlock":
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
    time_conv = vae.decoder.time_conv_out  # Conv3d(3, 3, kernel (3, 1, 1)) over frames
    time_conv.weight.zero_()
    time_conv.weight[:, :, 1, 0, 0] = torch.eye(time_conv.out_channels)
    time_conv.bias.zero_()


def steps_skipping_temporal(share: float, vae_steps: int) -> int:
    """How many of the VAE's steps, the first ones, skip the temporal layers."""
    return round(share * vae_steps)


def _spatial_only(block, hidden_states, temb=None, image_only_indicator=None):
    return block.spatial_res_block(hidden_states, temb)


@contextmanager
def temporal_layers_skipped(vae, skip: bool = True):
    """Within it (when `skip`), the decoder's spatio-temporal resnets run their spatial half only.

    Started per frame (`start_per_frame`), their temporal resnets are the identity, and the
    mixer that blends those with the spatial output then gets the same tensor twice: skipping
    both leaves the decoder's output as it was (up to rounding), and the mixer's weight had no
    gradient anyway. Training steps get cheaper: on 2 cores, 311-330 ms a VAE step that runs
    them, 226-235 ms one that skips them (batches drawn in turn, measured back to back). So the
    VAE first learns to code frames, then its temporal layers learn to use their neighbours.
    """
    blocks = [m for m in vae.decoder.modules() if type(m).__name__ == "SpatioTemporalResBlock"]
    blocks = blocks if skip else []
    for block in blocks:
        block.forward = partial(_spatial_only, block)  # shadows the class's forward
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def contiguous_group_norms(module: torch.nn.Module) -> list:
    """Make every GroupNorm in `module` take its input in the default (contiguous) layout.

    Under bf16 autocast on a CPU, oneDNN's convolutions hand back channels-last tensors, and
    GroupNorm's backward on those is far slower than on contiguous ones: in a VAE step, 16.6 ms
    against 1.2 ms a call at 8x64x64x64, half of the step. Copying the input first costs one
    copy and gives the same numbers: a VAE step of 505-531 ms took 334-375 ms (2 cores,
    avx512_bf16). Only where a backward follows: a forward alone is faster without the copy (the
    held-out PSNR of 8 clips took 5.1 s copied, 3.7-4.1 s not), and so are the UNet's steps
    (517 -> 687 ms with every norm copied), so this is for the VAE's training alone. Returns the
    hooks' handles; `handle.remove()` undoes it.
    """

    def make_contiguous(norm, args):
        return (args[0].contiguous(), *args[1:]) if torch.is_grad_enabled() else None  # None: unchanged

    return [
        norm.register_forward_pre_hook(make_contiguous)
        for norm in module.modules()
        if isinstance(norm, torch.nn.GroupNorm)
    ]


def _conv3d_over_frames_as_conv2d(conv, hidden_states):
    """`conv` (kernel (k, 1, 1)) on (B, C, F, H, W) as the Conv2d with kernel (k, 1) on (B, C, F, H*W)."""
    out = torch.nn.functional.conv2d(
        hidden_states.flatten(3),
        conv.weight.squeeze(-1),  # (O, C, k, 1)
        conv.bias,
        stride=(conv.stride[0], 1),
        padding=(conv.padding[0], 0),
        dilation=(conv.dilation[0], 1),
        groups=conv.groups,
    )
    return out.unflatten(3, hidden_states.shape[3:])  # (B, O, F', H, W)


@contextmanager
def temporal_convs_as_conv2d(vae):
    """Within it, every Conv3d of the decoder (the temporal resnets' convs and `time_conv_out`,
    all kernels (3, 1, 1) over frames) computes as the same Conv2d over (frames, pixels).

    oneDNN's multi-threaded bfloat16 weight gradient of these Conv3d is unsafe on CPU (torch
    2.13, AMX): on whole 128x192 frames (`--vae_crop 0`) it hung in its reduction, and on
    64-crops the full-resolution temporal convs' gradients were now and then garbage (400 where
    repeats of the same backward gave 0). The Conv2d computes the same sums, and its bfloat16
    gradients repeat exactly (measured at 2 threads: 4 runs of 8 repeats, and whole frames); a
    step that runs the temporal layers took 335 ms against 404 ms with these convs in float32,
    the previous way round the race. UNet training never computes them.
    """
    convs = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv3d)]
    for conv in convs:
        if conv.kernel_size[1:] != (1, 1) or conv.padding[1:] != (0, 0) or conv.stride[1:] != (1, 1):
            raise ValueError(f"{conv} mixes pixels: only convs over frames alone compute as a Conv2d")
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"{conv} pads with {conv.padding_mode!r}: only zero padding computes as a Conv2d"
            )
    for conv in convs:
        conv.forward = partial(_conv3d_over_frames_as_conv2d, conv)  # shadows the class's forward
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward


def vae_batch(config: PretrainConfig, step: int, skip: bool) -> torch.Tensor:
    """The clips of VAE step `step`, each cropped: (B, F, 3, crop, crop) in [-1, 1], F =
    `vae_frames`; while the temporal layers are skipped, (B*F, 1, 3, crop, crop).

    Why single frames then: skipped, the decoder codes every frame alone, and two frames of one
    clip, `interval` apart under the same crop, are near duplicates. A dancer per frame gives
    the step twice the distinct pictures for the same compute (drawing 8 one-frame dancers took
    46.2 ms, 4 two-frame ones 45.7 ms): 800-step runs reached 25.13 dB against 24.40 dB.
    """
    clips, frames = config.vae_batch_size, config.vae_frames
    if skip:
        clips, frames = clips * frames, 1
    batch = synthetic_batch(
        ("pretrain-vae", config.seed, step), clips, frames, config.interval, config.width, config.height
    )
    crop_rng = np.random.default_rng(derive_seed("pretrain-crop", config.seed, step))
    return random_crop(batch, config.vae_crop, crop_rng)


def train_vae(vae, config: PretrainConfig, heldout: torch.Tensor, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    # A random VAE's posterior has std ~1 around means near 0: sampled latents are mostly noise,
    # and a KL weight of 1e-6 takes thousands of steps to shrink it. Start from std e^-3 instead.
    with torch.no_grad():
        channels = vae.config.latent_channels
        vae.quant_conv.bias[channels:] = INITIAL_LOGVAR
    if config.per_frame_start:
        start_per_frame(vae)
    vae.train().requires_grad_(True)
    hooks = contiguous_group_norms(vae)
    optimizer, schedule = _optimizer(vae.parameters(), config.vae_lr, config.vae_steps, config.warmup)
    before = heldout_psnr(vae.eval(), heldout)
    vae.train()

    skipped = steps_skipping_temporal(config.vae_skip_temporal, config.vae_steps)
    # Batches are drawn in turn. The previous code drew them in a thread and skipped the temporal
    # resnets alone: back to back, its skipping steps took 310-322 ms, this code's 229-230 ms.
    bar = tqdm(range(config.vae_steps), "stage 1: VAE", disable=not progress)
    try:
        # In force for every step, the held-out figures too (the same sums).
        with temporal_convs_as_conv2d(vae):
            for step in bar:
                skip = step < skipped
                clips = vae_batch(config, step, skip)  # fresh dancers
                noise = stream_generator("pretrain-vae-noise", config.seed, step)
                # Decayed, the anchor gives colour early and frees the three channels for detail late.
                anchor = config.colour_anchor * (
                    cosine_lr(step, config.vae_steps, config.warmup) if config.anchor_decay else 1
                )
                with training_precision(config), temporal_layers_skipped(vae, skip):
                    loss = vae_loss(vae, clips, config.kl_weight, noise, anchor)
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if (step + 1) % max(1, config.vae_steps // 4) == 0 and step + 1 < config.vae_steps:
                    psnr = heldout_psnr(vae.eval(), heldout)
                    bar.write(f"stage 1: step {step + 1}: held-out PSNR {psnr:.2f} dB")
                    vae.train()
    finally:
        for hook in hooks:
            hook.remove()
    vae.eval().requires_grad_(False)
    if config.float16:
        cast_weights(vae, torch.float16, torch.float32)  # what is stored and what users load
    after = heldout_psnr(vae, heldout)
    print(f"stage 1: held-out PSNR {before:.2f} dB (untrained) -> {after:.2f} dB ({len(heldout)} clips)")
    return {"heldout_psnr_untrained": before, "heldout_psnr": after}


# ---------------------------------------------------------------------------------------------
# Stage 2: the UNet, image-to-video without pose


class WithoutControl(torch.nn.Module):
    """The UNet behind the model interface of `cnx.step.training_step`, the pose ignored."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, embeddings, time_ids, pose_frames=None, control_scale=None):
        return self.unet(sample, timestep, embeddings, time_ids)


# SVD's own objective is ControlNeXt's training step with the control off (same dropout, sigmas).
SVD_OBJECTIVE = Objective(control_scale=0.0)


def svd_loss(
    models, pixels: torch.Tensor, generator: torch.Generator, sigma: torch.Tensor | None = None
) -> torch.Tensor:
    """(B,) SVD's per-sample loss of (B, F, 3, H, W) clips in [-1, 1], conditioned on their first frame.

    `cnx.step.training_step` with no pose and no hand weights; `sigma` (B,) fixes the
    noise levels and turns the conditioning dropout off, as for held-out losses.
    """
    batch = {
        "pixel_values": pixels,
        "reference_image": pixels[:, 0],  # SVD animates its conditioning frame
        "pose_frames": torch.zeros(0),
        "hand_weights": torch.ones_like(pixels[:, :, :1]),  # (B, F, 1, H, W): every position weighs 1
    }
    if sigma is None:
        return training_step(models, batch, SVD_OBJECTIVE, generator).per_sample
    return heldout_step(models, batch, sigma, SVD_OBJECTIVE.control_scale, generator).per_sample


@torch.no_grad()
def heldout_unet_loss(models, clips: torch.Tensor, num_sigmas: int) -> float:
    """Mean loss over held-out clips x fixed sigmas, fixed noise, no dropout: comparable across runs."""
    losses = []
    for i, sigma in enumerate(edm.lognormal_quantiles(num_sigmas)):
        generator = stream_generator(HELDOUT_STREAM, "noise", i)
        losses.append(svd_loss(models, clips, generator, sigma.expand(len(clips))))
    return float(torch.cat(losses).mean())


def train_unet(
    unet, vae, image_encoder, config: PretrainConfig, heldout: torch.Tensor, progress=True
) -> dict:
    from tqdm.auto import tqdm

    models = Models(vae, image_encoder, None, WithoutControl(unet), torch.float32)
    unet.eval()
    start = heldout_unet_loss(models, heldout, config.heldout_sigmas)
    unet.train().requires_grad_(True)
    optimizer, schedule = _optimizer(unet.parameters(), config.unet_lr, config.unet_steps, config.warmup)
    bar = tqdm(range(config.unet_steps), desc="stage 2: UNet", disable=not progress)
    for step in bar:
        # Fresh clips: (B, F, 3, H, W) in [-1, 1].
        pixels = synthetic_batch(
            ("pretrain-unet", config.seed, step),
            config.batch_size,
            config.num_frames,
            config.interval,
            config.width,
            config.height,
        )
        generator = stream_generator("pretrain-unet-noise", config.seed, step)
        with training_precision(config):
            loss = svd_loss(models, pixels, generator).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval().requires_grad_(False)
    if config.float16:
        cast_weights(unet, torch.float16, torch.float32)  # what is stored and what users load
    end = heldout_unet_loss(models, heldout, config.heldout_sigmas)
    print(f"stage 2: held-out loss {start:.4f} (untrained) -> {end:.4f}")
    return {"heldout_loss_start": start, "heldout_loss_end": end}


# ---------------------------------------------------------------------------------------------
# The folder


def command_line(out_dir: Path, config: PretrainConfig) -> str:
    flags = " ".join(f"--{k} {v}" for k, v in asdict(config).items())
    return f"cnx pretrain-tiny {shlex.quote(str(out_dir))} {flags}"


README = """# Pretrained tiny SVD (synthetic dancers)

A tiny Stable Video Diffusion pipeline trained on a CPU by `cnx pretrain-tiny`:
the stand-in for `stabilityai/stable-video-diffusion-img2vid-xt-1-1` that
ControlNeXt training starts from. The component classes of `cnx tiny-model`'s
stand-in, with UNet widths {unet_width} and {unet_inner_width} and VAE width {vae_width}, and
trained weights.{storage}

How it was made, from fresh random synthetic dancers (`cnx.synth`) every step:
1. VAE (AutoencoderKLTemporalDecoder): {vae_steps} steps, batch size {vae_batch_size}, clips of
   {vae_frames} frames at {width}x{height}{per_frame_batches}, each clip cropped to
   {vae_crop}x{vae_crop} (0: whole frames), MSE + {kl_weight} KL{anchor}; held-out PSNR on
   whole frames {psnr_before:.2f} dB (untrained) -> {psnr:.2f} dB. Latent scaling_factor set to
   {scaling:.5f} (1 / std).{temporal}
2. UNet (UNetSpatioTemporalConditionModel), image-to-video without pose: {unet_steps} steps,
   batch size {batch_size}, clips of {num_frames} frames {interval} frames apart, SVD's EDM objective
   conditioned on the first frame (log-normal sigmas, conditioning dropout), VAE and CLIP
   image encoder frozen (the CLIP encoder keeps the stand-in's random weights); held-out
   loss {loss_start:.4f} -> {loss_end:.4f}.
{precision}
Figures and timings: pretrain_report.json. Reproduce it (same seed, same figures; on the same
CPU, the same bytes) with

    {command}

Load it with `StableVideoDiffusionPipeline.from_pretrained(folder)` or
`cnx.pipeline.ControlNeXtSVDPipeline.from_pretrained(folder)`.
"""


BF16_NOTE = """
Both stages computed their training steps under bfloat16 autocast (weights, optimizer and
held-out figures in float32): that is what fits 30 minutes on 2 cores with native bfloat16.
The VAE decoder's Conv3d layers over frames computed as the same Conv2d over (frames, pixels)
(`temporal_convs_as_conv2d`): oneDNN's threaded bfloat16 weight gradient of Conv3d is unreliable
on CPU.
"""
TEMPORAL_PER_FRAME = """ Its temporal
   decoder started per frame (`start_per_frame`) and trained on clips of {vae_frames} frames
   ({skipping}): clips of any length decode alike, whole or in chunks (`decode_chunk_size`)."""
TEMPORAL_RANDOM = """ Its temporal
   decoder started from random weights and has only seen clips of {vae_frames} frames: a clip
   decoded in chunks of {vae_frames} (`decode_chunk_size`) comes back sharper than one decoded
   whole, whose middle frames blur and tint."""


def readme(report: dict) -> str:
    """The folder's README.md, from its pretrain_report.json."""
    vae, unet, config = report["vae"], report["unet"], report["config"]
    anchor = config["colour_anchor"]
    decay = ", decaying with the learning rate" if config["anchor_decay"] else ""
    anchored = f"latent channels 0-2 towards each 8x8 block's mean colour{decay}"
    skipped = steps_skipping_temporal(config.get("vae_skip_temporal", 0), config["vae_steps"])
    skipping = (
        f"its temporal layers skipped in the first {skipped} steps, `temporal_layers_skipped`, "
        f"and trained in the last {config['vae_steps'] - skipped}"
        if skipped
        else "its temporal layers trained in every step"
    )
    frames = config["vae_batch_size"] * config["vae_frames"]
    return README.format(
        **config,
        per_frame_batches=f" ({frames} frames of as many dancers while the temporal layers were skipped)"
        if skipped
        else "",
        anchor=f" + {anchor} x colour anchor ({anchored})" if anchor else "",
        temporal=(TEMPORAL_PER_FRAME if config["per_frame_start"] else TEMPORAL_RANDOM).format(
            **config, skipping=skipping
        ),
        precision=BF16_NOTE if config.get("bf16") else "",
        storage=" The VAE and the UNet are stored in float16 (they load as float32)."
        if config["float16"]
        else "",
        psnr_before=vae["heldout_psnr_untrained"],
        psnr=vae["heldout_psnr"],
        scaling=vae["scaling_factor"],
        loss_start=unet["heldout_loss_start"],
        loss_end=unet["heldout_loss_end"],
        command=report["command"],
    )


def heldout_sets(config: PretrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out dancers: (B, vae_frames, 3, H, W) clips for the VAE, (B, num_frames, ...) for the UNet."""
    size = (config.interval, config.width, config.height)
    return (
        synthetic_batch((HELDOUT_STREAM, "vae"), config.heldout_clips, config.vae_frames, *size),
        synthetic_batch((HELDOUT_STREAM, "unet"), config.heldout_clips, config.num_frames, *size),
    )


def pretrain(out_dir: str | Path, config: PretrainConfig = PretrainConfig(), progress: bool = True) -> dict:
    """Train both stages and write the pipeline folder, README.md and pretrain_report.json; the report."""
    from cnx.tiny import build_tiny_components, folder_size

    out_dir = Path(out_dir)
    if problems := config.problems():
        raise ValueError("; ".join(problems))
    with torch.random.fork_rng():  # nothing here draws from the global RNG; leave it as it was anyway
        unet, vae, image_encoder, scheduler = build_tiny_components(
            config.seed, config.unet_width, config.vae_width, config.num_frames, config.unet_inner_width
        )
        image_encoder.requires_grad_(False).eval()
        heldout_frames, heldout_clips = heldout_sets(config)

        started = time.perf_counter()
        vae_report = train_vae(vae, config, heldout_frames, progress)
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, heldout_frames))
        vae_seconds = time.perf_counter() - started

        started = time.perf_counter()
        unet_report = train_unet(unet, vae, image_encoder, config, heldout_clips, progress)
        unet_seconds = time.perf_counter() - started

    if config.float16:
        for model in (vae, unet):
            cast_weights(model, torch.float16)
    save_svd_folder(out_dir, unet, vae, image_encoder, scheduler)
    report = {
        "config": asdict(config),
        "vae": vae_report
        | {
            "steps": config.vae_steps,
            "seconds": round(vae_seconds, 1),
            "scaling_factor": vae.config.scaling_factor,
        },
        "unet": unet_report | {"steps": config.unet_steps, "seconds": round(unet_seconds, 1)},
        "heldout": {
            "clips": config.heldout_clips,
            "sigmas": edm.lognormal_quantiles(config.heldout_sigmas).tolist(),
        },
        "command": command_line(out_dir, config),
    }
    (out_dir / "README.md").write_text(readme(report))
    report["weights_and_readme_bytes"] = folder_size(out_dir)
    (out_dir / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _true_or_false(text: str) -> bool:
    if text not in ("True", "False"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return text == "True"


def parse_args(argv: list[str] | None = None) -> tuple[Path, PretrainConfig]:
    parser = argparse.ArgumentParser(prog="cnx pretrain-tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the pipeline into")
    for name, value in asdict(PretrainConfig()).items():
        kind = _true_or_false if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name}", type=kind, default=value)
    args = vars(parser.parse_args(argv))
    out_dir, config = args.pop("out_dir"), PretrainConfig(**args)
    if problems := config.problems():
        parser.error("\n".join(problems))
    return out_dir, config


def main(argv: list[str] | None = None) -> int:
    from cnx.profiles import cpu_has_bfloat16, quiet_known_warnings
    from cnx.tiny import folder_size

    out_dir, config = parse_args(argv)
    quiet_known_warnings()
    if config.bf16 and not cpu_has_bfloat16():
        print(
            "note: this CPU has no native bfloat16 (avx512_bf16 / amx_bf16), so --bf16 True is emulated "
            "and slower than float32 here; --bf16 False trains in float32 (results differ slightly)"
        )
    started = time.perf_counter()
    report = pretrain(out_dir, config)
    vae, unet = report["vae"], report["unet"]
    print(
        f"pretrained tiny SVD: {out_dir} ({folder_size(out_dir) / 1e6:.1f} MB, "
        f"{time.perf_counter() - started:.0f} s); VAE held-out PSNR {vae['heldout_psnr']:.2f} dB, "
        f"UNet held-out loss {unet['heldout_loss_start']:.4f} -> {unet['heldout_loss_end']:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
