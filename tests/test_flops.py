"""cnx.flops and cnx.profiling: what a step's FLOPs split into, checked on the tiny model; utilisations."""

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cnx.attention import use_default_cross_attention, use_single_token_cross_attention
from cnx.controlnext import ControlNeXt, ControlNeXtSVD, controlnext_config_for
from cnx.flops import ATTENTION_FLOPS, StepFlops, count, model_flops, peak_tflops
from cnx.profiling import busy_time, idle_fraction, summarize, top_by_time
from cnx.trainable import select_trainable

SHAPE = (1, 2, 64, 64)  # (B, F, H, W)


@pytest.fixture(scope="module")
def parts(tiny_svd_dir):
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel

    unet = UNetSpatioTemporalConditionModel.from_pretrained(tiny_svd_dir, subfolder="unet")
    vae = AutoencoderKLTemporalDecoder.from_pretrained(tiny_svd_dir, subfolder="vae").requires_grad_(False)
    torch.manual_seed(0)
    controlnext = ControlNeXt(**controlnext_config_for(unet.config.block_out_channels[0]))
    model = ControlNeXtSVD(unet, controlnext)
    use_default_cross_attention(model.unet)  # the original's attention: every FLOP it spends
    return model, vae


def inputs(model):
    batch_size, frames, height, width = SHAPE
    return dict(
        sample=torch.randn(batch_size, frames, 8, height // 8, width // 8),
        timestep=torch.ones(batch_size),
        encoder_hidden_states=torch.randn(batch_size, 1, model.unet.config.cross_attention_dim),
        added_time_ids=torch.randn(batch_size, 3),
        pose_frames=torch.rand(batch_size, frames, 3, height, width),
    )


def forward_flops(model, x) -> int:
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter, torch.no_grad():
        model(**x)
    return counter.get_total_flops()


def counted(model, x, trainable="full", checkpointing=False, before=None, frozen=()):
    select_trainable(model, trainable, rank=4)
    (model.enable_gradient_checkpointing if checkpointing else model.disable_gradient_checkpointing)()

    def forward():
        if before:
            before()
        return model(**x).sample.square().mean()

    try:
        return count(forward, frozen)
    finally:
        model.zero_grad(set_to_none=True)
        model.disable_gradient_checkpointing()


def test_the_backward_costs_twice_the_forward_when_everything_trains_and_less_when_less_does(parts):
    model, _ = parts
    x = inputs(model)
    forward = forward_flops(model, x)
    backward = {t: counted(model, x, t).model - forward for t in ("full", "selective", "controlnext")}
    assert 1.9 < backward["full"] / forward < 2.1  # input and weight gradients of every layer
    # Frozen UNet weights get no weight gradient; their input gradients still flow to ControlNeXt.
    assert forward < backward["controlnext"] < backward["selective"] < backward["full"]


def test_model_flops_leave_out_the_recomputation_and_the_frozen_encoders(parts):
    model, vae = parts
    x = inputs(model)
    plain = counted(model, x)
    checkpointed = counted(model, x, checkpointing=True)
    assert plain.recompute == 0 and plain.frozen == 0
    assert checkpointed.recompute > 0 and checkpointed.model == plain.model
    pixels = torch.rand(2, 3, SHAPE[2], SHAPE[3])
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as alone, torch.no_grad():
        vae.encode(pixels)
    with_vae = counted(model, x, before=lambda: vae.encode(pixels), frozen=[vae])
    assert with_vae.frozen == alone.get_total_flops() > 0 and with_vae.model == plain.model


def test_the_single_token_cross_attention_removes_exactly_the_query_key_and_softmax_work(parts):
    model, _ = parts
    fast = copy.deepcopy(model)
    use_single_token_cross_attention(fast.unet)
    x = inputs(model)
    shapes = []  # (N, L, C) of each cross-attention's queries, (N, 1, D) of its context, heads x head dim
    hooks = [
        block.attn2.register_forward_pre_hook(
            lambda m, args, kwargs: shapes.append(
                (args[0].shape, kwargs["encoder_hidden_states"].shape, m.inner_dim)
            ),
            with_kwargs=True,
        )
        for block in (m for m in model.modules() if getattr(m, "attn2", None) is not None)
    ]
    try:
        removed = forward_flops(model, x) - forward_flops(fast, x)
    finally:
        for hook in hooks:
            hook.remove()
    expected = 0
    for (n, length, channels), (_, _, context), inner in shapes:
        expected += 2 * n * length * channels * inner  # to_q
        expected += 2 * n * context * inner  # to_k on the one token
        expected += 2 * 2 * n * length * inner  # scores and their weighted sum over one key
        expected += 2 * n * (length - 1) * inner * channels  # to_out on every query but one
    assert len(shapes) == 8 and removed == expected
    select_trainable(model, "full")
    select_trainable(fast, "full")
    assert model_flops(fast, *SHAPE) < model_flops(model, *SHAPE)


def test_meta_counts_need_no_memory_and_count_attention_as_the_math_kernel(parts):
    model, _ = parts
    select_trainable(model, "full")
    on_meta = copy.deepcopy(model).to("meta")
    with sdpa_kernel(SDPBackend.MATH):  # what attention runs as on the meta device
        real = model_flops(model, *SHAPE)
    assert model_flops(on_meta, *SHAPE) == real > 0
    # A fused kernel's backward recomputes the scores (torch's formula counts them): more FLOPs.
    assert model_flops(model, *SHAPE) > real


def test_utilisations_and_the_peak_table():
    flops = StepFlops(model=int(5e14), hardware=int(8e14))
    assert flops.utilisation(1.0, 1000.0) == pytest.approx((0.5, 0.8))
    assert flops.utilisation(2.0, None) == (None, None)  # a CPU: n/a
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA GeForce GTX 1080") is None


def test_idle_time_counts_overlapping_kernels_once():
    kernels = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7)]
    assert busy_time(kernels) == 4.0
    assert idle_fraction(kernels, 0.0, 10.0) == pytest.approx(0.6)
    assert idle_fraction([(-1.0, 1.0), (9.0, 12.0)], 0.0, 10.0) == pytest.approx(0.8)  # clipped to the window
    assert top_by_time([("gemm", 3.0), ("norm", 1.0), ("gemm", 4.0)], n=1) == [("gemm", 7.0, 7.0 / 8.0)]


def test_a_cpu_trace_names_its_top_operators_and_no_idle_fraction():
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            a @ a
    summary = summarize(prof, on_gpu=False, n=3)
    assert summary.idle_fraction is None and summary.top[0][0] == "aten::mm"
    assert "n/a" in summary.lines()[0]
