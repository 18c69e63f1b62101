"""cnx.latents: what a training step and the sampler feed SVD, checked against diffusers' pipeline."""

import numpy as np
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline
from PIL import Image

from cnx.latents import CLIP_MEAN, CLIP_STD, embed_reference, encode_reference, encode_video_latents


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
