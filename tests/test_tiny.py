"""The stand-in SVD: a real diffusers pipeline folder, loaded by the code that loads SVD-xt."""

import hashlib

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from PIL import Image
from transformers import CLIPVisionModelWithProjection

from cnx.cli import main as cli_main
from cnx.tiny import SVD_XT_SCHEDULER_CONFIG, build_tiny_components, folder_size, write_tiny_svd

LAYOUT = ["model_index.json", "unet", "vae", "image_encoder", "feature_extractor", "scheduler"]


def digests(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_svd(tmp_path_factory.mktemp("tiny") / "svd", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return StableVideoDiffusionPipeline.from_pretrained(tiny_dir)


def test_folder_has_the_diffusers_layout_and_is_small(tiny_dir):
    assert sorted(p.name for p in tiny_dir.iterdir()) == sorted(LAYOUT)
    assert (tiny_dir / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(tiny_dir.rglob("*.bin")), "weights must be safetensors"
    assert folder_size(tiny_dir) < 20e6


def test_components_match_svd_xt(pipe):
    assert isinstance(pipe.unet, UNetSpatioTemporalConditionModel)
    assert isinstance(pipe.vae, AutoencoderKLTemporalDecoder)
    assert isinstance(pipe.image_encoder, CLIPVisionModelWithProjection)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert (pipe.unet.config.in_channels, pipe.unet.config.out_channels) == (8, 4)
    assert pipe.vae.config.latent_channels == 4
    assert pipe.vae_scale_factor == 8
    assert pipe.image_encoder.config.projection_dim == pipe.unet.config.cross_attention_dim
    for key, value in SVD_XT_SCHEDULER_CONFIG.items():
        assert pipe.scheduler.config[key] == value, key


def test_scheduler_gives_karras_sigmas_from_700_to_0002(pipe):
    pipe.scheduler.set_timesteps(25)
    sigmas = pipe.scheduler.sigmas[:-1]  # the last entry is the final zero
    assert sigmas[0].item() == pytest.approx(700.0, rel=1e-4)
    assert sigmas[-1].item() == pytest.approx(0.002, rel=1e-3)
    # Continuous timesteps are 0.25 ln sigma.
    assert torch.allclose(pipe.scheduler.timesteps, 0.25 * sigmas.log(), atol=1e-4)


def test_same_seed_gives_byte_identical_weights(tiny_dir, tmp_path):
    again = write_tiny_svd(tmp_path / "again", seed=0)
    other = write_tiny_svd(tmp_path / "other", seed=1)
    assert digests(again) == digests(tiny_dir)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert digests(other)[weights] != digests(tiny_dir)[weights]


def test_building_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_components(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_unet_widths_are_parameters(tmp_path):
    path = write_tiny_svd(tmp_path / "wide", unet_width=64)
    unet = UNetSpatioTemporalConditionModel.from_pretrained(path, subfolder="unet")
    assert tuple(unet.config.block_out_channels) == (64, 128)  # the inner block: twice by default
    unet = build_tiny_components(unet_width=64, unet_inner_width=64)[0]
    assert tuple(unet.config.block_out_channels) == (64, 64)
    for widths in ({"unet_width": 40}, {"unet_inner_width": 80}):
        with pytest.raises(ValueError, match="multiples of 32"):
            write_tiny_svd(tmp_path / "bad", **widths)


def test_unet_forward_on_8_frames_at_64x96(pipe):
    latents = torch.randn(1, 8, 8, 12, 8)  # (B, F, noisy + reference latent channels, H/8, W/8)
    embeddings = torch.randn(1, 1, pipe.unet.config.cross_attention_dim)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]])
    with torch.no_grad():
        out = pipe.unet(latents, torch.tensor([0.5]), embeddings, time_ids).sample
    assert out.shape == (1, 8, 4, 12, 8)
    assert torch.isfinite(out).all()


def test_pipeline_runs_end_to_end(pipe):
    # A PIL image: diffusers resizes only non-tensor references to CLIP's 224x224.
    reference = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 64, 3), dtype=np.uint8))
    frames = pipe(
        reference,
        height=96,
        width=64,
        num_frames=4,
        num_inference_steps=2,
        decode_chunk_size=4,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert frames.shape == (1, 4, 3, 96, 64)
    assert torch.isfinite(frames).all()


def test_cli_writes_a_loadable_folder(tmp_path, capsys):
    assert cli_main(["tiny-model", str(tmp_path / "cli"), "--seed", "3"]) == 0
    assert str(tmp_path / "cli") in capsys.readouterr().out
    assert StableVideoDiffusionPipeline.from_pretrained(tmp_path / "cli").unet.config.in_channels == 8
