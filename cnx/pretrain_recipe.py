"""What both stages of `cnx pretrain-tiny` share: its settings, fresh synthetic clips, the
learning-rate schedule, the precision of a training step, and the rounding of stored weights.

Every random draw comes from a generator seeded by (stage, seed, step) through `cnx.seeding`, so
weights, data and noise are a function of the seed alone; the global RNGs are left as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cnx import edm
from cnx.flags import flag
from cnx.seeding import derive_seed

HELDOUT_STREAM = "pretrain-heldout"  # held-out dancers: a stream no training step draws from


@dataclass(frozen=True)
class PretrainConfig:
    """The settings of `cnx pretrain-tiny`, one flag each; the defaults made `data_samples/tiny_svd`.

    They are sized for a laptop's 2 CPU cores computing under bfloat16 autocast; how long a run
    took is in the pretrain_report.json it writes, not here.
    """

    seed: int = flag(0, "weights, data and noise are a function of the seed alone")
    width: int = flag(128, "frame width in pixels (the tiny profile's)")
    height: int = flag(192, "frame height in pixels")
    unet_width: int = flag(
        64, "first UNet block width (SVD: 320); at 32 its norms lose the colour (`cnx.tiny`)"
    )
    unet_inner_width: int = flag(64, "second UNet block width (SVD: 640)")
    vae_width: int = flag(64, "VAE block width; at 32 the decoder's last GroupNorm (32 groups) loses hue")
    vae_steps: int = flag(4000, "VAE optimizer steps")
    vae_batch_size: int = flag(
        4, "clips per VAE step; while the temporal layers are skipped, a dancer per frame"
    )
    vae_frames: int = flag(2, "frames per VAE clip: the temporal decoder decodes them together")
    vae_crop: int = flag(64, "square crop of every VAE clip, a multiple of 8 (0: whole frames)")
    vae_lr: float = flag(1e-3, "AdamW, cosine decay to 0 after a short warm-up")
    kl_weight: float = flag(1e-6, "weight of the summed KL per frame (Stable Diffusion's VAE: 1e-6)")
    colour_anchor: float = flag(1.0, "weight of the latents' colour anchor (`vae_loss`); 0: none")
    anchor_decay: bool = flag(True, "the anchor's weight follows the learning rate's cosine to 0")
    per_frame_start: bool = flag(True, "the decoder's temporal layers start as identity (`start_per_frame`)")
    vae_skip_temporal: float = flag(0.8, "share of VAE steps, the first ones, that skip the temporal layers")
    bf16: bool = flag(
        True, "training steps under bfloat16 autocast (`training_precision`); held-out in float32"
    )
    float16: bool = flag(True, "store the VAE and the UNet in float16 (half the bytes; they load as float32)")
    unet_steps: int = flag(
        600, "UNet optimizer steps (800 at 3e-4 learned as much in a third more time: docs/tiny_svd.md)"
    )
    batch_size: int = flag(1, "clips per UNet step")
    num_frames: int = flag(8, "frames per UNet clip, and the pipeline's default frame count")
    interval: int = flag(3, "frames between clip frames (the tiny profile's interval_frame)")
    unet_lr: float = flag(
        6e-4, "AdamW, cosine decay to 0 after a short warm-up; 3e-4 fell short at 600 steps"
    )
    heldout_clips: int = flag(8, "held-out dancers for the VAE's PSNR and the UNet's loss")
    heldout_sigmas: int = flag(4, "noise levels per held-out clip (quantiles of the log-normal)")
    warmup: int = flag(50, "learning-rate warm-up steps of both stages")

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
    from cnx.synth import random_dancer, render_background, render_frame

    span = (num_frames - 1) * interval + 1
    start = int(rng.integers(0, 2 * span))  # a random stretch of a longer dance
    dancer = random_dancer(rng, num_frames=start + span, width=width, height=height)
    background = render_background(dancer)
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


def heldout_sets(config: PretrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out dancers: (B, vae_frames, 3, H, W) clips for the VAE, (B, num_frames, ...) for the UNet."""
    size = (config.interval, config.width, config.height)
    return (
        synthetic_batch((HELDOUT_STREAM, "vae"), config.heldout_clips, config.vae_frames, *size),
        synthetic_batch((HELDOUT_STREAM, "unet"), config.heldout_clips, config.num_frames, *size),
    )


# ---------------------------------------------------------------------------------------------
# Training steps and stored weights


def training_precision(config: PretrainConfig):
    """The autocast context of a training step: bfloat16 when `config.bf16`, else plain float32.

    Measured on 2 cores with native bfloat16 (avx512_bf16): a VAE step 547 -> 396 ms, a UNet step
    750 -> 450 ms. Weights, optimizer states and the loss stay float32. Without AMX the UNet stage
    needs `cnx.cpu_kernels`' Conv2d for its temporal convs under it. On a GPU (same recipe,
    2140 VAE steps) the held-out PSNR reached 26.5 dB under bf16 against 25.7 dB for 1620 float32
    steps, the same CPU time.
    """
    return torch.autocast("cpu", torch.bfloat16, enabled=config.bf16)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def optimizer_and_schedule(params, lr: float, total: int, warmup: int):
    """AdamW (torch's fused CPU kernel, no weight decay) and its `cosine_lr` schedule over `total` steps."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, total, warmup))
    return optimizer, schedule


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


def stop_if_not_finite(loss: torch.Tensor, stage: str, step: int) -> None:
    """Stop the run at a NaN or infinite training loss, naming the stage and the step (counted from 1).

    As `cnx train` does (`edm.check_finite_loss`): a non-finite loss poisons every weight after
    it, so the run ends there and writes no model.
    """
    try:
        edm.check_finite_loss(loss, step)
    except FloatingPointError as err:
        raise FloatingPointError(f"{stage}: {err}; stopped without writing a model") from None
