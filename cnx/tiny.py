"""A stand-in for Stable Video Diffusion with tiny random weights, written as a real diffusers folder.

Nothing can be downloaded here, yet the code that loads
`stabilityai/stable-video-diffusion-img2vid-xt-1-1` must be the code under
test. So cnx writes a pipeline folder with the same layout, component classes
and scheduler configuration as SVD-xt, only much smaller; every loader in cnx
reads it with plain `from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cnx.latents import CLIP_MEAN, CLIP_SIZE, CLIP_STD

# SVD-xt's scheduler: v-prediction on continuous timesteps (0.25 ln sigma), Karras sigmas 0.002..700.
SVD_XT_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "trained_betas": None,
    "use_karras_sigmas": True,
}


# SVD-xt-1.1's VAE and image encoder (OpenCLIP ViT-H/14) configurations where they differ from the
# libraries' defaults (diffusers' default UNet configuration is SVD-xt's already). Note that a bare
# AutoencoderKLTemporalDecoder() has one block and no downsampling: latents at full pixel size.
SVD_XT_VAE_CONFIG = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,  # three downsamples: latents at 1/8 of the pixels
    "layers_per_block": 2,
    "latent_channels": 4,
}
SVD_XT_IMAGE_ENCODER_CONFIG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": CLIP_SIZE,
    "projection_dim": 1024,
    "hidden_act": "gelu",
}


def build_svd_xt_components(device="meta", dtype=None):
    """SVD-xt's UNet, VAE and image encoder, its scheduler and the published ControlNeXt, random weights.

    For benchmarks and the memory planner: the real architecture, nothing downloaded.
    Built directly on `device` (the meta device by default: shapes only, no memory).
    """
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from cnx.controlnext import ControlNeXt

    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel(num_frames=25)
        vae = AutoencoderKLTemporalDecoder(**SVD_XT_VAE_CONFIG)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**SVD_XT_IMAGE_ENCODER_CONFIG))
        controlnext = ControlNeXt()
    if dtype is not None:
        for module in (unet, vae, image_encoder, controlnext):
            module.to(dtype)
    return unet, vae, image_encoder, EulerDiscreteScheduler(**SVD_XT_SCHEDULER_CONFIG), controlnext


def build_tiny_components(
    seed: int = 0,
    unet_width: int = 32,
    vae_width: int = 32,
    num_frames: int = 8,
    unet_inner_width: int | None = None,
):
    """The five SVD components with tiny, seeded random weights.

    `unet_width` is the first UNet block's width (SVD: 320), `unet_inner_width`
    the second's (default: twice the first). Both must be multiples of 32
    because the UNet's group norms use 32 groups. At width 32 each of those
    norms is per channel and removes every channel's spatial mean, which is
    where a latent keeps the frame's colour: such a UNet cannot copy the
    reference's colour (measured: README.md, "The pretrained tiny SVD").
    """
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    inner_width = unet_inner_width or 2 * unet_width
    if unet_width % 32 or inner_width % 32 or vae_width % 32:
        raise ValueError(
            "unet_width, unet_inner_width and vae_width must be multiples of 32, "
            f"got {unet_width}, {inner_width}, {vae_width}"
        )
    embed_dim = unet_width  # CLIP image embedding size == the UNet's cross-attention width
    time_id_dim = 32  # per added time id (SVD: 256); 3 ids: fps, motion bucket, noise augmentation

    # Seed each component on its own, inside fork_rng so the caller's global RNG is left as it was.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNetSpatioTemporalConditionModel(
            sample_size=12,
            in_channels=8,  # noisy latents (4) + reference image latents (4)
            out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            block_out_channels=(unet_width, inner_width),
            addition_time_embed_dim=time_id_dim,
            projection_class_embeddings_input_dim=3 * time_id_dim,
            layers_per_block=1,
            cross_attention_dim=embed_dim,
            num_attention_heads=(unet_width // 16, inner_width // 16),  # 16 channels per head
            num_frames=num_frames,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLTemporalDecoder(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,  # three downsamples: factor 8 as in SVD
            block_out_channels=(vae_width,) * 4,
            layers_per_block=1,
            latent_channels=4,
            sample_size=96,
            scaling_factor=0.18215,
        )
        torch.manual_seed(seed + 2)
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=embed_dim,
                intermediate_size=2 * embed_dim,
                projection_dim=embed_dim,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=CLIP_SIZE,  # the SVD pipeline always resizes the reference to 224x224
                patch_size=32,
            )
        )
    scheduler = EulerDiscreteScheduler(**SVD_XT_SCHEDULER_CONFIG)
    return unet, vae, image_encoder, scheduler


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """transformers' and diffusers' progress bars off inside the block, then back as they were.

    The stand-in's files are written and read in a blink; in an executed notebook
    their bars stay frozen at 0% ("Writing model shards", "Loading weights").
    Log messages and warnings are untouched.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in enabled:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in enabled:
            lib.enable_progress_bar()


def save_svd_folder(out_dir: str | Path, unet, vae, image_encoder, scheduler) -> Path:
    """Write SVD components as a StableVideoDiffusionPipeline folder (safetensors), with CLIP's processor."""
    from diffusers import StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor

    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": CLIP_SIZE},
        crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=feature_extractor,
    )
    out_dir = Path(out_dir)
    with quiet_progress_bars():
        pipe.save_pretrained(out_dir, safe_serialization=True)
    # Without torchvision transformers substitutes its PIL-backed processor class; name the
    # class SVD-xt's own model_index.json names, so loading follows the same path.
    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir


def write_tiny_svd(
    out_dir: str | Path,
    seed: int = 0,
    unet_width: int = 32,
    vae_width: int = 32,
    num_frames: int = 8,
    unet_inner_width: int | None = None,
) -> Path:
    """Write a StableVideoDiffusionPipeline folder; the same seed gives byte-identical weight files."""
    components = build_tiny_components(seed, unet_width, vae_width, num_frames, unet_inner_width)
    return save_svd_folder(out_dir, *components)


def folder_size(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnx tiny-model", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the pipeline into")
    parser.add_argument("--seed", type=int, default=0, help="weights are a function of the seed alone")
    parser.add_argument("--unet_width", type=int, default=32, help="first UNet block width (SVD: 320)")
    parser.add_argument("--unet_inner_width", type=int, default=0, help="second UNet block width (0: twice)")
    parser.add_argument("--vae_width", type=int, default=32, help="VAE block width (SVD: 128..512)")
    parser.add_argument("--num_frames", type=int, default=8, help="the pipeline's default frame count")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = write_tiny_svd(
        args.out_dir, args.seed, args.unet_width, args.vae_width, args.num_frames, args.unet_inner_width
    )
    seconds = time.perf_counter() - start
    print(f"tiny SVD pipeline: {out} ({folder_size(out) / 1e6:.1f} MB, {seconds:.1f} s)")
    print(f"load it with StableVideoDiffusionPipeline.from_pretrained({str(out)!r})")
    return 0
