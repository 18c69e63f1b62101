"""Training-step speed and memory, with and without gradient checkpointing, measured in one run.

    .venv/bin/python benchmarks/bench_train.py                  # the tiny profile on the CPU
    python benchmarks/bench_train.py --svd_xt --frames 14 21   # SVD-xt's architecture, random weights, GPU
    python benchmarks/bench_train.py --checkpointing blocks     # only one granularity's checkpointed row

Each timed step is a faithful trainer step without accelerate: `training_step`
(VAE encoding, conditioning and its dropout, sigmas, UNet + ControlNeXt, the weighted
loss), backward, gradient clipping at --max_grad_norm, AdamW over
`parameter_groups`, zero_grad; the trainable set comes from
`select_trainable`. The baseline is the same model without gradient
checkpointing; the ratio columns divide by it. Then one row per granularity of
`--checkpointing` (default: both, `cnx.checkpointing`): `diffusers`, diffusers'
own, as the original code ran; `blocks`, cnx's default.

- CPU (default): the tiny stand-in SVD with the tiny profile's widths and random weights, written
  to a temporary folder by `cnx.tiny.write_tiny_svd` and loaded as the trainer loads it; the tiny
  profile's size and clip length (`cnx.profiles.TINY`), batch 1, float32. Peak memory is the
  process's peak resident set size (VmHWM, reset before each row with /proc/self/clear_refs after
  handing freed heap back with malloc_trim): weights, optimizer state and activations together,
  not torch's own count.
- `--svd_xt` (GPU): SVD-xt's UNet, VAE and image encoder built from their configurations
  with random weights (nothing is downloaded) and the published ControlNeXt configuration,
  at 576x1024 with 14 and 21 frames; the frozen models in bf16, the trained ones in
  float32 with their forward under bf16 autocast, as accelerate's `--mixed_precision=bf16`
  runs them. Peak memory is `torch.cuda.max_memory_allocated`. A row that runs out of
  memory says so.

Both: "step adds" is the peak above the memory held at the row's start (weights and
optimizer state): a step's gradients, activations and temporaries.

FLOPs: one training step (forward of the frozen encoders, forward and backward of the
trained model) counted by `torch.utils.flop_counter.FlopCounterMode` without
checkpointing, so a checkpointed row's recomputation lowers its utilisation rather than
counting as work. Where that step does not fit, it is the checkpointed step's count less
the recomputation counted during its backward (marked "~"). Model FLOP utilisation
(MFU) = FLOPs / step time / the GPU's peak dense bf16 FLOP/s (PEAK_BF16_TFLOPS, or
--peak_tflops). On the CPU the attention of torch's CPU kernel is counted too.

Each run writes its rows to `benchmarks/results/bench_train.json` (`bench_train_svd_xt.json` with
`--svd_xt`; `--results` elsewhere) with the date, the machine and torch. The SVD-xt figures there
say whether the original command (full training, 21 frames) fits one 80 GB GPU unsharded; its
README runs it with DeepSpeed ZeRO-2 over 8 GPUs, which shards the AdamW state and the gradients,
a setting not measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from record import record, write
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from cnx.options import CHECKPOINTING, TRAINABLE, parse_options
from cnx.profiles import DATA_SAMPLES, TINY, quiet_known_warnings
from cnx.step import Models, Objective, build_models, step_generator, training_step
from cnx.trainable import build_optimizer, parameter_groups, select_trainable

# Dense bf16 tensor-core TFLOP/s by device name, the first match wins (vendor data sheets, no sparsity).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
GIB = 2**30


# torch's CPU attention kernel has no FLOP formula of its own; it does what the GPU kernels do.
def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # shapes, as FlopCounterMode hands them


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


aten = torch.ops.aten
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


# ---------------------------------------------------------------------------------------------
# Models and data


def tiny_models(folder: Path, options, device):
    """The tiny profile's stand-in SVD, loaded as the trainer loads it (float32)."""
    from cnx.tiny import write_tiny_svd

    write_tiny_svd(folder, seed=0, unet_width=TINY.unet_width, unet_inner_width=TINY.unet_inner_width)
    models, _ = build_models(options, device, torch.float32)
    models.model.to(device)
    return models


def svd_xt_models(device, weight_dtype: torch.dtype) -> Models:
    """SVD-xt's architecture with random weights: frozen parts in `weight_dtype`, trained ones in float32."""
    from transformers import CLIPImageProcessor

    from cnx.controlnext import ControlNeXtSVD
    from cnx.latents import CLIP_MEAN, CLIP_STD
    from cnx.tiny import build_svd_xt_components

    unet, vae, image_encoder, _, controlnext = build_svd_xt_components(device)
    for frozen in (vae, image_encoder):
        frozen.requires_grad_(False).eval().to(device, weight_dtype)
    feature_extractor = CLIPImageProcessor(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return Models(vae, image_encoder, feature_extractor, ControlNeXtSVD(unet, controlnext), weight_dtype)


def random_batch(batch_size: int, num_frames: int, height: int, width: int) -> dict:
    """A collated `ClipDataset` batch of random content (step time does not depend on the pixels)."""
    g = torch.Generator().manual_seed(0)
    shape = (batch_size, num_frames, 3, height, width)
    return {
        "pixel_values": torch.rand(shape, generator=g) * 2 - 1,  # (B, F, 3, H, W) in [-1, 1]
        "pose_frames": torch.rand(shape, generator=g),  # (B, F, 3, H, W) in [0, 1]
        "reference_image": torch.rand(batch_size, 3, height, width, generator=g) * 2 - 1,
        "hand_weights": torch.ones(batch_size, num_frames, 1, height, width),
    }


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Bench:
    models: Models
    net: torch.nn.Module  # the ControlNeXtSVD itself (models.model may carry an autocast forward)
    options: object
    optimizer: torch.optim.Optimizer
    trainable: list
    device: torch.device
    step: int = 0

    def loss(self, batch: dict) -> torch.Tensor:
        self.step += 1
        generator = step_generator(self.options.seed, 0, self.step, 0)
        return training_step(self.models, batch, Objective.from_options(self.options), generator).loss

    def trainer_step(self, batch: dict) -> None:
        """What one optimizer step of `cnx train` does, accelerate aside."""
        self.loss(batch).backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.options.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def release_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system, so RSS is live memory
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def memory_gib(device, peak: bool) -> float:
    """The peak (or current) allocated GPU memory, or on the CPU the process's peak (or current) RSS."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / GIB
    key = "VmHWM" if peak else "VmRSS"
    try:
        return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 2**20
    except (OSError, TypeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's lifetime peak


def out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err)


class RecomputeMeter:
    """The FLOPs of module forwards run during backward: what gradient checkpointing recomputes.

    Global module hooks read the counter's running total around each outermost module
    call made while `active` (set once the forward is done). `always_call`: the
    checkpoint's early stop leaves a recomputation by an exception.
    """

    def __init__(self, counter: FlopCounterMode):
        self.counter, self.active, self.depth, self.start, self.flops = counter, False, 0, 0, 0

    def before(self, module, args) -> None:
        if self.active:
            self.start = self.counter.get_total_flops() if self.depth == 0 else self.start
            self.depth += 1

    def after(self, module, args, output) -> None:
        if self.active and self.depth:
            self.depth -= 1
            self.flops += self.counter.get_total_flops() - self.start if self.depth == 0 else 0

    @contextlib.contextmanager
    def hooks(self):
        from torch.nn.modules import module

        handles = (
            module.register_module_forward_pre_hook(self.before),
            module.register_module_forward_hook(self.after, always_call=True),
        )
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def count_flops(bench: Bench, batch: dict) -> tuple[int, bool] | None:
    """(FLOPs of one training step without checkpointing, exact?): see the module docstring.

    Where that step does not fit, the checkpointed step is counted and the recomputation
    counted during its backward is taken off again. None: not even that step fits.
    """
    bench.net.disable_gradient_checkpointing()
    try:
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            bench.loss(batch).backward()
        bench.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops(), True
    except RuntimeError as err:
        if not out_of_memory(err):
            raise
    bench.optimizer.zero_grad(set_to_none=True)
    release_memory(bench.device)
    bench.net.enable_gradient_checkpointing()
    try:
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            with RecomputeMeter(counter).hooks() as recompute:
                loss = bench.loss(batch)
                recompute.active = True
                loss.backward()
        counted = counter.get_total_flops() - recompute.flops, False
    except RuntimeError as err:
        if not out_of_memory(err):
            raise
        counted = None
    loss = None  # the graph of a step that ran out of memory in backward, freed before the release
    bench.optimizer.zero_grad(set_to_none=True)
    release_memory(bench.device)
    return counted


def time_steps(bench: Bench, batch: dict, granularity: str | None, warmup: int, steps: int):
    """(median seconds per step, peak memory GiB, peak above the start), or None when out of memory.

    granularity: what gradient checkpointing recomputes (`cnx.checkpointing`), None: no checkpointing.
    The start holds the weights and the optimizer state; what a step adds above it is its
    gradients, activations and temporaries.
    """
    if granularity is not None:
        bench.net.enable_gradient_checkpointing(granularity)
    else:
        bench.net.disable_gradient_checkpointing()
    release_memory(bench.device)
    resident = memory_gib(bench.device, peak=False)
    try:
        for _ in range(warmup):
            bench.trainer_step(batch)
        times = []
        for _ in range(steps):
            bench.sync()
            start = time.perf_counter()
            bench.trainer_step(batch)
            bench.sync()
            times.append(time.perf_counter() - start)
    except RuntimeError as err:
        if not out_of_memory(err):
            raise
        times = None
    if times is None:  # out of memory, released here, outside the handler that holds the tensors
        bench.optimizer.zero_grad(set_to_none=True)
        release_memory(bench.device)
        return None
    peak = memory_gib(bench.device, peak=True)
    return statistics.median(times), peak, peak - resident


HEADER = (
    f"  {'':<24}{'s/step':>8}{'samples/s':>11}{'peak mem':>10}{'step adds':>11}{'TFLOP/s':>9}{'MFU':>7}"
    f"   {'x time':>7}{'x peak':>8}{'x adds':>8}"
)


def format_row(name: str, result, base, tflop: float, mark: str, batch_size: int, peak: float | None) -> str:
    """One table row; the ratios divide by `base`, the row without checkpointing."""
    if result is None:
        return f"  {name:<24}{'out of memory':>19}"
    seconds, memory, added = result
    achieved = tflop / seconds
    mfu = f"{achieved / peak:.1%}" if peak else "-"
    ratios = "".join(f"{now / then:7.2f}x" for now, then in zip(result, base, strict=True)) if base else ""
    return (
        f"  {name:<24}{seconds:8.3f}{batch_size / seconds:11.2f}{memory:6.2f} GiB{added:7.2f} GiB"
        f"{mark + format(achieved, '.3g'):>9}{mfu:>7}   {ratios}"
    )


def row_record(num_frames: int, granularity: str | None, result, flops: int, exact: bool, peak) -> dict:
    """One row of the results file; `result` is `time_steps`' (None: out of memory)."""
    row = {
        "frames": num_frames,
        "gradient_checkpointing": granularity is not None,
        "checkpointing": granularity,
    }
    if result is None:
        return row | {"out_of_memory": True}
    seconds, memory, added = result
    row |= {"s_per_step": round(seconds, 4), "peak_gib": round(memory, 3), "step_adds_gib": round(added, 3)}
    row |= {"tflop_per_step": round(flops / 1e12, 4), "tflop_exact": exact}
    return row | {"mfu": round(flops / 1e12 / seconds / peak, 4) if peak else None}


def peak_tflops(device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


# ---------------------------------------------------------------------------------------------
# Main


@dataclass(frozen=True)
class Sizes:
    frames: list[int]
    height: int
    width: int


def replace_none(args, **defaults) -> Sizes:
    """The sizes asked for on the command line, `defaults` where none was given."""
    return Sizes(**{key: getattr(args, key) or value for key, value in defaults.items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--svd_xt", action="store_true", help="SVD-xt's architecture at 576x1024 (a GPU)")
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="clip lengths to time")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=1, help="clips per step")
    parser.add_argument(
        "--trainable", default="full", choices=TRAINABLE, help="what trains (cnx train's flag)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each row")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's peak bf16 TFLOP/s")
    parser.add_argument("--results", type=Path, default=None, help="write the record here, not in results/")
    parser.add_argument(
        "--checkpointing",
        nargs="+",
        default=["diffusers", "blocks"],  # the original code's first
        choices=CHECKPOINTING,
        help="gradient checkpointing granularities to time, a row each (cnx train's --checkpointing)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_known_warnings(cpu=not torch.cuda.is_available())
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the frozen VAE's cast to its dtype is meant
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.svd_xt:
        sizes = replace_none(args, frames=[14, 21], height=1024, width=576)
    else:
        sizes = replace_none(args, frames=[TINY.sample_n_frames], height=TINY.height, width=TINY.width)
    weight_dtype = torch.bfloat16 if args.svd_xt and device.type == "cuda" else torch.float32

    tmp = tempfile.TemporaryDirectory(prefix="cnx-bench-")
    options = parse_options(
        [
            f"--pretrained_model_name_or_path={Path(tmp.name) / 'tiny-svd'}",
            f"--meta_info_path={DATA_SAMPLES / 'meta_info.json'}",
            f"--output_dir={tmp.name}",
            f"--width={sizes.width}",
            f"--height={sizes.height}",
            f"--trainable={args.trainable}",
            f"--per_gpu_batch_size={args.batch_size}",
        ]
    )
    start = time.perf_counter()
    if args.svd_xt:
        models = svd_xt_models(device, weight_dtype)
    else:
        models = tiny_models(Path(options.pretrained_model_name_or_path), options, device)
    net = models.model
    trainable = select_trainable(net, args.trainable, options.rank)
    net.to(device).train()
    if weight_dtype != torch.float32:  # accelerate's bf16: autocast around the trained model's forward only
        models.model.forward = torch.autocast(device.type, dtype=weight_dtype)(net.forward)
    optimizer = build_optimizer(parameter_groups(net, options.adam_weight_decay), options, device)
    bench = Bench(models, net, options, optimizer, trainable, device)
    build_s = time.perf_counter() - start

    peak = peak_tflops(device, args.peak_tflops)
    what = "SVD-xt architecture, random weights" if args.svd_xt else "tiny profile (stand-in SVD)"
    precision = "bf16 autocast, frozen models bf16" if weight_dtype != torch.float32 else "float32"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads"
    print(f"{where}: {what}, {sizes.width}x{sizes.height}, batch {args.batch_size}, {precision}")
    print(
        f"trainable {args.trainable}: {sum(p.numel() for p in trainable):,} parameters, AdamW; "
        f"built in {build_s:.1f} s; median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(
        "peak memory: torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "peak memory: the process's peak RSS (VmHWM), weights + optimizer state + activations"
    )
    print(f"peak bf16: {f'{peak:g} TFLOP/s' if peak else 'unknown (give --peak_tflops for MFU)'}")

    rows = []
    for num_frames in sizes.frames:
        batch = random_batch(args.batch_size, num_frames, sizes.height, sizes.width)
        counted = count_flops(bench, batch)
        if counted is None:
            print(f"\n{num_frames} frames: out of memory, with gradient checkpointing too")
            rows.append({"frames": num_frames, "out_of_memory": True})
            continue
        flops, exact = counted
        if not bench.optimizer.state:  # every row starts with the optimizer state in place
            bench.net.enable_gradient_checkpointing()
            bench.trainer_step(batch)
        mark = "" if exact else "~"
        print(
            f"\n{num_frames} frames: {mark}{flops / 1e12:.3g} TFLOP per step"
            f"{'' if exact else ' (plain step out of memory: counted checkpointed, less recomputation)'}"
        )
        print(HEADER)
        base, results = None, {}
        granularities = [None, *dict.fromkeys(args.checkpointing)]  # None: no checkpointing, the baseline
        for granularity in granularities:
            name = f"checkpointing {granularity}" if granularity else "no checkpointing"
            results[granularity] = time_steps(bench, batch, granularity, args.warmup, args.steps)
            base = results[None]
            print(format_row(name, results[granularity], base, flops / 1e12, mark, args.batch_size, peak))
            rows.append(row_record(num_frames, granularity, results[granularity], flops, exact, peak))
        if results.get("blocks") and results.get("diffusers"):  # the plain step may not fit
            ratios = [now / then for now, then in zip(results["blocks"], results["diffusers"], strict=True)]
            print("  blocks / diffusers: {:.2f}x time, {:.2f}x peak, {:.2f}x adds".format(*ratios))
    tmp.cleanup()
    settings = {
        "model": what,
        "trainable": args.trainable,
        "trained_parameters": sum(p.numel() for p in trainable),
        "width": sizes.width,
        "height": sizes.height,
        "batch_size": args.batch_size,
        "precision": precision,
        "threads": args.threads if device.type == "cpu" else None,
        "warmup": args.warmup,
        "steps": args.steps,
        "peak_bf16_tflops": peak,
    }
    write(record("bench_train", settings=settings, rows=rows), args.results, "svd_xt" if args.svd_xt else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
