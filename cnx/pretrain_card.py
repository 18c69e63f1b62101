"""The model card of a `cnx pretrain-tiny` folder: its README.md, written from its pretrain_report.json.

It says what the folder holds, how each stage trained and what it reached, and the command that
reproduces it (the same seed gives the same figures; on the same CPU, the same bytes).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from cnx.flags import as_argv
from cnx.pretrain_recipe import PretrainConfig
from cnx.pretrain_vae import steps_skipping_temporal


def command_line(out_dir: Path, config: PretrainConfig) -> str:
    """The `cnx pretrain-tiny` command that writes this folder again: every setting spelled out."""
    every = " ".join(as_argv(config, changed_only=False))
    return f"cnx pretrain-tiny {shlex.quote(str(out_dir))} {every}"


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
