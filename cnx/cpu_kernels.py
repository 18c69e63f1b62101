"""Workarounds for oneDNN's CPU kernels, kept apart from the training they serve.

Each one computes the same sums another way, says which kernel it avoids and on what, and
applies to torch 2.13.0 with its bundled oneDNN 3.12 (`torch.__config__.show()`); recheck them
when either changes. Under bfloat16 autocast on a CPU, torch hands convolutions to oneDNN, which
picks a kernel by what the CPU has: AMX tiles (`amx_bf16`, Intel since Sapphire Rapids), else
its AVX-512 kernels (`jit_bf16:avx512_core_bf16` with `avx512_bf16`, as on AMD Zen 4, else
`jit_bf16:avx512_core`). `ONEDNN_MAX_CPU_ISA` holds it to a lower set, which is how the kernels
of a CPU without AMX are tried on one with it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager
from functools import partial

import torch

from cnx.profiles import cpu_flags


def onednn_runs_bf16_on_amx(
    flags: frozenset[str] | None = None, environ: Mapping[str, str] = os.environ
) -> bool:
    """Whether oneDNN computes bfloat16 convolutions with its AMX kernels here.

    True when the CPU has `amx_bf16` (`flags`: those of /proc/cpuinfo unless given) and
    `ONEDNN_MAX_CPU_ISA` (or its older name `DNNL_MAX_CPU_ISA`) is unset or names a set with
    AMX (`AVX512_CORE_AMX`, `AVX10_1_512_AMX_FP16`, ..., or `ALL`).
    """
    flags = cpu_flags() if flags is None else flags
    cap = (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return "amx_bf16" in flags and (cap in ("ALL", "DEFAULT") or "AMX" in cap)


def conv3d_weight_grads_need_conv2d(flags: frozenset[str] | None = None, environ=os.environ) -> bool:
    """Whether bfloat16 Conv3d weight gradients must be computed as Conv2d (`temporal_convs_as_conv2d`).

    Without AMX, oneDNN's bf16 backward-weights kernel for Conv3d (`jit_bf16:avx512_core_bf16` and
    `jit_bf16:avx512_core`) returns garbage for small inputs, even on one thread: for a
    Conv3d(64, 64, (3, 1, 1)) on (1, 64, 2, 8, 8), NaN or values near 1e35 that change from one
    call to the next (AMD EPYC with avx512_bf16, and an AMX CPU held to `AVX512_CORE_BF16`);
    (1, 64, 8, 24, 16) came out right. In `cnx pretrain-tiny`'s short runs (64x64 frames, latents
    of 8x8 and 4x4) the UNet's temporal resnets got NaN gradients at the first step. The same sums
    as a Conv2d are finite and repeat exactly on every ISA tried. With AMX the Conv3d kernel gave
    finite, repeatable UNet steps, and the pretrained tiny SVD was trained that way, so it is left
    as it is there (the same bytes as before).
    """
    return not onednn_runs_bf16_on_amx(flags, environ)


def _conv3d_over_frames_as_conv2d(conv, hidden_states):
    """`conv` (kernel (k, 1, 1)) on (B, C, F, H, W) as the Conv2d with kernel (k, 1) on (B, C, F, H*W)."""
    out = torch.nn.functional.conv2d(
        hidden_states.flatten(3),
        conv.weight.squeeze(-1),  # (O, C, k, 1)
        conv.bias,
        stride=(conv.stride[0], 1),
        padding=(conv.padding[0], 0),
        dilation=(conv.dilation[0], 1),
        groups=conv.groups,
    )
    return out.unflatten(3, hidden_states.shape[3:])  # (B, O, F', H, W)


@contextmanager
def temporal_convs_as_conv2d(module: torch.nn.Module, enabled: bool = True):
    """Within it (when `enabled`), every Conv3d in `module` (kernels (k, 1, 1): over frames alone)
    computes as the same Conv2d over (frames, pixels); each gets its class's forward back on exit.

    oneDNN's bfloat16 weight gradient of these Conv3d is unsafe on CPU. With AMX (torch 2.13,
    2 threads) the VAE decoder's: on whole 128x192 frames (`--vae_crop 0`) it hung in its
    reduction, and on 64-crops the full-resolution temporal convs' gradients were now and then
    garbage (400 where repeats of the same backward gave 0); a decoder step that runs the temporal
    layers took 335 ms this way against 404 ms with these convs in float32. Without AMX, small
    inputs' gradients at any thread count (`conv3d_weight_grads_need_conv2d`). The Conv2d
    computes the same sums, and its bfloat16 gradients repeat exactly (measured at 2 threads:
    4 runs of 8 repeats, and whole frames).
    """
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv3d)] if enabled else []
    for conv in convs:
        if conv.kernel_size[1:] != (1, 1) or conv.padding[1:] != (0, 0) or conv.stride[1:] != (1, 1):
            raise ValueError(f"{conv} mixes pixels: only convs over frames alone compute as a Conv2d")
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"{conv} pads with {conv.padding_mode!r}: only zero padding computes as a Conv2d"
            )
    for conv in convs:
        conv.forward = partial(_conv3d_over_frames_as_conv2d, conv)  # shadows the class's forward
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward


def contiguous_group_norms(module: torch.nn.Module) -> list:
    """Make every GroupNorm in `module` take its input in the default (contiguous) layout.

    Under bf16 autocast on a CPU, oneDNN's convolutions hand back channels-last tensors, and
    GroupNorm's backward on those is far slower than on contiguous ones: in a VAE step, 16.6 ms
    against 1.2 ms a call at 8x64x64x64, half of the step. Copying the input first costs one
    copy and gives the same numbers: a VAE step of 505-531 ms took 334-375 ms (torch 2.13,
    2 cores, avx512_bf16). Only where a backward follows: a forward alone is faster without the copy (the
    held-out PSNR of 8 clips took 5.1 s copied, 3.7-4.1 s not), and so are the UNet's steps
    (517 -> 687 ms with every norm copied), so `cnx pretrain-tiny` uses it for the VAE's training
    alone. Returns the hooks' handles; `handle.remove()` undoes it.
    """

    def make_contiguous(norm, args):
        return (args[0].contiguous(), *args[1:]) if torch.is_grad_enabled() else None  # None: unchanged

    return [
        norm.register_forward_pre_hook(make_contiguous)
        for norm in module.modules()
        if isinstance(norm, torch.nn.GroupNorm)
    ]
