"""ControlNeXt: the published encoder's layout, output shapes, cross-normalised injection into the UNet.

Pitfall numbers refer to docs/pitfalls.md.
"""

import json
import math

import pytest
import torch
from torch import nn

from cnx.controlnext import (
    ControlNeXt,
    ControlNeXtSVD,
    controlnext_config_for,
    count_parameters,
    cross_normalize,
    encoder_shapes,
    match_moments,
)
from cnx.profiles import REPO_ROOT
from cnx.tiny import build_tiny_components
from cnx.weights import load_controlnext

# The released ControlNeXt-SVD-v2 encoder's tensor names and shapes, in its order. They are held here
# so the test runs from a fresh clone; the course workspace's manifest json, when present, is compared too.
PUBLISHED_SHAPES = {
    "time_embedding.linear_1.weight": (256, 128),
    "time_embedding.linear_1.bias": (256,),
    "time_embedding.linear_2.weight": (256, 256),
    "time_embedding.linear_2.bias": (256,),
    "embedding.0.weight": (64, 3, 3, 3),
    "embedding.0.bias": (64,),
    "embedding.1.weight": (64,),
    "embedding.1.bias": (64,),
    "embedding.3.weight": (64, 64, 3, 3),
    "embedding.3.bias": (64,),
    "embedding.4.weight": (64,),
    "embedding.4.bias": (64,),
    "embedding.6.weight": (128, 64, 3, 3),
    "embedding.6.bias": (128,),
    "embedding.7.weight": (128,),
    "embedding.7.bias": (128,),
    "down_res.0.norm1.weight": (128,),
    "down_res.0.norm1.bias": (128,),
    "down_res.0.conv1.weight": (128, 128, 3, 3),
    "down_res.0.conv1.bias": (128,),
    "down_res.0.time_emb_proj.weight": (128, 256),
    "down_res.0.time_emb_proj.bias": (128,),
    "down_res.0.norm2.weight": (128,),
    "down_res.0.norm2.bias": (128,),
    "down_res.0.conv2.weight": (128, 128, 3, 3),
    "down_res.0.conv2.bias": (128,),
    "down_res.1.norm1.weight": (128,),
    "down_res.1.norm1.bias": (128,),
    "down_res.1.conv1.weight": (256, 128, 3, 3),
    "down_res.1.conv1.bias": (256,),
    "down_res.1.time_emb_proj.weight": (256, 256),
    "down_res.1.time_emb_proj.bias": (256,),
    "down_res.1.norm2.weight": (256,),
    "down_res.1.norm2.bias": (256,),
    "down_res.1.conv2.weight": (256, 256, 3, 3),
    "down_res.1.conv2.bias": (256,),
    "down_res.1.conv_shortcut.weight": (256, 128, 1, 1),
    "down_res.1.conv_shortcut.bias": (256,),
    "down_sample.0.conv.weight": (128, 128, 3, 3),
    "down_sample.0.conv.bias": (128,),
    "down_sample.1.conv.weight": (256, 256, 3, 3),
    "down_sample.1.conv.bias": (256,),
    "mid_convs.0.0.weight": (256, 256, 3, 3),
    "mid_convs.0.0.bias": (256,),
    "mid_convs.0.2.weight": (256,),
    "mid_convs.0.2.bias": (256,),
    "mid_convs.0.3.weight": (256, 256, 3, 3),
    "mid_convs.0.3.bias": (256,),
    "mid_convs.0.4.weight": (256,),
    "mid_convs.0.4.bias": (256,),
    "mid_convs.1.weight": (320, 256, 1, 1),
    "mid_convs.1.bias": (320,),
}
PUBLISHED_TENSORS, PUBLISHED_PARAMETERS = 52, 3_526_400
MANIFEST = REPO_ROOT.parent / "shared" / "reference" / "controlnext_svd_v2_state_dict.json"
NUM_FRAMES = 4  # fewer than the tiny profile's 8 keeps every test fast


def moments(x):
    """Per-sample mean and unbiased std over (C, h, w) of (N, C, h, w)."""
    return x.mean((1, 2, 3)), x.std((1, 2, 3))


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_tiny_components(seed=0, num_frames=NUM_FRAMES)[0].eval()


@pytest.fixture(scope="module")
def tiny_controlnext(unet):
    torch.manual_seed(1)
    return ControlNeXt(**controlnext_config_for(unet.config.block_out_channels[0])).eval()


@pytest.fixture(scope="module")
def model(unet, tiny_controlnext):
    return ControlNeXtSVD(unet, tiny_controlnext)


def unet_inputs(batch_size=1, height=64, width=96, seed=0):
    """Inputs for the tiny UNet plus pose frames: (B, F, 8, H/8, W/8) latents, (B, F, 3, H, W) poses."""
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch_size, NUM_FRAMES, 8, height // 8, width // 8, generator=g),
        "timestep": torch.linspace(-0.5, 1.0, batch_size),  # c_noise = 0.25 ln sigma, one per sample
        "encoder_hidden_states": torch.randn(batch_size, 1, 32, generator=g),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]]).repeat(batch_size, 1),
        "pose_frames": torch.rand(batch_size, NUM_FRAMES, 3, height, width, generator=g),
    }


def plain(unet, inputs):
    args = {k: v for k, v in inputs.items() if k != "pose_frames"}
    return unet(**args).sample


def test_default_state_dict_matches_published_manifest():
    state = ControlNeXt().state_dict()
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    assert list(shapes.items()) == list(PUBLISHED_SHAPES.items())  # names, shapes and order
    assert len(shapes) == PUBLISHED_TENSORS
    assert sum(v.numel() for v in state.values()) == PUBLISHED_PARAMETERS
    if MANIFEST.exists():
        manifest = json.loads(MANIFEST.read_text())
        assert shapes == {key: tuple(shape) for key, shape in manifest["state_dict"].items()}
        assert (manifest["num_tensors"], manifest["num_parameters"]) == (
            PUBLISHED_TENSORS,
            PUBLISHED_PARAMETERS,
        )


def test_pitfall_21_every_3x3_conv_pads_by_one():
    """Pitfall 21: one encoder class for training and inference, every 3x3 conv padded by 1."""
    for config in ({}, controlnext_config_for(32)):
        convs = [m for m in ControlNeXt(**config).modules() if isinstance(m, nn.Conv2d)]
        three = [m for m in convs if m.kernel_size == (3, 3)]
        assert len(three) == 11  # embedding 3, residual blocks 2 x 2, down_sample 2, mid_convs 2
        assert all(m.padding == (1, 1) for m in three)
        assert sorted(m.stride[0] for m in three) == [1] * 8 + [2] * 3  # three halvings: H/8


@pytest.mark.parametrize("height,width", [(64, 96), (96, 64), (72, 120), (50, 34), (8, 8)])
def test_output_shapes_at_several_resolutions(tiny_controlnext, height, width):
    pose_frames = torch.rand(2, 3, 3, height, width)  # (B, F, 3, H, W)
    with torch.no_grad():
        out = tiny_controlnext(pose_frames, torch.tensor([0.1, 0.7]))
    assert out.shape == (6, 32, math.ceil(height / 8), math.ceil(width / 8))


def test_published_config_shapes_at_full_resolution_and_small_run():
    shapes = dict(encoder_shapes(ControlNeXt().config, (1, 21, 3, 1024, 576)))  # meta device: free
    assert shapes["embedding"] == (21, 128, 512, 288)
    assert shapes["down_sample.0"] == (21, 128, 256, 144)
    assert shapes["down_sample.1"] == (21, 256, 128, 72)
    assert shapes["mid_convs.1"] == (21, 320, 128, 72)  # SVD's latents are 128x72 at 1024x576
    assert dict(encoder_shapes(ControlNeXt().config, (1, 1, 3, 100, 60)))["mid_convs.1"] == (1, 320, 13, 8)
    with torch.no_grad():
        out = ControlNeXt()(torch.rand(1, 2, 3, 40, 24), 0.3)
    assert out.shape == (2, 320, 5, 3)


def test_noise_level_is_shared_by_a_samples_frames(tiny_controlnext):
    frame = torch.rand(1, 1, 3, 32, 48)
    pose_frames = frame.expand(2, 3, 3, 32, 48)  # every frame of both samples is the same picture
    with torch.no_grad():
        out = tiny_controlnext(pose_frames, torch.tensor([0.0, 1.0])).unflatten(0, (2, 3))
        scalar = tiny_controlnext(pose_frames, 1.0).unflatten(0, (2, 3))
    torch.testing.assert_close(out[0, 0], out[0, 2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 0], out[1, 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0, 0], out[1, 0])  # the noise level changes the features
    assert torch.allclose(scalar[0], out[1], atol=1e-6)  # a scalar is broadcast to every sample
    with pytest.raises(ValueError, match="one value per sample"):
        tiny_controlnext(pose_frames, torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(B, F, 3, H, W\)"):
        tiny_controlnext(pose_frames.flatten(0, 1), 0.0)


def test_match_moments_and_cross_normalize_give_the_hidden_statistics():
    g = torch.Generator().manual_seed(0)
    control = 5 * torch.randn(6, 32, 8, 12, generator=g) + 3  # (B*F, C, hc, wc)
    hidden = 0.1 * torch.randn(6, 32, 8, 12, generator=g) - 1  # (B*F, C, h, w)
    hidden[3] *= 40  # each sample keeps its own statistics
    for added in (match_moments(control, hidden), cross_normalize(control, hidden)):
        for got, want in zip(moments(added), moments(hidden), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Pooled to the hidden size (here by 2 exactly): the mean survives, the spatial pattern is averaged.
    pooled = cross_normalize(control, hidden[:, :, ::2, ::2])
    assert pooled.shape == (6, 32, 4, 6)
    torch.testing.assert_close(
        pooled.mean((1, 2, 3)), hidden[:, :, ::2, ::2].mean((1, 2, 3)), atol=1e-5, rtol=1e-4
    )
    expected = nn.functional.avg_pool2d(match_moments(control, hidden[:, :, ::2, ::2]), 2)
    torch.testing.assert_close(pooled, expected)
    # A constant control map (an all-black pose frame) gives the hidden mean, not NaN.
    flat = cross_normalize(torch.ones(6, 32, 8, 12), hidden)
    assert torch.isfinite(flat).all()
    torch.testing.assert_close(flat[:, 0, 0, 0], hidden.mean((1, 2, 3)))
    with pytest.raises(ValueError, match="block_out_channels"):
        cross_normalize(control[:, :16], hidden)


def test_scale_zero_and_no_pose_give_the_plain_unet_exactly(model, unet):
    inputs = unet_inputs(batch_size=2)
    with torch.no_grad():
        reference = plain(unet, inputs)
        assert torch.equal(model(**inputs, control_scale=0.0).sample, reference)
        assert torch.equal(model(**inputs, control_scale=torch.zeros(2)).sample, reference)
        no_pose = {k: v for k, v in inputs.items() if k != "pose_frames"}
        assert torch.equal(model(**no_pose).sample, reference)
        assert not torch.allclose(model(**inputs).sample, reference)  # default scale 0.2 changes it
    assert not unet.down_blocks[0]._forward_hooks  # the hook lives for one call only


def test_scale_is_per_sample_for_classifier_free_guidance(model, unet):
    inputs = unet_inputs(batch_size=2)
    with torch.no_grad():
        reference = plain(unet, inputs)
        out = model(**inputs, control_scale=torch.tensor([0.0, 0.2])).sample
        out_float = model(**inputs, control_scale=0.2).sample
    assert torch.equal(out[0], reference[0])  # the unconditional half: control off
    assert not torch.allclose(out[1], reference[1])
    torch.testing.assert_close(out[1], out_float[1])
    with pytest.raises(ValueError, match="one value per sample"):
        model(**inputs, control_scale=torch.ones(3))


def test_injection_adds_cross_normalised_features_and_leaves_skips_untouched(model, unet):
    """The hidden states passed on gain scale * cross_normalize(...); the skip keeps the original."""
    inputs, scale = unet_inputs(batch_size=2), 0.5
    seen = {}

    def grab(name):
        def hook(module, args, kwargs, *output):
            seen.setdefault(name, []).append((args, kwargs, output))

        return hook

    handles = [
        unet.down_blocks[0].register_forward_hook(grab("down0"), with_kwargs=True),  # runs before injection
        unet.down_blocks[1].register_forward_pre_hook(grab("down1"), with_kwargs=True),
        unet.up_blocks[0].register_forward_pre_hook(grab("up0"), with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            plain(unet, inputs)
            model(**inputs, control_scale=scale)
            control = model.controlnext(inputs["pose_frames"], inputs["timestep"])  # (B*F, 32, 8, 12)
    finally:
        for handle in handles:
            handle.remove()

    hidden, res_samples = seen["down0"][1][2][0]  # (B*F, 32, 4, 6) and the block's skip states
    passed_on = seen["down1"][1][1]["hidden_states"]
    added = (passed_on - hidden) / scale
    torch.testing.assert_close(added, cross_normalize(control, hidden), atol=1e-5, rtol=1e-4)
    # The added features carry the hidden states' per-sample mean (pooling by exactly 2 keeps it).
    torch.testing.assert_close(added.mean((1, 2, 3)), hidden.mean((1, 2, 3)), atol=1e-4, rtol=1e-3)
    # Before pooling they also carry its std; pooling averages 2x2 cells, so the std can only shrink.
    matched = match_moments(control, hidden)
    torch.testing.assert_close(matched.std((1, 2, 3)), hidden.std((1, 2, 3)), atol=1e-4, rtol=1e-3)
    assert (added.std((1, 2, 3)) <= hidden.std((1, 2, 3)) + 1e-5).all()
    # The skip to up_blocks[0] (down_blocks[0]'s last output) is identical with and without control.
    plain_skips = seen["up0"][0][1]["res_hidden_states_tuple"]
    control_skips = seen["up0"][1][1]["res_hidden_states_tuple"]
    assert torch.equal(plain_skips[0], control_skips[0])
    assert torch.equal(control_skips[0], res_samples[-1])
    assert not torch.allclose(plain_skips[1], control_skips[1])  # down_blocks[1] saw the control


@pytest.mark.parametrize("height,width", [(64, 96), (72, 120), (40, 56)])
def test_wrapped_unet_runs_at_resolutions_not_divisible_by_64(model, height, width):
    inputs = unet_inputs(height=height, width=width)
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    assert out.shape == (1, NUM_FRAMES, 4, height // 8, width // 8)
    assert torch.isfinite(out).all()


def test_gradients_reach_every_controlnext_parameter(unet):
    torch.manual_seed(2)
    controlnext = ControlNeXt(**controlnext_config_for(32))
    model = ControlNeXtSVD(unet, controlnext)
    model(**unet_inputs(batch_size=2)).sample.square().mean().backward()
    no_grad = [n for n, p in controlnext.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    unet.zero_grad(set_to_none=True)


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(unet):
    torch.manual_seed(3)
    controlnext = ControlNeXt(**controlnext_config_for(32))
    model = ControlNeXtSVD(unet, controlnext).train()
    inputs = unet_inputs(batch_size=1)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(**inputs).sample
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in controlnext.named_parameters()}

    out_plain, grads_plain = run()
    model.enable_gradient_checkpointing()
    calls = []
    inner = controlnext._gradient_checkpointing_func
    controlnext._gradient_checkpointing_func = lambda *a: calls.append(1) or inner(*a)
    try:
        out_ckpt, grads_ckpt = run()
    finally:
        model.disable_gradient_checkpointing()
        unet.eval().zero_grad(set_to_none=True)
    assert len(calls) == 4  # embedding, two residual blocks, mid convs
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_save_and_load_round_trip(tiny_controlnext, tmp_path):
    tiny_controlnext.save_pretrained(tmp_path / "controlnext")
    assert (tmp_path / "controlnext" / "diffusion_pytorch_model.safetensors").exists()
    pose_frames = torch.rand(1, 2, 3, 32, 48)
    with torch.no_grad():
        want = tiny_controlnext(pose_frames, 0.5)
        for loaded in (ControlNeXt.from_pretrained(tmp_path / "controlnext"), load_controlnext(tmp_path)):
            assert loaded.config.control_channels == 32 and loaded.config.out_channels == [32, 64]
            assert torch.equal(loaded.eval()(pose_frames, 0.5), want)


def test_wrapper_refuses_mismatched_widths_and_frames(unet, model):
    with pytest.raises(ValueError, match=r"control_channels=32"):
        ControlNeXtSVD(unet, ControlNeXt())
    inputs = unet_inputs()
    inputs["pose_frames"] = inputs["pose_frames"][:, :2]
    with pytest.raises(ValueError, match=r"differ in \(B, F\)"):
        model(**inputs)


def test_tiny_config_is_light_and_published_config_is_for_svd():
    assert controlnext_config_for(320) == {"control_channels": 320}
    assert count_parameters(ControlNeXt(**controlnext_config_for(320))) == PUBLISHED_PARAMETERS
    assert count_parameters(ControlNeXt(**controlnext_config_for(32))) < 300_000


def test_runs_under_bf16_autocast_with_fp32_weights(model, unet):
    """Mixed precision as in training: fp32 weights, bf16 autocast; the moments are taken in float32."""
    inputs = unet_inputs(batch_size=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, control_scale=torch.tensor([0.0, 0.2])).sample
        reference = plain(unet, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.equal(out[0], reference[0]) and not torch.equal(out[1], reference[1])
