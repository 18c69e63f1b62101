"""`cnx.convergence`'s readers of run folders and written clips (the benchmark itself: test_convergence)."""

import json
from pathlib import Path

import numpy as np
import pytest

from cnx import convergence
from cnx.options import parse_options
from cnx.synth import write_samples


def test_run_options_makes_the_run_folders_relative_paths_absolute(tmp_path):
    (tmp_path / "tiny_svd").mkdir()
    (tmp_path / "output").mkdir()
    options = parse_options(
        [
            "--pretrained_model_name_or_path=tiny_svd",
            "--meta_info_path=/data/meta.json",
            "--output_dir=output",
        ]
    )
    options.to_json(tmp_path / "training_options.json")
    read = convergence.run_options(tmp_path)
    assert read.pretrained_model_name_or_path == str(tmp_path.resolve() / "tiny_svd")
    assert read.output_dir == str(tmp_path.resolve() / "output")
    assert read.meta_info_path == "/data/meta.json"  # absolute paths stay as they are


def test_long_sequence_takes_every_nth_frame_with_its_keypoints(tmp_path):
    write_samples(tmp_path, num_clips=1, num_frames=12, width=64, height=96)
    clip = convergence.long_sequence(tmp_path, "dancer_000", num_frames=6, interval=2)
    assert clip.ground_truth.shape == (6, 96, 64, 3) and clip.poses.shape == (6, 96, 64, 3)
    assert np.array_equal(clip.reference, clip.ground_truth[0])
    track = np.load(tmp_path / "keypoints" / "dancer_000.npz")
    assert np.array_equal(clip.keypoints["body"], track["body"][0:12:2])
    with pytest.raises(ValueError, match="dancer_000.mp4: 12 frames, too few for 7 frames 2 apart"):
        convergence.long_sequence(tmp_path, "dancer_000", num_frames=7, interval=2)


def test_read_steps_reads_one_record_per_line(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "steps.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n\n')
    assert convergence.read_steps(tmp_path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]


def test_reversed_poses_flips_only_the_pose_frames_in_time():
    import torch

    batch = {"pose_frames": torch.arange(2 * 3).reshape(1, 3, 2, 1, 1).float(), "pixel_values": torch.ones(1)}
    (flipped,) = convergence.reversed_poses([batch])
    assert flipped["pose_frames"][0, :, :, 0, 0].tolist() == [[4, 5], [2, 3], [0, 1]]
    assert flipped["pixel_values"] is batch["pixel_values"]
    assert batch["pose_frames"][0, 0, 0, 0, 0] == 0  # the input batch is left as it was


def test_through_vae_is_the_vaes_round_trip():
    from diffusers import AutoencoderKLTemporalDecoder

    from cnx.metrics import psnr
    from cnx.profiles import TINY
    from cnx.synth import random_dancer, render_frame
    from cnx.tiny import build_tiny_components

    dancer = random_dancer(np.random.default_rng(0), num_frames=4, width=TINY.width, height=TINY.height)
    frames = np.stack([render_frame(dancer, t)[0] for t in range(4)])  # (4, H, W, 3) uint8
    pretrained = AutoencoderKLTemporalDecoder.from_pretrained(
        TINY.pretrained_model_name_or_path, subfolder="vae"
    )
    decoded = convergence.through_vae(pretrained, frames)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    # Measured: 26.8 dB through the pretrained VAE, whole or in chunks of 2; 13.3 through the stand-in's.
    untrained = convergence.through_vae(build_tiny_components(0)[1].eval(), frames)
    assert psnr(decoded, frames).mean() > psnr(untrained, frames).mean() + 5
    # Its temporal decoder started per frame (`cnx.pretrain_vae.start_per_frame`) and trained on clips of
    # `vae_frames` frames (2): it decodes a longer clip whole about as well as in chunks of that length
    # (0.02 dB apart; an earlier model's 0.5 dB below). From random weights, whole clips came out
    # 1.8-6.6 dB below.
    report = json.loads((Path(TINY.pretrained_model_name_or_path) / "pretrain_report.json").read_text())
    chunked = convergence.through_vae(pretrained, frames, report["config"]["vae_frames"])
    assert psnr(decoded, frames).mean() > psnr(chunked, frames).mean() - 1.0


def test_remembered_encodes_encode_each_distinct_input_once():
    import torch

    calls = []

    class CountingVAE(torch.nn.Module):
        dtype = torch.float32

        def encode(self, pixels):
            calls.append(pixels.shape)
            return pixels * 2

    vae = convergence.RememberedEncodes(CountingVAE())
    frames = torch.rand(2, 3, 8, 8)
    first = vae.encode(frames)
    assert vae.encode(frames.clone()) is first  # an equal input: the same output, no second encode
    assert torch.equal(vae.encode(frames + 1), (frames + 1) * 2)  # another input is encoded
    frames += 5  # changing the caller's tensor afterwards does not change what was remembered
    assert torch.equal(vae.encode(frames), frames * 2)
    assert len(calls) == 3 and vae.dtype == torch.float32  # attributes are the VAE's
