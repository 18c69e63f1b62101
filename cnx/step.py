"""One training step: a batch of clips -> the ControlNeXt-SVD loss, and the models it needs.

`training_step(models, batch, objective, generator)` is the whole step: the
trainer calls it once per micro-batch, and so do the notebooks, the tests, the
benchmarks and the tiny SVD's pretraining. `heldout_step` is the same loss as
an explicit evaluation mode: a fixed noise level and control scale, nothing
dropped. Every random draw of either comes from `generator`, in a fixed order
(VAE posterior sample, reference noise, [dropout, sigma,] noise), so a step is
a function of its (seed, rank, step, micro-batch) stream (pitfall 10).
Pitfall numbers refer to docs/pitfalls.md.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from cnx import conditioning, edm
from cnx.latents import (
    channels_last_on_cpu,
    embed_reference,
    encode_chunk_frames,
    encode_reference,
    sample_posterior,
    video_posterior,
)
from cnx.seeding import stream_generator

VAE_CHUNK_FRAMES = 8  # frames through the VAE encoder at once (a 21 x 576x1024 clip never at once)


@dataclass
class Models:
    """What a training step needs: the frozen VAE and image encoder, and the UNet + ControlNeXt wrapper."""

    vae: torch.nn.Module
    image_encoder: torch.nn.Module
    feature_extractor: object
    model: torch.nn.Module  # cnx.controlnext.ControlNeXtSVD, possibly wrapped by accelerate
    weight_dtype: torch.dtype  # of the frozen models and the forward pass
    encode_chunk: int = VAE_CHUNK_FRAMES  # frames per VAE encoder call (`build_models`: 1 on a CPU)


@dataclass(frozen=True)
class Objective:
    """What the loss draws: the conditioning dropout, the control's strength, the noise levels."""

    conditioning_dropout_prob: float = conditioning.DEFAULT_CONDITIONING_DROPOUT_PROB
    control_scale: float = conditioning.DEFAULT_CONTROL_SCALE
    sigma_sampler: str = "lognormal"  # cnx.edm.SIGMA_SAMPLERS

    @classmethod
    def from_options(cls, options) -> Objective:
        """The objective of `cnx train`'s options (cnx.options.TrainingOptions)."""
        return cls(options.conditioning_dropout_prob, options.control_scale, options.sigma_sampler)


@dataclass(frozen=True)
class StepOutput:
    loss: torch.Tensor  # () float32, the mean over the batch
    per_sample: torch.Tensor  # (B,) float32
    sigma: torch.Tensor  # (B,) float32


def step_generator(seed: int, rank: int, step: int, micro: int, device="cpu") -> torch.Generator:
    """The generator of one micro-batch: the ("train", seed, rank, step, micro) stream (pitfall 10)."""
    return stream_generator("train", seed, rank, step, micro, device=device)


def training_step(
    models: Models, batch: dict, objective: Objective, generator: torch.Generator
) -> StepOutput:
    """The loss of one batch: latents, conditioning and its dropout, noise, the UNet with the control.

    batch: `cnx.data.ClipDataset` items collated: pixel_values (B, F, 3, H, W) in [-1, 1],
    pose_frames (B, F, 3, H, W) in [0, 1], reference_image (B, 3, H, W), hand_weights
    (B, F, 1, H, W). From a latent cache (`cnx.latent_cache.CachedClipDataset`) latent_parameters
    (B, F, 2C, h, w) replace pixel_values, and reference_embedding (B, 1, D) may come too.
    """
    latents, reference_latents, embeddings = _encode(models, batch, generator)
    batch_size = latents.shape[0]
    # Conditioning dropout: the unconditional case drops all three together (pitfall 12).
    dropout = conditioning.sample_conditioning_dropout(
        batch_size,
        generator,
        conditioning_dropout_prob=objective.conditioning_dropout_prob,
        control_scale=objective.control_scale,
    )
    embeddings, reference_latents = dropout.apply(embeddings, reference_latents)
    sigma = edm.sample_sigmas(batch_size, objective.sigma_sampler, generator)  # (B,)
    return _denoising_loss(models, batch, latents, reference_latents, embeddings, dropout, sigma, generator)


def heldout_step(
    models: Models, batch: dict, sigma: torch.Tensor, control_scale: float, generator: torch.Generator
) -> StepOutput:
    """The loss at fixed noise levels `sigma` (B,) and `control_scale`, every condition kept.

    Comparable across runs and checkpoints: held-out losses, the convergence checks.
    """
    latents, reference_latents, embeddings = _encode(models, batch, generator)
    dropout = conditioning.ConditioningDropout.keep_all(latents.shape[0], control_scale=control_scale)
    return _denoising_loss(models, batch, latents, reference_latents, embeddings, dropout, sigma, generator)


def _encode(models: Models, batch: dict, generator: torch.Generator):
    """Latents (B, F, C, h, w), reference latents (B, C, h, w, unscaled) and embeddings (B, 1, D).

    The frozen models, no gradients; the VAE's posterior sample and the reference's
    noise augmentation draw from `generator`.
    """
    device = models.vae.device
    reference = batch["reference_image"].to(device)
    if "latent_parameters" in batch:  # a latent cache's posteriors: no VAE encoder call for the clip
        parameters = batch["latent_parameters"].to(device, models.vae.dtype)
    else:
        parameters = video_posterior(models.vae, batch["pixel_values"].to(device), models.encode_chunk)
    latents = sample_posterior(parameters, models.vae.config.scaling_factor, generator).float()
    noisy_reference = conditioning.noise_augment_reference(reference, generator)
    reference_latents = encode_reference(models.vae, noisy_reference).float()  # one frame per clip
    if "reference_embedding" in batch:  # cached: the reference is the un-augmented frame
        embeddings = batch["reference_embedding"].to(device).float()
    else:
        embeddings = embed_reference(models.image_encoder, reference, models.feature_extractor).float()
    return latents, reference_latents, embeddings


def _denoising_loss(models, batch, latents, reference_latents, embeddings, dropout, sigma, generator):
    """Noise the latents at `sigma`, denoise with the UNet and the control, weigh the error."""
    device = latents.device
    batch_size, num_frames = latents.shape[:2]
    # Noise and preconditioning, in float32 (pitfall 11).
    sigma = sigma.to(device)
    noise = edm.gaussian_noise(latents, generator)
    noisy = edm.add_noise(latents, sigma, noise)  # (B, F, C, h, w)
    c_noise = edm.precondition(sigma)[3]
    reference_frames = reference_latents[:, None].expand(-1, num_frames, -1, -1, -1)
    model_input = torch.cat([edm.scale_input(noisy, sigma), reference_frames], dim=2)  # (B, F, 2C, h, w)
    time_ids = conditioning.added_time_ids(batch_size=batch_size, device=device)

    # The UNet with the control (autocast, when on, wraps only this forward).
    output = models.model(
        model_input.to(models.weight_dtype),
        c_noise,
        embeddings.to(models.weight_dtype),
        time_ids.to(models.weight_dtype),
        pose_frames=batch["pose_frames"].to(device, models.weight_dtype),
        control_scale=dropout.control_scale.to(device),
    ).sample
    denoised = edm.denoise(noisy, output, sigma)
    per_sample = edm.denoising_loss(denoised, latents, sigma, batch["hand_weights"].to(device))  # (B,)
    return StepOutput(loss=per_sample.mean(), per_sample=per_sample, sigma=sigma)


# ---------------------------------------------------------------------------------------------
# The models


@contextmanager
def _loading(source: str, error: type[Exception]):
    """An OSError while loading the pipeline's parts becomes one line naming the source."""
    try:
        yield
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise error(f"{source}: cannot load the SVD pipeline's parts: {first}") from err


def build_models(options, device, weight_dtype: torch.dtype):
    """(Models, unwrapped; the pipeline's scheduler) from `cnx train`'s options: folders and weights."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from cnx.attention import use_single_token_cross_attention
    from cnx.compile import compile_repeated_blocks
    from cnx.controlnext import ControlNeXt, ControlNeXtSVD, controlnext_config_for
    from cnx.media import InputError
    from cnx.seeding import derive_seed
    from cnx.tiny import quiet_progress_bars
    from cnx.weights import load_controlnext_state, load_unet_state

    source, revision = options.pretrained_model_name_or_path, options.revision
    with quiet_progress_bars(), _loading(source, InputError):
        vae = AutoencoderKLTemporalDecoder.from_pretrained(source, subfolder="vae", revision=revision)
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            source, subfolder="image_encoder", revision=revision
        )
        feature_extractor = CLIPImageProcessor.from_pretrained(
            source, subfolder="feature_extractor", revision=revision
        )
        scheduler = EulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", revision=revision)
        unet_source = options.pretrain_unet or source
        subfolder = None if (Path(unet_source) / "config.json").is_file() else "unet"
        unet = UNetSpatioTemporalConditionModel.from_pretrained(
            unet_source, subfolder=subfolder, revision=options.non_ema_revision or revision
        )
    with torch.random.fork_rng():  # ControlNeXt's initial weights from --seed, the global RNG left alone
        torch.manual_seed(derive_seed("controlnext-init", options.seed))
        controlnext = ControlNeXt(**controlnext_config_for(unet.config.block_out_channels[0]))
    # Strict loads, each file read by its own extension (pitfalls 1, 2, 5).
    if options.controlnet_model_name_or_path:
        load_controlnext_state(controlnext, options.controlnet_model_name_or_path)
    if options.unet_model_name_or_path:
        load_unet_state(unet, options.unet_model_name_or_path)
    if options.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401

            unet.enable_xformers_memory_efficient_attention()
        except ImportError:
            print("cnx train: xformers is not installed; attention uses PyTorch SDPA", file=sys.stderr)
    model = ControlNeXtSVD(unet, controlnext)
    if options.single_token_cross_attention:  # exact; select_trainable freezes what it leaves unread
        use_single_token_cross_attention(unet)
    if options.gradient_checkpointing:
        model.enable_gradient_checkpointing(options.checkpointing)
    if options.compile:  # in place: names and state dicts unchanged; compiles at the first call
        compile_repeated_blocks(unet, backend=options.compile_backend)
    for frozen in (vae, image_encoder):
        frozen.requires_grad_(False).eval().to(device)
        if frozen.dtype != weight_dtype:  # diffusers warns on every `to(dtype)`, even a no-op
            frozen.to(weight_dtype)
    channels_last_on_cpu(vae)
    chunk = encode_chunk_frames(device, VAE_CHUNK_FRAMES)
    return Models(vae, image_encoder, feature_extractor, model, weight_dtype, chunk), scheduler
