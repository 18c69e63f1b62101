"""`cnx.cpu_kernels`: the same sums as oneDNN's unsafe bf16 kernels would compute, and when they apply."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cnx.pretrain_unet
from cnx.cpu_kernels import (
    contiguous_group_norms,
    conv3d_weight_grads_need_conv2d,
    onednn_runs_bf16_on_amx,
    temporal_convs_as_conv2d,
)
from cnx.pretrain_recipe import PretrainConfig, synthetic_batch
from cnx.pretrain_vae import random_crop, start_per_frame, vae_loss
from cnx.tiny import build_tiny_components

AMX = frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})  # Intel Sapphire Rapids and later
ZEN4 = frozenset({"avx512f", "avx512_bf16"})  # AMD EPYC: native bf16, no AMX


@pytest.mark.parametrize(
    ("flags", "environ", "amx"),
    [
        (AMX, {}, True),
        (AMX, {"ONEDNN_MAX_CPU_ISA": "ALL"}, True),
        (AMX, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, True),
        (AMX, {"ONEDNN_MAX_CPU_ISA": "avx10_1_512_amx_fp16"}, True),
        (AMX, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, False),  # how the tests try Zen 4's kernels
        (AMX, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, False),
        (AMX, {"DNNL_MAX_CPU_ISA": "AVX2"}, False),  # oneDNN's older name for the same variable
        (ZEN4, {}, False),
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, False),  # a cap adds nothing the CPU lacks
        (frozenset(), {}, False),
    ],
)
def test_conv3d_weight_grads_compute_as_conv2d_unless_onednn_runs_bf16_on_amx(flags, environ, amx):
    assert onednn_runs_bf16_on_amx(flags, environ) is amx
    assert conv3d_weight_grads_need_conv2d(flags, environ) is not amx


def test_every_unet_conv3d_computes_as_a_conv2d_with_the_same_gradients():
    unet = build_tiny_components(0, 64, 64, 2, 64)[0]
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convs) == 16  # the temporal resnets' conv1 and conv2
    x = torch.randn(1, 64, 2, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, C, F, H, W)
    conv = convs[0]
    grads = []
    for rewritten in (False, True):
        conv.zero_grad()
        with temporal_convs_as_conv2d(unet, enabled=rewritten):
            assert ("forward" in vars(conv)) is rewritten
            conv(x).square().mean().backward()  # float32: the reference
        grads.append(conv.weight.grad.clone())
    torch.testing.assert_close(*grads)
    assert all("forward" not in vars(m) for m in convs)


GUARD = """
import torch
from cnx.cpu_kernels import conv3d_weight_grads_need_conv2d
from cnx.pretrain_recipe import PretrainConfig, synthetic_batch
from cnx.pretrain_unet import train_unet
from cnx.pretrain_vae import train_vae
from cnx.tiny import build_tiny_components

assert conv3d_weight_grads_need_conv2d(), "oneDNN held below AMX: the Conv2d workaround must be on"
config = PretrainConfig(
    seed=3, width=64, height=64, vae_steps=2, vae_batch_size=1, vae_crop=32, vae_skip_temporal=0.5,
    unet_steps=2, num_frames=2, heldout_clips=1, heldout_sigmas=1, warmup=1, float16=False, bf16=True,
)
heldout = synthetic_batch(("guard",), 1, 2, 3, 64, 64)  # (1, 2, 3, 64, 64): both stages' held-out clip
runs = []
for _ in range(2):
    unet, vae, encoder, _ = build_tiny_components(3, 64, 64, 2, 64)
    encoder.requires_grad_(False)
    figures = train_vae(vae, config, heldout, False) | train_unet(unet, vae, encoder, config, heldout, False)
    weights = {f"vae.{k}": v for k, v in vae.state_dict().items()}
    weights |= {f"unet.{k}": v for k, v in unet.state_dict().items()}
    runs.append((figures, weights))
(figures, weights), (figures_again, weights_again) = runs
assert all(torch.isfinite(torch.tensor(v)).all() for v in figures.values()), figures
bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
assert not bad, f"non-finite weights: {bad[:5]}"
differ = [k for k in weights if not torch.equal(weights[k], weights_again[k])]
assert figures == figures_again and not differ, f"two runs differ: {differ[:5]}"
print(figures)
"""


def test_bf16_pretraining_steps_are_finite_and_repeat_with_onednn_held_below_amx():
    # Without AMX (AMD EPYC with avx512_bf16, or here held to AVX512_CORE_BF16), oneDNN's bf16
    # Conv3d weight gradient gave the UNet's temporal resnets NaN at the first step and runs that
    # differed (torch 2.13). Both stages' bf16 steps (VAE and UNet, the latter through
    # `cnx.step.training_step`) run twice from the same seed: finite, and the same weights.
    environ = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    done = subprocess.run(
        [sys.executable, "-c", GUARD], capture_output=True, text=True, timeout=300, env=environ
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize(("bf16", "needed"), [(True, True), (True, False), (False, True)])
def test_unet_steps_compute_the_temporal_convs_as_conv2d_exactly_under_bf16_where_needed(
    bf16, needed, monkeypatch
):
    seen = []  # per training step: whether the UNet's first Conv3d computes as a Conv2d

    def spy(models, pixels, generator, sigma=None):
        if sigma is None:  # a training step; held-out losses pass fixed sigmas
            conv = next(m for m in models.model.unet.modules() if isinstance(m, torch.nn.Conv3d))
            seen.append("forward" in vars(conv))
            # Not the loss itself: without AMX the Conv3d's own bf16 gradient would be garbage.
            return torch.ones(len(pixels), requires_grad=True)
        return loss(models, pixels, generator, sigma)

    loss = cnx.pretrain_unet.svd_loss
    monkeypatch.setattr(cnx.pretrain_unet, "svd_loss", spy)
    monkeypatch.setattr(cnx.pretrain_unet, "conv3d_weight_grads_need_conv2d", lambda: needed)
    config = PretrainConfig(
        width=32, height=32, unet_steps=2, num_frames=2, heldout_sigmas=1, warmup=1, bf16=bf16
    )
    unet, vae, image_encoder, _ = build_tiny_components(0, 64, 64, 2, 64)
    image_encoder.requires_grad_(False)
    heldout = synthetic_batch(("heldout",), 1, 2, 3, 32, 32)
    cnx.pretrain_unet.train_unet(unet, vae, image_encoder, config, heldout, False)
    assert seen == [bf16 and needed] * 2
    assert all("forward" not in vars(m) for m in unet.modules())


def test_every_decoder_conv3d_computes_as_a_conv2d_with_the_same_output_and_gets_its_own_forward_back(
    monkeypatch,
):
    vae = build_tiny_components(0)[1]
    convs = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv3d)]
    assert vae.decoder.time_conv_out in convs and len(convs) > 1  # and the temporal resnets' convs
    conv2d, calls = torch.nn.functional.conv2d, []
    monkeypatch.setattr(
        torch.nn.functional, "conv2d", lambda x, *a, **k: calls.append(x.shape) or conv2d(x, *a, **k)
    )
    for conv in convs:
        x = torch.randn(2, conv.in_channels, 3, 4, 5)  # (B, C, F, H, W)
        expected = torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=conv.padding)
        with temporal_convs_as_conv2d(vae):
            torch.testing.assert_close(conv(x), expected)
            with torch.autocast("cpu", torch.bfloat16):
                assert conv(x).dtype == torch.bfloat16  # autocast still applies
        assert calls[-2:] == [(2, conv.in_channels, 3, 20)] * 2  # (B, C, F, H*W)
        assert "forward" not in vars(conv)
    assert len(calls) == 2 * len(convs)


def test_a_conv3d_that_mixes_pixels_is_not_rewritten_as_a_conv2d():
    vae = build_tiny_components(0)[1]
    vae.decoder.time_conv_out = torch.nn.Conv3d(3, 3, (3, 3, 3), padding=1)
    with pytest.raises(ValueError, match="mixes pixels"):
        with temporal_convs_as_conv2d(vae):
            pass
    assert all("forward" not in vars(m) for m in vae.decoder.modules())


@pytest.mark.both_cores  # two threads: the race needs them
def test_a_bf16_vae_step_that_trains_the_temporal_layers_gives_the_same_gradients_every_time():
    # With 2 threads, oneDNN's bf16 weight gradient of the full-resolution temporal Conv3d was now
    # and then garbage (3-7 of 239 gradients off in 6-8 repeats); as a Conv2d every repeat is equal.
    c = PretrainConfig()
    vae = build_tiny_components(c.seed, c.unet_width, c.vae_width, c.num_frames, c.unet_inner_width)[1]
    start_per_frame(vae)
    vae.train()
    hooks = contiguous_group_norms(vae)  # as in training: the layouts the race showed up with
    clips = synthetic_batch(("determinism", 0, 0), 4, 2, 3, 128, 192)
    clips = random_crop(clips, 64, np.random.default_rng(0))  # (4, 2, 3, 64, 64) as in training
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    grads = []
    try:
        for _ in range(4):
            vae.zero_grad()
            with torch.autocast("cpu", torch.bfloat16), temporal_convs_as_conv2d(vae):
                loss = vae_loss(vae, clips, 1e-6, torch.Generator().manual_seed(0), 1.0)
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None})
    finally:
        torch.set_num_threads(threads)
        for hook in hooks:
            hook.remove()
    first, *others = grads
    differ = sorted({n for other in others for n in first if not torch.equal(first[n], other[n])})
    assert not differ


def test_group_norms_get_contiguous_inputs_with_the_same_output_until_the_hooks_go():
    norm = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)  # as oneDNN's bf16 convs give
    expected = torch.nn.functional.group_norm(x.contiguous(), 4, norm.weight, norm.bias)
    handles = contiguous_group_norms(torch.nn.Sequential(torch.nn.Identity(), norm))
    assert len(handles) == 1
    seen = []  # what the norm itself receives: this hook runs after the copy
    norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    torch.testing.assert_close(norm(x), expected)
    for handle in handles:
        handle.remove()
    norm(x)
    assert seen == [True, False]  # the copy ran before the norm, and is gone with its hook
