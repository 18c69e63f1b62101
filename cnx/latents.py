"""The latent stage: pixels -> VAE latents and the reference image -> CLIP embedding.

A training step and the sampler both call these, so both see exactly what
diffusers' `StableVideoDiffusionPipeline` computes:
- video latents are the VAE posterior scaled by the VAE's `scaling_factor`
  (about unit variance, what SVD's sigma_data = 1 preconditioning assumes);
- the reference latent is the posterior's mode, *unscaled* (SVD's convention
  for the latent concatenated to the noisy latents);
- the CLIP embedding is taken from the reference resized to 224x224 with a
  Gaussian pre-blur and bicubic interpolation, as the pipeline does for a PIL
  or numpy reference, then normalised with CLIP's mean and std.
Encoding runs over frames in chunks, so a 21-frame 576x1024 clip never goes
through the VAE encoder at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# OpenAI CLIP's normalisation, as in SVD-xt's feature_extractor/preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224  # SVD-xt's image encoder takes 224x224 images


@torch.no_grad()
def video_posterior(vae, pixel_values: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """(B, F, 2C, h, w) VAE posterior parameters (mean, log-variance) of (B, F, 3, H, W) frames in [-1, 1].

    `chunk_size` frames go through the encoder at a time (None: all at once). What a latent
    cache (`cnx.latent_cache`) stores per frame, so `sample_posterior` of either is the same.
    """
    if pixel_values.ndim != 5 or pixel_values.shape[2] != 3:
        raise ValueError(f"pixel_values must be (B, F, 3, H, W), got {tuple(pixel_values.shape)}")
    batch, num_frames = pixel_values.shape[:2]
    frames = pixel_values.flatten(0, 1)  # (B*F, 3, H, W)
    step = chunk_size or frames.shape[0]
    if step < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    parameters = []
    for start in range(0, frames.shape[0], step):
        chunk = frames[start : start + step].to(device=vae.device, dtype=vae.dtype)
        parameters.append(vae.encode(chunk).latent_dist.parameters)  # (N, 2C, h, w)
    parameters = torch.cat(parameters)
    return parameters.reshape(batch, num_frames, *parameters.shape[1:])


def sample_posterior(
    parameters: torch.Tensor, scaling_factor: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, F, C, h, w) latents from (B, F, 2C, h, w) posterior parameters, times the VAE's scaling_factor.

    Without a generator the posterior's mode; with one, a sample mean + std * noise, the noise
    drawn once for the whole clip (so neither chunking nor a cache changes the draw).
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    batch, num_frames = parameters.shape[:2]
    posterior = DiagonalGaussianDistribution(parameters.flatten(0, 1))  # (B*F, 2C, h, w)
    latents = posterior.mean
    if generator is not None:
        noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=latents.dtype)
        latents = latents + posterior.std * noise.to(latents.device)
    latents = latents * scaling_factor
    return latents.reshape(batch, num_frames, *latents.shape[1:])


def encode_video_latents(
    vae,
    pixel_values: torch.Tensor,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, F, C, h, w) latents of (B, F, 3, H, W) frames in [-1, 1], times the VAE's scaling_factor.

    `video_posterior` then `sample_posterior`: the mode without a generator, a sample with one.
    """
    parameters = video_posterior(vae, pixel_values, chunk_size)
    return sample_posterior(parameters, vae.config.scaling_factor, generator)


def channels_last_on_cpu(vae):
    """Lay a frozen VAE's 2-D convolution weights out channels-last when it runs on a CPU; return it.

    oneDNN, PyTorch's CPU convolution library, prefers that layout: on 2 cores the pretrained tiny
    VAE encodes 8 frames of 128x192 in 0.42 s instead of 0.57 s (0.27 s one frame at a time, see
    `encode_chunk_frames`) and decodes them in 1.38 s instead of 1.79 s; results agree to 5e-6.
    Inference only: weights in this layout are never saved.
    """
    if vae.device.type == "cpu":
        for module in vae.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.to(memory_format=torch.channels_last)
    return vae


def encode_chunk_frames(device: torch.device, default: int) -> int:
    """Frames per VAE encoder call: one on a CPU, whose caches hold a frame's activations, not eight's."""
    return 1 if torch.device(device).type == "cpu" else default


@torch.no_grad()
def encode_reference(vae, reference_image: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) reference latents: the VAE posterior's mode, *not* multiplied by scaling_factor.

    This is SVD's own convention (the diffusers pipeline does the same): the
    concatenated reference latent is unscaled while the denoised video latents
    are scaled. Using the mode keeps training and sampling identical.
    """
    pixels = reference_image.to(device=vae.device, dtype=vae.dtype)
    return vae.encode(pixels).latent_dist.mode()


def _gaussian_kernel(size: int, sigma: float, dtype: torch.dtype, device) -> torch.Tensor:
    """(size,) normalised Gaussian taps centred on the middle tap."""
    x = torch.arange(size, dtype=dtype, device=device) - size // 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def resize_for_clip(images: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size): blur against aliasing, then bicubic, as SVD's pipeline does.

    Per axis, shrinking by a factor f first blurs with a Gaussian of std
    max((f - 1) / 2, 0.001) (scikit-image's choice) over an odd window of about
    4 std (at least 3) with reflected edges; then bicubic interpolation with
    aligned corners. Every step is linear and keeps constants, so the value
    range of `images` does not matter.
    """
    height, width = images.shape[-2:]
    blurred = images
    for axis, factor in ((-1, width / size), (-2, height / size)):  # width first, as diffusers
        sigma = max((factor - 1.0) / 2.0, 0.001)
        taps = int(max(4.0 * sigma, 3))
        taps += 1 - taps % 2  # odd
        kernel = _gaussian_kernel(taps, sigma, images.dtype, images.device)
        pad = taps // 2
        channels = blurred.shape[1]
        if axis == -2:
            weight = kernel.reshape(1, 1, taps, 1).expand(channels, 1, taps, 1)
            padded = F.pad(blurred, (0, 0, pad, pad), mode="reflect")
        else:
            weight = kernel.reshape(1, 1, 1, taps).expand(channels, 1, 1, taps)
            padded = F.pad(blurred, (pad, pad, 0, 0), mode="reflect")
        blurred = F.conv2d(padded, weight, groups=channels)
    return F.interpolate(blurred, size=(size, size), mode="bicubic", align_corners=True)


def clip_normalization(feature_extractor=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a CLIP image processor, or OpenAI CLIP's when none is given."""
    if feature_extractor is None:
        return CLIP_MEAN, CLIP_STD
    return tuple(feature_extractor.image_mean), tuple(feature_extractor.image_std)


@torch.no_grad()
def embed_reference(image_encoder, reference_image: torch.Tensor, feature_extractor=None) -> torch.Tensor:
    """(B, 1, D) CLIP image embeddings of (B, 3, H, W) reference images in [-1, 1].

    The image is resized to the encoder's input size in torch (`resize_for_clip`),
    mapped to [0, 1] and normalised with the feature extractor's mean and std
    (CLIP's by default): what the SVD pipeline feeds its image encoder.
    """
    if reference_image.ndim != 4 or reference_image.shape[1] != 3:
        raise ValueError(f"reference_image must be (B, 3, H, W), got {tuple(reference_image.shape)}")
    size = image_encoder.config.image_size
    images = (resize_for_clip(reference_image.float(), size) + 1.0) / 2.0  # (B, 3, size, size) in [0, 1]
    mean, std = clip_normalization(feature_extractor)
    mean = torch.tensor(mean, device=images.device).reshape(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).reshape(1, 3, 1, 1)
    pixels = ((images - mean) / std).to(device=image_encoder.device, dtype=image_encoder.dtype)
    return image_encoder(pixels).image_embeds.unsqueeze(1)  # (B, 1, D)
