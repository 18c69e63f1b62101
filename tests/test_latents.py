"""cnx.latents: what a training step and the sampler feed SVD, checked against diffusers' pipeline."""

import copy
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline
from PIL import Image

from cnx.latents import (
    CLIP_MEAN,
    CLIP_STD,
    FrameLatentCache,
    channels_last_on_cpu,
    embed_reference,
    encode_chunk_frames,
    encode_reference,
    encode_video_latents,
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


@pytest.mark.parametrize("cached", [False, True])
def test_video_latents_are_scaled_by_this_vaes_own_factor(pipe, cached):
    """Not SD's 0.18215 (the stand-in VAE's value, which hides a hard-coded constant): the shipped tiny
    SVD's VAE has 2.75585, measured on its own latents (`cnx pretrain-tiny`)."""
    vae = copy.deepcopy(pipe.vae)
    vae.register_to_config(scaling_factor=2.75585)
    pixels = torch.rand(1, 2, 3, 48, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    cache = FrameLatentCache(max_bytes=2**20) if cached else None
    latents = encode_video_latents(vae, pixels, None, None, cache)  # (1, 2, C, h, w)
    with torch.no_grad():
        mode = vae.encode(pixels[0]).latent_dist.mode()  # (2, C, h, w)
    torch.testing.assert_close(latents[0], mode * 2.75585)


def test_the_latent_cache_encodes_each_distinct_frame_once_and_changes_no_latent(pipe):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 3, 48, 32, generator=g) * 2 - 1  # (B, F, 3, H, W)
    cache = FrameLatentCache(max_bytes=2**20)
    with mock.patch.object(pipe.vae, "encode", wraps=pipe.vae.encode) as encode:
        first = encode_video_latents(pipe.vae, pixels, 4, torch.Generator().manual_seed(1), cache)
        assert (cache.misses, cache.hits, encode.call_count) == (6, 0, 6)  # one frame at a time
        again = encode_video_latents(pipe.vae, pixels, 4, torch.Generator().manual_seed(1), cache)
        assert (cache.misses, cache.hits, encode.call_count) == (6, 6, 6)  # nothing encoded again
    assert torch.equal(again, first) and len(cache.entries) == 6
    # The same latents as the VAE's own batched encoding, to float rounding.
    torch.testing.assert_close(
        first, encode_video_latents(pipe.vae, pixels, None, torch.Generator().manual_seed(1))
    )
    # A frame's posterior does not depend on its neighbours: frame (1, 2) beside a new frame, in a new
    # cache, has the very bits it had in the first clip (as a resumed run needs).
    beside = torch.stack([torch.zeros_like(pixels[0, 0]), pixels[1, 2]])[None]  # (1, 2, 3, H, W)
    alone = encode_video_latents(pipe.vae, beside, None, None, FrameLatentCache(2**20))[0, 1]
    assert torch.equal(alone, encode_video_latents(pipe.vae, pixels, None, None, cache)[1, 2])
    # One changed pixel is another frame: a miss, never a stale hit.
    changed = pixels.clone()
    changed[0, 0, 1, 5, 7] += 0.01
    misses = cache.misses
    encode_video_latents(pipe.vae, changed, None, None, cache)
    assert cache.misses == misses + 1


def test_a_full_latent_cache_stops_storing_but_keeps_encoding(pipe):
    pixels = torch.rand(1, 4, 3, 48, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    entry = 2 * 4 * 6 * 4 * 4  # (2C, h, w) float32 parameters of one 48x32 frame
    cache = FrameLatentCache(max_bytes=2 * entry + entry // 2)
    latents = encode_video_latents(pipe.vae, pixels, None, None, cache)
    assert len(cache.entries) == 2 and cache.bytes == 2 * entry <= cache.max_bytes
    torch.testing.assert_close(latents, encode_video_latents(pipe.vae, pixels))
    encode_video_latents(pipe.vae, pixels, None, None, cache)
    assert (cache.hits, cache.misses) == (2, 6)
    assert "2 frames" in cache.summary() and "2 of 8 encodes saved (25%)" in cache.summary()


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
