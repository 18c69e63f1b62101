"""FLOPs of a training step, and the two utilisations they give against a device's peak.

- Model FLOPs: the useful work, the forward and backward of the model that trains
  (UNet + ControlNeXt), as autograd runs them without gradient checkpointing.
  Frozen weights get no weight gradient, so `--trainable` changes the count.
- Hardware FLOPs: what the device runs: the model FLOPs plus the forwards that
  gradient checkpointing recomputes in backward, plus the frozen encoders'
  forwards (VAE, CLIP).
MFU = model FLOPs / step time / peak; HFU = hardware FLOPs / step time / peak.

FLOPs are those `torch.utils.flop_counter.FlopCounterMode` counts: matmuls,
convolutions and attention (2 per multiply-add); norms, activations and the
loss are left out, as is the convention. The count depends on shapes only, so it
runs on the meta device too (`model_flops`: SVD-xt at full size on a CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

# Dense bf16 tensor-core TFLOP/s by device name, the first match wins (vendor data sheets, no sparsity).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The peak dense bf16 TFLOP/s of a GPU by its name (`torch.cuda.get_device_name`); None if unknown."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


# torch's CPU attention kernel has no FLOP formula of its own; it does what the GPU kernels do.
def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # shapes, as FlopCounterMode hands them


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


_aten = torch.ops.aten
ATTENTION_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


class ForwardMeter:
    """The FLOPs counted inside the outermost forward calls of some modules, while `active`.

    `modules=None`: any module (with `active` set once the loss is computed, that is what
    gradient checkpointing recomputes during backward). Global module hooks read the counter's
    running total around each call; `always_call`: checkpointing's early stop leaves a
    recomputation by an exception.
    """

    def __init__(self, counter: FlopCounterMode, modules: Iterable[torch.nn.Module] | None, active: bool):
        self.counter, self.active, self.depth, self.start, self.flops = counter, active, 0, 0, 0
        self.ids = None if modules is None else {id(m) for root in modules for m in root.modules()}

    def _watched(self, module) -> bool:
        return self.active and (self.ids is None or id(module) in self.ids)

    def before(self, module, args) -> None:
        if self._watched(module):
            self.start = self.counter.get_total_flops() if self.depth == 0 else self.start
            self.depth += 1

    def after(self, module, args, output) -> None:
        if self._watched(module) and self.depth:
            self.depth -= 1
            self.flops += self.counter.get_total_flops() - self.start if self.depth == 0 else 0


@contextlib.contextmanager
def _hooks(*meters: ForwardMeter):
    from torch.nn.modules import module

    handles = [
        handle
        for meter in meters
        for handle in (
            module.register_module_forward_pre_hook(meter.before),
            module.register_module_forward_hook(meter.after, always_call=True),
        )
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class Counted:
    """One counted forward + backward: everything, the frozen modules' share, the recomputed share."""

    total: int
    frozen: int
    recompute: int

    @property
    def model(self) -> int:
        """The trained model's forward and backward, recomputation taken off."""
        return self.total - self.frozen - self.recompute


def count(forward: Callable[[], torch.Tensor], frozen: Iterable[torch.nn.Module] = ()) -> Counted:
    """Count `forward()` (it returns the loss) and the loss's backward; `frozen`: the modules to split off.

    Gradients are left in the parameters' `.grad`, for the caller to clear.
    """
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
        frozen_meter = ForwardMeter(counter, list(frozen), active=True)
        recompute = ForwardMeter(counter, None, active=False)
        with _hooks(frozen_meter, recompute):
            loss = forward()
            recompute.active = True
            loss.backward()
    return Counted(counter.get_total_flops(), frozen_meter.flops, recompute.flops)


@dataclass(frozen=True)
class StepFlops:
    """A training step's model and hardware FLOPs (see the module docstring)."""

    model: int
    hardware: int

    def utilisation(self, seconds: float, peak: float | None) -> tuple[float | None, float | None]:
        """(MFU, HFU) of a step of `seconds` against `peak` TFLOP/s; (None, None) without a peak."""
        if not peak:
            return None, None
        per_second = seconds * peak * 1e12
        return self.model / per_second, self.hardware / per_second


def model_flops(model: torch.nn.Module, batch_size: int, num_frames: int, height: int, width: int) -> int:
    """Forward + backward FLOPs of a ControlNeXtSVD for (B, F) clips of H x W pixels, where it lies.

    On the meta device shapes are all it takes: SVD-xt at 21 x 576x1024 counts on any CPU; its
    attention runs as torch's math kernel there, whose backward keeps the scores where a fused
    kernel recomputes them (one product fewer per attention backward than torch's formula for
    the fused kernels). The loss is a plain mean square; what trains is what `model`'s
    requires_grad flags say.
    """
    unet = model.unet
    h, w = height // 8, width // 8
    shape = (batch_size, num_frames)
    with torch.device(next(model.parameters()).device):
        inputs = dict(
            sample=torch.zeros(*shape, unet.config.in_channels, h, w),
            timestep=torch.ones(batch_size),
            encoder_hidden_states=torch.zeros(batch_size, 1, unet.config.cross_attention_dim),
            added_time_ids=torch.zeros(batch_size, 3),
            pose_frames=torch.zeros(*shape, 3, height, width),
        )
    counted = count(lambda: model(**inputs).sample.float().square().mean())
    model.zero_grad(set_to_none=True)
    return counted.model
