"""cnx.latents: what a training step and the sampler feed SVD, checked against diffusers' pipeline."""

import copy

import numpy as np
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline
from PIL import Image

from cnx.latents import (
    CLIP_MEAN,
    CLIP_STD,
    channels_last_on_cpu,
    embed_reference,
    encode_chunk_frames,
    encode_reference,
    encode_video_latents,
    sample_posterior,
    video_posterior,
)


@pytest.fixture(scope="module")
def pipe(tiny_svd_dir):
    return StableVideoDiffusionPipeline.from_pretrained(tiny_svd_dir)


def test_chunked_and_unchunked_video_latents_agree(pipe):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 5, 3, 48, 32, generator=g) * 2 - 1  # (B, F, 3, H, W)
    whole = encode_video_latents(pipe.vae, pixels)
    for chunk in (1, 2, 3, 10):
        torch.testing.assert_close(encode_video_latents(pipe.vae, pixels, chunk_size=chunk), whole)
    assert whole.shape == (2, 5, 4, 6, 4)
    # Scaled by the VAE's factor: frame (1, 3) is the mode of its own encoding times scaling_factor.
    with torch.no_grad():
        mode = pipe.vae.encode(pixels[1, 3:4]).latent_dist.mode()[0]
    torch.testing.assert_close(whole[1, 3], mode * pipe.vae.config.scaling_factor)
    # Sampling the posterior: the same generator seed gives the same latents whatever the chunking.
    sampled = [
        encode_video_latents(pipe.vae, pixels, chunk, torch.Generator().manual_seed(3)) for chunk in (None, 2)
    ]
    torch.testing.assert_close(sampled[0], sampled[1])
    assert not torch.allclose(sampled[0], whole)


def test_video_latents_are_scaled_by_this_vaes_own_factor(pipe):
    """Not SD's 0.18215 (the stand-in VAE's value, which hides a hard-coded constant): the shipped tiny
    SVD's VAE has 2.75585, measured on its own latents (`cnx pretrain-tiny`)."""
    vae = copy.deepcopy(pipe.vae)
    vae.register_to_config(scaling_factor=2.75585)
    pixels = torch.rand(1, 2, 3, 48, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    latents = encode_video_latents(vae, pixels)  # (1, 2, C, h, w)
    with torch.no_grad():
        mode = vae.encode(pixels[0]).latent_dist.mode()  # (2, C, h, w)
    torch.testing.assert_close(latents[0], mode * 2.75585)


def test_a_frame_encoded_alone_has_the_same_posterior_beside_any_frames(pipe):
    """One frame per encoder call (a CPU step, `cnx cache-latents`): a frame's posterior parameters are
    the same bits whatever clip it is in, so a cached posterior is the one a step would compute."""
    pixels = torch.rand(2, 3, 3, 48, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    parameters = video_posterior(pipe.vae, pixels, chunk_size=1)  # (B, F, 2C, h, w)
    assert parameters.shape == (2, 3, 8, 6, 4)
    beside = torch.stack([torch.zeros_like(pixels[0, 0]), pixels[1, 2]])[None]  # (1, 2, 3, H, W)
    assert torch.equal(video_posterior(pipe.vae, beside, chunk_size=1)[0, 1], parameters[1, 2])
    # Sampled from the parameters with a generator: what encode_video_latents draws.
    factor = pipe.vae.config.scaling_factor
    torch.testing.assert_close(
        sample_posterior(parameters, factor, torch.Generator().manual_seed(1)),
        encode_video_latents(pipe.vae, pixels, None, torch.Generator().manual_seed(1)),
    )


def test_a_channels_last_vae_on_cpu_encodes_and_decodes_what_the_plain_one_does(pipe):
    fast = channels_last_on_cpu(copy.deepcopy(pipe.vae))
    weights = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    pixels = torch.rand(1, 3, 3, 48, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    latents = encode_video_latents(fast, pixels, encode_chunk_frames("cpu", 8))
    torch.testing.assert_close(latents, encode_video_latents(pipe.vae, pixels), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        decoded = [vae.decode(latents[0], num_frames=3).sample for vae in (fast, pipe.vae)]
    torch.testing.assert_close(*decoded, atol=1e-5, rtol=1e-4)
    assert encode_chunk_frames("cpu", 8) == 1 and encode_chunk_frames("meta", 8) == 8


def test_video_latents_reject_a_clip_without_a_frame_axis(pipe):
    with pytest.raises(ValueError, match=r"\(B, F, 3, H, W\)"):
        encode_video_latents(pipe.vae, torch.zeros(1, 3, 16, 16))


def test_reference_latent_is_the_unscaled_posterior_mode(pipe):
    """SVD concatenates the reference latent without the VAE scaling factor, as diffusers' pipeline does."""
    reference = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = encode_reference(pipe.vae, reference)
    assert latents.shape == (1, 4, 4, 3)
    with torch.no_grad():
        torch.testing.assert_close(latents, pipe.vae.encode(reference).latent_dist.mode())


@pytest.mark.parametrize("size", [(96, 64), (384, 256), (40, 300)])
def test_reference_embedding_equals_the_svd_pipelines_for_a_pil_image(pipe, size):
    height, width = size
    rgb = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = pipe._encode_image(Image.fromarray(rgb), "cpu", 1, False)  # (1, 1, D)
    reference = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, H, W) in [-1, 1]
    got = embed_reference(pipe.image_encoder, reference, pipe.feature_extractor)
    assert got.shape == expected.shape == (1, 1, pipe.image_encoder.config.projection_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # Without a feature extractor, CLIP's own constants, which the stand-in's processor carries.
    assert tuple(pipe.feature_extractor.image_mean) == CLIP_MEAN
    assert tuple(pipe.feature_extractor.image_std) == CLIP_STD
    torch.testing.assert_close(embed_reference(pipe.image_encoder, reference), got)
