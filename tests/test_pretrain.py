"""`cnx pretrain-tiny`: a short run writes a loadable, reproducible pipeline folder that learned something."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline
from safetensors.torch import load_file

import cnx.pretrain
import cnx.pretrain_unet
import cnx.pretrain_vae
from cnx.pipeline import ControlNeXtSVDPipeline
from cnx.pretrain import parse_args, pretrain
from cnx.pretrain_recipe import PretrainConfig, cosine_lr, heldout_sets, synthetic_batch
from cnx.pretrain_unet import WithoutControl, heldout_unet_loss, train_unet
from cnx.pretrain_vae import (
    heldout_psnr,
    random_crop,
    start_per_frame,
    temporal_layers_skipped,
    train_vae,
    vae_batch,
    vae_loss,
)
from cnx.step import Models
from cnx.tiny import build_tiny_components

SHORT = [
    "--seed", "3",
    "--width", "64", "--height", "64",
    "--vae_steps", "4", "--vae_batch_size", "1", "--vae_frames", "2", "--vae_crop", "32",
    "--unet_steps", "2", "--num_frames", "2",
    "--heldout_clips", "1", "--heldout_sigmas", "2", "--warmup", "2",
    "--colour_anchor", "0.5", "--float16", "True",
]  # fmt: skip
WEIGHTS = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]


def run_cli(out_dir):
    command = [sys.executable, "-m", "cnx.cli", "pretrain-tiny", str(out_dir), *SHORT]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    return [(root / name, run_cli(root / name)) for name in ("a", "b")]


def test_the_folder_loads_as_svd_and_as_controlnext_pipeline(runs):
    folder, done = runs[0]
    assert "held-out PSNR" in done.stdout and "pretrained tiny SVD" in done.stdout
    svd = StableVideoDiffusionPipeline.from_pretrained(folder)
    ours = ControlNeXtSVDPipeline.from_pretrained(folder)
    assert ours.controlnext is None
    report = json.loads((folder / "pretrain_report.json").read_text())
    for pipe in (svd, ours):
        assert pipe.unet.config.num_frames == 2
        assert pipe.vae.config.scaling_factor == report["vae"]["scaling_factor"]
    # The same classes and configs as the stand-in, apart from the trained latent scaling factor.
    config = PretrainConfig(**report["config"])
    unet, vae, _, _ = build_tiny_components(
        3, config.unet_width, config.vae_width, num_frames=2, unet_inner_width=config.unet_inner_width
    )

    def plain(config):  # as written to config.json: tuples become lists
        return json.loads(
            json.dumps({k: v for k, v in config.items() if k != "scaling_factor" and k[0] != "_"})
        )

    assert plain(svd.unet.config) == plain(unet.config)
    assert plain(svd.vae.config) == plain(vae.config)


def test_report_and_readme(runs):
    folder, _ = runs[0]
    report = json.loads((folder / "pretrain_report.json").read_text())
    assert report["vae"]["steps"] == 4 and report["unet"]["steps"] == 2
    assert report["config"]["seed"] == 3 and report["config"]["width"] == 64
    for stage in ("vae", "unet"):
        assert report[stage]["seconds"] > 0
    assert np.isfinite([report["unet"]["heldout_loss_start"], report["unet"]["heldout_loss_end"]]).all()
    readme = (folder / "README.md").read_text()
    assert report["command"] in readme and "--vae_steps=4" in report["command"]
    # The command in the report parses back to the run's configuration.
    out_dir, config = parse_args(report["command"].split()[2:])
    assert out_dir == folder and config == PretrainConfig(**report["config"])


def test_even_a_short_run_improves_the_vae_on_heldout_frames(runs):
    report = json.loads((runs[0][0] / "pretrain_report.json").read_text())
    assert report["vae"]["heldout_psnr"] > report["vae"]["heldout_psnr_untrained"] + 0.1


def test_float16_weights_load_as_float32_and_the_reported_figures_are_those_of_the_stored_weights(runs):
    folder, _ = runs[0]
    for weights in WEIGHTS:
        assert {t.dtype for t in load_file(folder / weights).values()} == {torch.float16}
    pipe = StableVideoDiffusionPipeline.from_pretrained(folder)
    assert pipe.vae.dtype == pipe.unet.dtype == torch.float32  # float32 compute unless told otherwise
    report = json.loads((folder / "pretrain_report.json").read_text())
    config = PretrainConfig(**report["config"])
    heldout_frames, heldout_clips = heldout_sets(config)
    assert heldout_psnr(pipe.vae, heldout_frames) == pytest.approx(report["vae"]["heldout_psnr"], abs=1e-4)
    models = Models(pipe.vae, pipe.image_encoder, None, WithoutControl(pipe.unet), torch.float32)
    loss = heldout_unet_loss(models, heldout_clips, config.heldout_sigmas)
    assert loss == pytest.approx(report["unet"]["heldout_loss_end"], abs=1e-5)


def test_the_colour_anchor_adds_the_mse_of_three_latent_channels_against_the_8x8_mean_colour():
    _, vae, _, _ = build_tiny_components(0)
    clips = synthetic_batch(("anchor",), 1, 2, 3, 32, 48)  # (1, 2, 3, 48, 32)
    loss = {w: vae_loss(vae, clips, 0.0, torch.Generator().manual_seed(0), w) for w in (0.0, 2.0)}
    mean = vae.encode(clips[0]).latent_dist.mean[:, :3]  # (2, 3, 6, 4)
    colour = clips[0].reshape(2, 3, 6, 8, 4, 8).mean(dim=(3, 5))  # (2, 3, 6, 4): each 8x8 block's mean
    assert float(loss[2.0] - loss[0.0]) == pytest.approx(2 * float((mean - colour).square().mean()), rel=1e-5)


@torch.no_grad()
def test_a_decoder_started_per_frame_decodes_a_clip_as_its_frames_one_by_one():
    vae = build_tiny_components(0)[1].eval()
    latents = torch.randn(4, 4, 6, 4, generator=torch.Generator().manual_seed(0))  # (F, 4, H/8, W/8)

    def whole_and_alone():
        whole = vae.decode(latents, num_frames=4).sample
        return whole, torch.cat([vae.decode(z[None], num_frames=1).sample for z in latents])

    whole, alone = whole_and_alone()
    assert (whole - alone).abs().max() > 0.01  # random temporal layers mix neighbouring frames
    start_per_frame(vae)
    torch.testing.assert_close(*whole_and_alone())


@torch.no_grad()
def test_skipping_the_temporal_layers_changes_nothing_once_they_start_per_frame():
    vae = build_tiny_components(0)[1].eval()
    latents = torch.randn(4, 4, 6, 4, generator=torch.Generator().manual_seed(0))  # (F, 4, H/8, W/8)
    decode = lambda: vae.decode(latents, num_frames=4).sample  # noqa: E731
    random_layers = decode()
    with temporal_layers_skipped(vae):
        skipped = decode()
    assert (random_layers - skipped).abs().max() > 0.01  # they do run, and are not identity yet
    torch.testing.assert_close(decode(), random_layers)  # and are back after it
    with temporal_layers_skipped(vae, skip=False):
        torch.testing.assert_close(decode(), random_layers)
    start_per_frame(vae)
    with temporal_layers_skipped(vae):
        skipped = decode()
    torch.testing.assert_close(decode(), skipped, rtol=0, atol=1e-5)


def test_the_first_share_of_vae_steps_skips_the_temporal_layers_and_the_rest_trains_them(monkeypatch):
    skips = []
    context = cnx.pretrain_vae.temporal_layers_skipped
    monkeypatch.setattr(
        cnx.pretrain_vae,
        "temporal_layers_skipped",
        lambda vae, skip: skips.append(skip) or context(vae, skip),
    )
    config = PretrainConfig(
        width=32, height=32, vae_steps=5, vae_batch_size=1, vae_crop=16, warmup=1, vae_skip_temporal=0.6
    )
    vae = build_tiny_components(0)[1]
    temporal = [m for m in vae.decoder.modules() if type(m).__name__ == "TemporalResnetBlock"]
    train_vae(vae, config, synthetic_batch(("heldout",), 1, 2, 3, 32, 32), False)
    assert skips == [True] * 3 + [False] * 2
    skippable = [m for m in vae.decoder.modules() if type(m).__name__ == "SpatioTemporalResBlock"]
    assert skippable and all("forward" not in block.__dict__ for block in skippable)  # the class's again
    assert any(block.conv2.weight.abs().max() > 0 for block in temporal)  # the last two steps trained them


@pytest.mark.parametrize("decay", [True, False])
def test_the_colour_anchor_decays_with_the_learning_rate(decay, monkeypatch):
    weights = []
    loss = cnx.pretrain_vae.vae_loss
    monkeypatch.setattr(cnx.pretrain_vae, "vae_loss", lambda *a: weights.append(a[-1]) or loss(*a))
    config = PretrainConfig(
        width=32, height=32, vae_steps=5, vae_batch_size=1, vae_crop=16, warmup=2, colour_anchor=2.0,
        anchor_decay=decay,
    )  # fmt: skip
    train_vae(build_tiny_components(0)[1], config, synthetic_batch(("heldout",), 1, 2, 3, 32, 32), False)
    factors = [cosine_lr(step, 5, 2) if decay else 1.0 for step in range(5)]
    assert weights == pytest.approx([2.0 * f for f in factors])


@pytest.mark.parametrize("bf16", [True, False])
def test_training_steps_of_both_stages_run_under_bf16_autocast_exactly_when_asked(bf16, monkeypatch):
    seen = []  # (stage, autocast on, its dtype) per training step

    def spy(stage, loss):
        def wrapped(*args, **kwargs):
            if stage == "vae" or len(args) == 3:  # held-out UNet losses pass fixed sigmas as a 4th
                seen.append((stage, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return loss(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(cnx.pretrain_vae, "vae_loss", spy("vae", cnx.pretrain_vae.vae_loss))
    monkeypatch.setattr(cnx.pretrain_unet, "svd_loss", spy("unet", cnx.pretrain_unet.svd_loss))
    config = PretrainConfig(
        width=32, height=32, vae_steps=2, vae_batch_size=1, vae_crop=16, unet_steps=2, num_frames=2,
        warmup=1, bf16=bf16,
    )  # fmt: skip
    unet, vae, image_encoder, _ = build_tiny_components(0, 64, 64, 2, 64)
    image_encoder.requires_grad_(False)
    heldout = synthetic_batch(("heldout",), 1, 2, 3, 32, 32)
    train_vae(vae, config, heldout, False)
    train_unet(unet, vae, image_encoder, config, heldout, False)
    assert seen == [("vae", bf16, torch.bfloat16)] * 2 + [("unet", bf16, torch.bfloat16)] * 2


def test_the_vae_loss_is_float32_under_bf16_autocast_and_close_to_the_float32_loss():
    _, vae, _, _ = build_tiny_components(0)
    clips = synthetic_batch(("bf16",), 2, 2, 3, 32, 32)
    losses = []
    for enabled in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=enabled):
            losses.append(vae_loss(vae, clips, 1e-6, torch.Generator().manual_seed(0), 1.0))
    assert losses[1].dtype == torch.float32
    assert float(losses[1]) == pytest.approx(float(losses[0]), rel=0.02)


WHOLE_FRAME_STEP = """
from cnx.pretrain_recipe import PretrainConfig, heldout_sets
from cnx.pretrain_vae import train_vae
from cnx.tiny import build_tiny_components
config = PretrainConfig(vae_steps=1, vae_crop=0, vae_batch_size=1, heldout_clips=1, warmup=1, bf16=True)
train_vae(build_tiny_components(0)[1], config, heldout_sets(config)[0], progress=False)
"""


def test_a_bf16_vae_step_on_whole_128x192_frames_finishes():
    # oneDNN's bf16 weight gradient of the decoder's Conv3d(3, 3) over frames hung at this size
    # (torch 2.13, AMX CPU); `temporal_convs_as_conv2d` computes it as a Conv2d. A subprocess, so
    # that a hang fails here instead of stalling the suite.
    done = subprocess.run(
        [sys.executable, "-c", WHOLE_FRAME_STEP], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_same_seed_gives_the_same_bytes(runs):
    (a, _), (b, _) = runs
    for name in WEIGHTS + ["unet/config.json", "vae/config.json", "model_index.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    readme_b = (b / "README.md").read_text().replace(str(b), str(a))  # the command names its folder
    assert (a / "README.md").read_text() == readme_b
    for name in WEIGHTS:
        tensors_a, tensors_b = load_file(a / name), load_file(b / name)
        assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    report_a, report_b = (json.loads((x / "pretrain_report.json").read_text()) for x in (a, b))
    for stage in ("vae", "unet"):
        report_a[stage].pop("seconds"), report_b[stage].pop("seconds")
    report_b["command"] = report_b["command"].replace(str(b), str(a))
    assert report_a == report_b


def test_fresh_dancers_every_step_and_heldout_apart():
    first = synthetic_batch(("pretrain-vae", 0, 0), 2, 2, 3, 32, 48)
    assert first.shape == (2, 2, 3, 48, 32) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, synthetic_batch(("pretrain-vae", 0, 0), 2, 2, 3, 32, 48))
    assert not torch.equal(first, synthetic_batch(("pretrain-vae", 0, 1), 2, 2, 3, 32, 48))
    assert not torch.equal(first[0], first[1])  # every clip of a batch its own dancer


def test_vae_steps_that_skip_the_temporal_layers_take_a_dancer_per_frame():
    config = PretrainConfig(seed=5, width=32, height=48, vae_batch_size=2, vae_frames=3, vae_crop=16)
    clips = vae_batch(config, 7, skip=False)
    assert clips.shape == (2, 3, 3, 16, 16)  # clips of 3 frames for the temporal layers
    frames = vae_batch(config, 7, skip=True)
    assert frames.shape == (6, 1, 3, 16, 16)  # as many frames, each its own dancer and window
    assert len({frame.numpy().tobytes() for frame in frames}) == 6
    assert torch.equal(frames, vae_batch(config, 7, skip=True))
    assert not torch.equal(frames, vae_batch(config, 8, skip=True))


def test_schedule():
    assert cosine_lr(0, 100, 10) == pytest.approx(0.1) and cosine_lr(10, 100, 10) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 10) == pytest.approx(0.0, abs=1e-9)


def test_the_global_rng_is_left_alone():
    _, vae, _, _ = build_tiny_components(0)
    config = PretrainConfig(width=32, height=32, vae_steps=1, vae_batch_size=1, vae_crop=16, warmup=1)
    heldout = synthetic_batch(("heldout",), 1, 2, 3, 32, 32)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    train_vae(vae, config, heldout, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_vae_crops_are_windows_of_the_clip_at_multiples_of_8():
    clips = torch.arange(2 * 2 * 3 * 48 * 32, dtype=torch.float32).reshape(2, 2, 3, 48, 32)
    crops = random_crop(clips, 16, np.random.default_rng(0))
    assert crops.shape == (2, 2, 3, 16, 16)
    for clip, crop in zip(clips, crops, strict=True):
        y, x = np.argwhere(clip[0, 0].numpy() == float(crop[0, 0, 0, 0]))[0]
        assert y % 8 == 0 and x % 8 == 0
        assert torch.equal(clip[..., y : y + 16, x : x + 16], crop)  # the same window in every frame
    assert random_crop(clips, 0, np.random.default_rng(0)) is clips
    with pytest.raises(ValueError, match="vae_crop"):
        random_crop(clips, 12, np.random.default_rng(0))


def test_true_or_false_flags_take_only_those_words(tmp_path, capsys):
    assert parse_args([str(tmp_path), "--float16", "False"])[1].float16 is False
    with pytest.raises(SystemExit):
        parse_args([str(tmp_path), "--float16", "maybe"])
    assert "--float16" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--width", "100"], "--width"),
        (["--vae_width", "48"], "--vae_width"),
        (["--unet_inner_width", "80"], "--unet_inner_width"),
        (["--vae_crop", "60"], "--vae_crop"),
        (["--vae_crop", "256"], "--vae_crop"),
        (["--num_frames", "0"], "--num_frames"),
        (["--heldout_clips", "0"], "--heldout_clips"),
        (["--kl_weight", "-1"], "--kl_weight"),
        (["--colour_anchor", "-0.5"], "--colour_anchor"),
        (["--unet_lr", "0"], "--unet_lr"),
        (["--vae_steps", "-5"], "--vae_steps"),
        (["--vae_skip_temporal", "1.5"], "--vae_skip_temporal"),
    ],
)
def test_bad_flags_stop_before_any_training(flags, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args([str(tmp_path / "out"), *flags])
    assert stopped.value.code == 2 and named in capsys.readouterr().err
    # `pretrain` itself refuses the same settings before it builds or writes anything.
    name, value = flags[0][2:], flags[1]
    config = replace(PretrainConfig(), **{name: type(getattr(PretrainConfig(), name))(value)})
    with pytest.raises(ValueError, match=named):
        pretrain(tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def test_only_temporal_layers_started_per_frame_may_be_skipped():
    config = PretrainConfig(per_frame_start=False)
    assert any("--vae_skip_temporal needs --per_frame_start True" in p for p in config.problems())
    assert replace(config, vae_skip_temporal=0.0).problems() == []


TINY_RUN = [
    "--width", "32", "--height", "32", "--vae_steps", "1", "--vae_batch_size", "1", "--vae_crop", "16",
    "--unet_steps", "3", "--num_frames", "2", "--heldout_clips", "1", "--heldout_sigmas", "1",
    "--warmup", "1",
]  # fmt: skip


def test_a_non_finite_training_loss_stops_the_run_naming_stage_and_step_and_writes_nothing(
    tmp_path, monkeypatch, capsys
):
    calls = []

    def nan_at_the_second_step(models, pixels, generator, sigma=None):
        per_sample = svd_loss(models, pixels, generator, sigma)
        if sigma is None:  # a training step
            calls.append(len(calls) + 1)
            return per_sample * (float("nan") if len(calls) == 2 else 1.0)
        return per_sample

    svd_loss = cnx.pretrain_unet.svd_loss
    monkeypatch.setattr(cnx.pretrain_unet, "svd_loss", nan_at_the_second_step)
    assert cnx.pretrain.main([str(tmp_path / "out"), *TINY_RUN]) == 1
    assert calls == [1, 2]  # no step after it
    err = capsys.readouterr().err
    assert "stage 2 (UNet): non-finite loss at step 2" in err and "without writing a model" in err
    assert not (tmp_path / "out").exists()


def test_a_model_with_non_finite_weights_is_never_written(tmp_path, monkeypatch):
    def poisoned(unet, *args):
        with torch.no_grad():
            unet.conv_out.weight[0, 0, 0, 0] = float("nan")
        return {"heldout_loss_start": 1.0, "heldout_loss_end": 1.0}

    monkeypatch.setattr(cnx.pretrain, "train_unet", poisoned)
    _, config = parse_args([str(tmp_path / "out"), *TINY_RUN])
    with pytest.raises(FloatingPointError, match="UNet has 1 non-finite weights, conv_out.weight"):
        pretrain(tmp_path / "out", config, progress=False)
    assert not (tmp_path / "out").exists()
