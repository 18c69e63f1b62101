"""cnx.memory: the plan's weights, gradients and optimizer states equal a real step's tensors; its
activations are measured (meta == real tensors == the allocator), and the CLI prints them."""

import ctypes
import gc
import json
import math

import pytest
import torch

from cnx import memory
from cnx.attention import use_single_token_cross_attention
from cnx.controlnext import ControlNeXtSVD
from cnx.memory import MemoryOptions, plan_memory, tiny_components
from cnx.options import CHECKPOINTING, DEFAULT_CHECKPOINTING
from cnx.trainable import parameter_groups, select_trainable

CLIP = (1, 2, 64, 64)  # (B, F, H, W): small, the step's only job is to make every state tensor
TINY = dict(profile="tiny", mixed_precision="no", sample_n_frames=CLIP[1], height=CLIP[2], width=CLIP[3])


def tiny_model(trainable: str = "full", rank: int = 4):
    """The stand-in UNet + ControlNeXt as the trainer builds them, with `trainable` selected."""
    unet, vae, image_encoder, controlnext = tiny_components()  # the tiny profile's widths
    model = ControlNeXtSVD(unet, controlnext)
    use_single_token_cross_attention(model.unet)  # cnx train's default, as the planner counts it
    select_trainable(model, trainable, rank)
    return model, [vae, image_encoder]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_the_tiny_plan_counts_the_models_the_tiny_profile_loads():
    from pathlib import Path

    from cnx.profiles import TINY as PROFILE

    shipped = Path(PROFILE.pretrained_model_name_or_path)
    for module, name in zip(tiny_components()[:2], ("unet", "vae"), strict=True):
        config = json.loads((shipped / name / "config.json").read_text())
        assert list(module.config.block_out_channels) == config["block_out_channels"], name


@pytest.mark.parametrize("trainable", ["full", "controlnext", "lora"])
def test_weights_gradients_and_optimizer_states_equal_a_real_steps_tensors(trainable):
    torch.manual_seed(0)
    model, frozen = tiny_model(trainable)
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-2), lr=1e-4)
    batch_size, frames, height, width = CLIP
    out = model(
        torch.randn(batch_size, frames, 8, height // 8, width // 8),
        torch.randn(batch_size),
        torch.randn(batch_size, 1, model.unet.config.cross_attention_dim),
        torch.randn(batch_size, 3),
        pose_frames=torch.rand(batch_size, frames, 3, height, width),
    ).sample
    out.square().mean().backward()
    optimizer.step()
    states = [state for p in model.parameters() for state in [optimizer.state[p]] if state]
    plan = plan_memory(MemoryOptions(trainable=trainable, rank=4, **TINY))

    assert plan.weights == nbytes([*model.parameters(), *model.buffers()])
    assert plan.gradients == nbytes(p.grad for p in model.parameters() if p.grad is not None)
    assert plan.optimizer == nbytes(t for s in states for key, t in s.items() if key != "step")
    assert plan.cpu_bytes == nbytes(s["step"] for s in states)  # AdamW's counters stay on the CPU
    assert plan.frozen == nbytes(t for m in frozen for t in [*m.parameters(), *m.buffers()])
    assert plan.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.master_weights == plan.half_copies == plan.ema == 0


@pytest.mark.parametrize("granularity", [None, *CHECKPOINTING])  # None: no checkpointing
def test_activations_counted_on_meta_equal_those_of_real_tensors(granularity):
    model, _ = tiny_model("full")
    meta_model, _ = memory.meta_models("tiny", "full", 128)
    checkpointing = (granularity is not None, granularity or DEFAULT_CHECKPOINTING)
    real = memory.measure_saved(model, (1, 4, 64, 96), torch.float32, *checkpointing)
    meta = memory.measure_saved(meta_model, (1, 4, 64, 96), torch.float32, *checkpointing)
    assert (meta.held, meta.total) == (real.held, real.total) and real.held > 0
    assert (real.total > real.held) == checkpointing[0]  # the largest block's recompute


def _malloc_in_use():
    """Bytes glibc's malloc has handed out (all arenas and mmapped blocks), or None off glibc."""

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in "a o s h hblkhd u f uordblks f2 k".split()]

    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = Mallinfo2
    return lambda: function().uordblks + function().hblkhd


@pytest.mark.parametrize("trainable", ["full", "controlnext"])
@pytest.mark.parametrize("granularity", [None, *CHECKPOINTING])  # None: no checkpointing
def test_held_activations_are_what_the_allocator_holds_after_a_real_forward(trainable, granularity):
    """Real tensors, diffusers' own torch.utils.checkpoint: the counting stands in for it faithfully."""
    in_use = _malloc_in_use()
    if in_use is None:
        pytest.skip("needs glibc's mallinfo2")
    torch.manual_seed(0)
    model, _ = tiny_model(trainable)
    if granularity is None:
        model.disable_gradient_checkpointing()
    else:
        model.enable_gradient_checkpointing(granularity)
    batch_size, frames, height, width = clip = (1, 8, 128, 96)
    inputs = (
        torch.randn(batch_size, frames, 8, height // 8, width // 8),
        torch.randn(batch_size),
        torch.randn(batch_size, 1, model.unet.config.cross_attention_dim),
        torch.randn(batch_size, 3),
    )
    pose_frames = torch.rand(batch_size, frames, 3, height, width)
    gc.collect()
    before = in_use()
    out = model(*inputs, pose_frames=pose_frames).sample
    gc.collect()
    held = in_use() - before - out.untyped_storage().nbytes()
    del out
    checkpointing = (granularity is not None, granularity or DEFAULT_CHECKPOINTING)
    counted = memory.measure_saved(model, clip, torch.float32, *checkpointing).held
    assert counted > 15e6 and held == pytest.approx(counted, rel=0.1)  # blocks hold the least, 16 MB


@pytest.mark.parametrize("checkpointing", [False, True])
def test_an_activation_line_through_two_measured_sizes_predicts_a_third(checkpointing):
    model, _ = memory.meta_models("tiny", "full", 128)  # counts as real tensors do (test above)
    sizes = [(1, 4, 64, 64), (2, 8, 96, 64), (1, 6, 128, 96)]  # (B, F, H, W); the third is predicted
    measured = [memory.measure_activations(model, s, torch.float32, checkpointing) for s in sizes]
    pixels = [math.prod(s) for s in sizes]
    line = memory.AffineFit.through(pixels[0], measured[0], pixels[1], measured[1])
    assert line(pixels[2]) == pytest.approx(measured[2], rel=0.15)


def test_max_frames_is_the_last_frame_count_that_fits():
    options = MemoryOptions(**TINY, gpu_memory_gb=0.1, reserve_gb=0.02)
    plan = plan_memory(options)
    budget = (0.1 - 0.02) * 2**30
    assert plan.max_frames > 1
    fits = plan_memory(MemoryOptions(**{**TINY, "sample_n_frames": plan.max_frames}))
    too_many = plan_memory(MemoryOptions(**{**TINY, "sample_n_frames": plan.max_frames + 1}))
    assert fits.total_bytes <= budget < too_many.total_bytes
    assert plan_memory(MemoryOptions(**TINY, gpu_memory_gb=0.01, reserve_gb=0)).max_frames == 0


def test_fit_lists_each_setting_that_fits_with_its_own_max_frames(capsys):
    budget = dict(gpu_memory_gb=0.1, reserve_gb=0.06)
    bf16 = {**TINY, "mixed_precision": "bf16"}
    base = MemoryOptions(**bf16, reserve_gb=budget["reserve_gb"])
    rows = memory.fit(base, budget["gpu_memory_gb"])
    settings = {(r["trainable"], r["checkpointing"], r["latent_cache"], r["optimizer"]) for r in rows}
    assert len(settings) == len(rows) and 0 < len(rows) < 96  # some fit, not all
    assert [r["max_frames"] for r in rows] == sorted((r["max_frames"] for r in rows), reverse=True)
    for row in (rows[0], rows[-1]):  # the first and the last, replanned alone
        fields = (
            memory.CHECKPOINTING_SETTINGS[row["checkpointing"]] | memory.OPTIMIZER_SETTINGS[row["optimizer"]]
        )
        alone = MemoryOptions(
            **bf16,
            **budget,
            **fields,
            trainable=row["trainable"],
            latent_cache=row["latent_cache"],
        )
        assert plan_memory(alone).max_frames == row["max_frames"] > 0
    # More recomputation, more frames; lighter states, more frames.
    most = {
        (r["trainable"], r["checkpointing"], r["optimizer"]): r["max_frames"]
        for r in rows
        if not r["latent_cache"]
    }
    rounding = "bf16 weights, stochastic rounding"
    assert (
        most[("lora", "none", rounding)]
        < most[("lora", "diffusers", rounding)]
        < most[("lora", "blocks", rounding)]
    )
    assert most.get(("lora", "blocks", "AdamW"), 0) < most[("lora", "blocks", rounding)]
    # Under ZeRO, bf16 weights are refused, so --fit leaves them out. The same clip, precision and
    # budget as above: the activations measured there are reused (another clip measures them all again).
    clip = ["--sample_n_frames", str(CLIP[1]), "--height", str(CLIP[2]), "--width", str(CLIP[3])]
    zero = ["--profile", "tiny", *clip, "--mixed_precision", "bf16", "--zero_stage", "2"]
    fit_flags = ["--reserve_gb", str(budget["reserve_gb"]), "--fit", str(budget["gpu_memory_gb"]), "--json"]
    assert memory.main([*zero, *fit_flags]) == 0
    assert {r["optimizer"] for r in json.loads(capsys.readouterr().out)} == {"AdamW", "8-bit AdamW"}
    assert memory.main(["--profile", "tiny", "--fit", "0"]) == 2


def test_zero_partitions_gradients_and_optimizer_states_and_offload_moves_them_to_the_cpu():
    bf16 = {**TINY, "mixed_precision": "bf16", "single_token_cross_attention": False}  # all of it trains
    one = plan_memory(MemoryOptions(**bf16, zero_stage=2))
    eight = plan_memory(MemoryOptions(**bf16, zero_stage=2, num_gpus=8))
    offload = plan_memory(MemoryOptions(**bf16, zero_stage=2, num_gpus=8, offload_optimizer=True))
    n = one.trainable_parameters
    assert one.weights == eight.weights == 2 * n  # the bf16 module (all of it trains here)
    assert (one.optimizer, eight.optimizer) == (8 * n, 8 * -(-n // 8))
    assert (one.master_weights, eight.master_weights) == (4 * n, 4 * -(-n // 8))
    assert eight.gradients < one.gradients
    assert offload.optimizer == offload.master_weights == 0
    assert offload.cpu_bytes == eight.optimizer + eight.master_weights + 4 * -(-n // 8)
    ddp = plan_memory(MemoryOptions(**TINY, num_gpus=8))
    assert ddp.gradients == 2 * plan_memory(MemoryOptions(**TINY)).gradients  # DDP's buckets


def test_the_reduce_buckets_follow_the_deepspeed_config_cnx_launch_writes():
    from cnx.launch import deepspeed_config
    from cnx.options import TrainingOptions

    zero = deepspeed_config(TrainingOptions(), 2, False)["zero_optimization"]
    assert "reduce_bucket_size" not in zero  # DeepSpeed's default, as memory.DEEPSPEED_REDUCE_BUCKET
    assert memory.DEEPSPEED_REDUCE_BUCKETS == (2 if zero.get("overlap_comm") else 1)


def test_8bit_adam_keeps_a_byte_per_moment_for_large_tensors():
    assert memory.adam8bit_bytes([10, 5000]) == memory.BNB_QMAPS + 8 * 10 + 2 * 5000 + 8 * 20


def test_a_latent_cache_changes_the_batch_alone_pixels_for_posteriors():
    """The frozen models stay (the reference is still encoded; validation decodes and embeds)."""
    plain = plan_memory(MemoryOptions(**TINY))
    cached = plan_memory(MemoryOptions(latent_cache=True, **TINY))
    assert {k: v for k, v in cached.parts.items() if k != "batch"} == {
        k: v for k, v in plain.parts.items() if k != "batch"
    }
    batch_size, frames, height, width = CLIP
    embedding_dim = memory.meta_models("tiny", "full", 128)[1][1].config.projection_dim
    pixels, posteriors = 3 * height * width, 2 * 4 * (height // 8) * (width // 8)  # per frame
    assert plain.batch - cached.batch == 4 * batch_size * (frames * (pixels - posteriors) - embedding_dim)
    assert "latent cache" in cached.table()


def test_cli_plans_the_full_profile_on_8_gpus_as_json(capsys):
    argv = [
        "--profile",
        "full",
        "--num_gpus",
        "8",
        "--zero_stage",
        "2",
        "--no_single_token_cross_attention",
        "--json",
    ]
    assert memory.main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["total_bytes"] == sum(plan[name] for name in memory.PARTS)
    assert plan["trainable_parameters"] == 1_524_623_082 + 3_526_400  # SVD-xt's UNet + ControlNeXt
    assert plan["weights"] == 2 * plan["trainable_parameters"]  # DeepSpeed's bf16 module
    assert plan["activations"] > 10 * 2**30 and plan["max_frames"] >= 1


def test_cli_prints_the_table(capsys):
    from cnx.cli import main

    assert main(["plan-memory", "--profile", "tiny", "--no_gradient_checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "activations" in out and "total" in out and "largest frame count that fits 80 GiB" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--zero_stage", "5"],
        ["--offload_optimizer"],
        ["--width", "100"],
        ["--no_such_flag"],
        ["--num_gpus", "0"],
        ["--checkpointing", "layers"],
    ],
)
def test_bad_flags_fail_in_one_line(argv, capsys):
    assert memory.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnx plan-memory: ") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Lighter weights and optimizer states: the plan against a real step's tensors


def real_step(model, optimizer, dtype):
    """One forward, backward and optimizer step of `model` at CLIP, inputs in `dtype`."""
    batch_size, frames, height, width = CLIP
    out = model(
        torch.randn(batch_size, frames, 8, height // 8, width // 8).to(dtype),
        torch.randn(batch_size),
        torch.randn(batch_size, 1, model.unet.config.cross_attention_dim).to(dtype),
        torch.randn(batch_size, 3).to(dtype),
        pose_frames=torch.rand(batch_size, frames, 3, height, width).to(dtype),
    ).sample
    out.float().square().mean().backward()
    optimizer.step()


@pytest.mark.parametrize("trainable, stochastic_rounding", [("full", False), ("full", True), ("lora", False)])
def test_bf16_weights_plan_equals_a_real_steps_tensors(trainable, stochastic_rounding):
    from cnx.bf16_adamw import BF16AdamW

    torch.manual_seed(0)
    model, _ = tiny_model(trainable)
    model.to(torch.bfloat16)  # as cnx train --weights_dtype=bf16 does, after selecting what trains
    groups = parameter_groups(model, 1e-2)
    real_step(model, BF16AdamW(groups, lr=1e-4, stochastic_rounding=stochastic_rounding), torch.bfloat16)
    options = dict(trainable=trainable, rank=4, weights_dtype="bf16", use_ema=True)
    plan = plan_memory(
        MemoryOptions(
            **{**TINY, "mixed_precision": "bf16"}, **options, stochastic_rounding=stochastic_rounding
        )
    )
    trained = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trained)
    assert all(p.grad is not None for p in trained) and plan.trainable_parameters == n
    assert plan.weights == nbytes([*model.parameters(), *model.buffers()])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert plan.gradients == nbytes(p.grad for p in trained) == 2 * n
    assert plan.half_copies == plan.cpu_bytes == 0
    assert plan.ema == 4 * n  # the trainer's EMA of bf16 weights is float32
    # First principles: bf16 weight and gradient, two float32 moments, and a float32 master or none.
    bytes_per_trained = 2 + 2 + 8 + (0 if stochastic_rounding else 4)
    if trainable == "full":  # all but the cross-attention's unread query path, which stays bf16 weights
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        states = plan.weights + plan.gradients + plan.optimizer + plan.master_weights
        assert states == bytes_per_trained * n + 2 * frozen


def test_bf16_weights_state_bytes_equal_the_optimizers_own():
    from cnx.bf16_adamw import BF16AdamW

    torch.manual_seed(0)
    for stochastic_rounding in (False, True):
        model, _ = tiny_model("controlnext")
        model.to(torch.bfloat16)
        optimizer = BF16AdamW(parameter_groups(model, 1e-2), lr=1e-4, stochastic_rounding=stochastic_rounding)
        real_step(model, optimizer, torch.bfloat16)
        states = [s for s in optimizer.state.values() if s]
        options = dict(trainable="controlnext", weights_dtype="bf16", stochastic_rounding=stochastic_rounding)
        plan = plan_memory(MemoryOptions(**{**TINY, "mixed_precision": "bf16"}, **options))
        moments = nbytes(s[key] for s in states for key in ("exp_avg", "exp_avg_sq"))
        assert plan.optimizer == moments
        assert plan.master_weights == nbytes(s["master"] for s in states if "master" in s)
        assert all(type(s["step"]) is int for s in states)  # no counters on the CPU


def test_8bit_adam_plan_equals_bitsandbytes_own_state():
    """bitsandbytes (the `bnb` extra, installed by `make venv`) steps on this CPU: its real state."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model, _ = tiny_model("full")
    optimizer = bnb.optim.AdamW8bit(parameter_groups(model, 1e-2), lr=1e-4)
    real_step(model, optimizer, torch.float32)
    tensors = {t.untyped_storage().data_ptr(): t for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t)}  # fmt: skip
    plan = plan_memory(MemoryOptions(**TINY, use_8bit_adam=True))
    assert plan.optimizer == nbytes(tensors.values())  # the two quantisation maps are shared
    assert any(t.dtype == torch.uint8 for t in tensors.values())  # some moments are 8-bit here
    assert plan.cpu_bytes == 0  # its step counters are ints


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stochastic_rounding"], "--stochastic_rounding rounds updates into bf16 weights"),
        (["--weights_dtype", "bf16", "--mixed_precision", "no"], "give --mixed_precision=bf16"),
        (["--weights_dtype", "bf16", "--use_8bit_adam"], "drop one of the two"),
        (["--weights_dtype", "bf16", "--zero_stage", "2"], "without DeepSpeed"),
    ],
)
def test_bad_weights_flags_fail_in_one_line(argv, message, capsys):
    assert memory.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnx plan-memory: ") and message in err and err.count("\n") == 1
