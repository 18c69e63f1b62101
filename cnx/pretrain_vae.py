"""Stage 1 of `cnx pretrain-tiny`: the VAE (`AutoencoderKLTemporalDecoder`) learns to code frames.

Reconstruction, MSE on pixels (of crops) plus a small KL term and a colour anchor (`vae_loss`), the
temporal decoder started per frame (`start_per_frame`) decoding clips of `vae_frames` frames, its
temporal layers skipped in the first steps (`temporal_layers_skipped`), which draw a dancer per
frame (`vae_batch`); scored by PSNR on held-out dancers (`heldout_psnr`, `cnx.metrics.psnr`).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import numpy as np
import torch

from cnx.cpu_kernels import contiguous_group_norms, temporal_convs_as_conv2d
from cnx.pretrain_recipe import (
    PretrainConfig,
    cast_weights,
    cosine_lr,
    optimizer_and_schedule,
    stop_if_not_finite,
    synthetic_batch,
    training_precision,
)
from cnx.seeding import derive_seed, stream_generator

INITIAL_LOGVAR = -6.0  # the VAE posterior's starting log-variance (bias of quant_conv's logvar half)


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
    optimizer, schedule = optimizer_and_schedule(
        vae.parameters(), config.vae_lr, config.vae_steps, config.warmup
    )
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
                stop_if_not_finite(loss, "stage 1 (VAE)", step + 1)
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
