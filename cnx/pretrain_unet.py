"""Stage 2 of `cnx pretrain-tiny`: the UNet learns image-to-video, without pose.

SVD's objective exactly as `cnx.step.training_step` computes it (first frame -> reference latent
and CLIP embedding, log-normal sigmas, EDM preconditioning, conditioning dropout), with the
trained VAE and the stand-in's CLIP encoder frozen; scored by the loss on a fixed held-out batch
with fixed noise and sigmas (`heldout_unet_loss`).
"""

from __future__ import annotations

import torch

from cnx import edm
from cnx.cpu_kernels import conv3d_weight_grads_need_conv2d, temporal_convs_as_conv2d
from cnx.pretrain_recipe import (
    HELDOUT_STREAM,
    PretrainConfig,
    cast_weights,
    optimizer_and_schedule,
    stop_if_not_finite,
    synthetic_batch,
    training_precision,
)
from cnx.seeding import stream_generator
from cnx.step import Models, Objective, heldout_step, training_step


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
    optimizer, schedule = optimizer_and_schedule(
        unet.parameters(), config.unet_lr, config.unet_steps, config.warmup
    )
    # Without AMX, oneDNN's bf16 weight gradients of the temporal resnets' Conv3d are garbage
    # (`cnx.cpu_kernels`); there they compute as Conv2d. With AMX, as the shipped model was trained.
    as_conv2d = config.bf16 and conv3d_weight_grads_need_conv2d()
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
        with training_precision(config), temporal_convs_as_conv2d(unet, as_conv2d):
            loss = svd_loss(models, pixels, generator).mean()  # the graph holds the convs it ran
        stop_if_not_finite(loss, "stage 2 (UNet)", step + 1)
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
