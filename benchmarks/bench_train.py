"""Training-step speed, memory and FLOP utilisation of cnx's speed options against the original's setting.

    .venv/bin/python benchmarks/bench_train.py                  # the tiny profile on the CPU
    python benchmarks/bench_train.py --svd_xt --frames 14 --trace traces   # SVD-xt's architecture, GPU

Each row is a setting of the step (`SETTINGS`), timed in the same process as the
baseline row, "original": the original code's configuration (diffusers' gradient
checkpointing, the VAE encoding in the step, diffusers' attention processors,
torch's default AdamW (foreach on CUDA), no compile, torch's attention kernel
order). The ratio columns divide by it. The other rows switch on cnx's options:
the single-token cross-attention and fused AdamW (`cnx train`'s defaults), then
`--compile` and `--sdpa_backend=cudnn`, each alone and together.

Each timed step is a faithful trainer step without accelerate: `training_step`
(VAE encoding, conditioning and its dropout, sigmas, UNet + ControlNeXt, the weighted
loss), backward, gradient clipping at --max_grad_norm, AdamW over
`parameter_groups`, zero_grad; the trainable set comes from `select_trainable`.
A row's first step (which compiles, with --compile) is timed on its own; then
--warmup untimed steps and the median of --steps.

- CPU (default): the tiny stand-in SVD with the tiny profile's widths and random weights, written
  to a temporary folder by `cnx.tiny.write_tiny_svd` and loaded as the trainer loads it; the tiny
  profile's size and clip length (`cnx.profiles.TINY`), batch 1, float32. Peak memory is the
  process's peak resident set size (VmHWM, reset before each row with /proc/self/clear_refs after
  handing freed heap back with malloc_trim): weights, optimizer state and activations together,
  not torch's own count. CPU timings say nothing about a GPU.
- `--svd_xt` (GPU): SVD-xt's UNet, VAE and image encoder built from their configurations
  with random weights (nothing is downloaded) and the published ControlNeXt configuration,
  at 576x1024 with 14 and 21 frames; the frozen models in bf16, the trained ones in
  float32 with their forward under bf16 autocast, as accelerate's `--mixed_precision=bf16`
  runs them. Peak memory is `torch.cuda.max_memory_allocated`. A row that runs out of
  memory says so.

Both: "step adds" is the peak above the memory held at the row's start (weights and
optimizer state): a step's gradients, activations and temporaries.

FLOPs (`cnx.flops`, counted eagerly by `torch.utils.flop_counter.FlopCounterMode`):
- model FLOPs, the useful work, the same for every row: the forward and backward of
  the model that trains, without checkpointing and with the single-token cross-attention
  (the attention over one token computes nothing the shortcut does not). Where that step
  does not fit, the checkpointed step's count less its recomputation (marked "~").
- hardware FLOPs, each row's own: what its step runs, the recomputation of its
  checkpointing and the frozen encoders' forwards included.
MFU and HFU divide them by the step time and the GPU's peak dense bf16 FLOP/s
(`cnx.flops.PEAK_BF16_TFLOPS`, or --peak_tflops); on a CPU they are n/a.

`--trace DIR` writes a `torch.profiler` trace of 3 more steps of each row to
DIR/<row>.json (chrome://tracing, Perfetto) and prints the GPU's idle fraction and the
top 10 kernels by time (on a CPU the top 10 operators; idle fraction n/a).

Each run writes its rows to `benchmarks/results/bench_train.json` (`bench_train_svd_xt.json` with
`--svd_xt`; `--results` elsewhere) with the date, the machine and torch. On a shared 2-core CPU
use --threads 1: two OpenMP threads beside other work stall for seconds per step.

The GPU suite (one H100, full training at 14 frames, the five GPU_ROWS; two of them compile):

    python benchmarks/bench_train.py --svd_xt --frames 14 --trace $OUT/traces

The memory suite (one GPU): each trainable set at 14 and 21 frames, the original's row, cnx with
diffusers' checkpointing, cnx (blocks) and cnx with a latent cache, each row beside `cnx
plan-memory`'s prediction for it (measured / planned), no FLOP counts, 3 timed steps a row:

    python benchmarks/bench_train.py --svd_xt --suite      # results: bench_train_suite_svd_xt
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from record import record, write

from cnx.attention import (
    freeze_bypassed,
    sdpa_priority,
    use_default_cross_attention,
    use_single_token_cross_attention,
)
from cnx.compile import compile_repeated_blocks, uncompile
from cnx.flops import Counted, StepFlops, count
from cnx.flops import peak_tflops as peak_of
from cnx.options import DEFAULT_CHECKPOINTING, TRAINABLE, parse_options
from cnx.profiles import DATA_SAMPLES, TINY, quiet_known_warnings
from cnx.profiling import summarize
from cnx.step import Models, Objective, build_models, step_generator, training_step
from cnx.trainable import build_optimizer, parameter_groups, select_trainable

GIB = 2**30
TRACE_STEPS = 3


@dataclass(frozen=True)
class Setting:
    """One row: how the step runs."""

    checkpointing: str | None = DEFAULT_CHECKPOINTING  # --checkpointing; None: no gradient checkpointing
    single_token: bool = True  # --single_token_cross_attention
    fused_adamw: bool = True  # --fused_adamw
    compile: bool = False  # --compile
    sdpa_backend: str = "auto"  # --sdpa_backend
    latent_cache: bool = False  # --latent_cache_dir: the batch holds posteriors, no VAE encoding of the clip


ORIGINAL = Setting(checkpointing="diffusers", single_token=False, fused_adamw=False)
SETTINGS = {
    "original": ORIGINAL,  # the baseline: the original code's configuration
    "cnx": Setting(),  # cnx train's defaults (with --gradient_checkpointing)
    "cnx+compile": Setting(compile=True),
    "cnx+cudnn": Setting(sdpa_backend="cudnn"),
    "cnx+compile+cudnn": Setting(compile=True, sdpa_backend="cudnn"),
    "cnx, diffusers checkpointing": Setting(checkpointing="diffusers"),
    "cnx+cache": Setting(latent_cache=True),
    "cnx, no checkpointing": Setting(checkpointing=None),
    "original, no checkpointing": dataclasses.replace(ORIGINAL, checkpointing=None),
}
CPU_ROWS = ("original", "cnx")
GPU_ROWS = ("original", "cnx", "cnx+compile", "cnx+cudnn", "cnx+compile+cudnn")


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


def cached_batch(batch: dict, models: Models) -> dict:
    """`batch` as a latent cache's `CachedClipDataset` collates it: the clip's VAE posteriors
    (B, F, 2C, H/8, W/8) and the reference's CLIP embedding (B, 1, D) instead of its pixels."""
    b, f, _, h, w = batch["pixel_values"].shape
    channels = models.vae.config.latent_channels
    dim = models.image_encoder.config.projection_dim
    g = torch.Generator().manual_seed(1)
    cached = {k: v for k, v in batch.items() if k != "pixel_values"}
    cached["latent_parameters"] = torch.randn(b, f, 2 * channels, h // 8, w // 8, generator=g)
    cached["reference_embedding"] = torch.randn(b, 1, dim, generator=g)
    return cached


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Bench:
    models: Models
    net: torch.nn.Module  # the ControlNeXtSVD itself (models.model may carry an autocast forward)
    options: object
    selected: list  # what --trainable trains, before the single-token cross-attention freezes some
    device: torch.device
    optimizer: torch.optim.Optimizer | None = None
    trainable: list = dataclasses.field(default_factory=list)
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


def configure(bench: Bench, setting: Setting) -> None:
    """Set the model and a fresh optimizer up as `setting` says (compiling happens at the first step)."""
    net = bench.net
    uncompile(net)
    bench.optimizer = None
    net.zero_grad(set_to_none=True)
    for parameter in bench.selected:
        parameter.requires_grad_(True)
    if setting.single_token:
        use_single_token_cross_attention(net.unet)
        freeze_bypassed(net.unet)
    else:
        use_default_cross_attention(net.unet)
    if setting.checkpointing:
        net.enable_gradient_checkpointing(setting.checkpointing)
    else:
        net.disable_gradient_checkpointing()
    bench.trainable = [p for p in net.parameters() if p.requires_grad]
    options = dataclasses.replace(bench.options, fused_adamw=setting.fused_adamw)
    release_memory(bench.device)
    bench.optimizer = build_optimizer(parameter_groups(net, options.adam_weight_decay), options, bench.device)
    if setting.compile:
        compile_repeated_blocks(net.unet)


def count_step(bench: Bench, batch: dict) -> Counted | None:
    """The configured step's FLOPs, eagerly (None: out of memory); gradients cleared after."""
    try:
        counted = count(lambda: bench.loss(batch), frozen=(bench.models.vae, bench.models.image_encoder))
    except RuntimeError as err:
        if not out_of_memory(err):
            raise
        counted = None
    bench.net.zero_grad(set_to_none=True)
    release_memory(bench.device)
    return counted


def step_flops(bench: Bench, batch: dict, setting: Setting, counts: dict) -> tuple[StepFlops | None, bool]:
    """(model and this row's hardware FLOPs, model count exact?); `counts` caches them per configuration.

    Counts are taken eagerly with `setting`'s attention and checkpointing; call before compiling.
    """

    def counted(single_token: bool, checkpointing: str | None, cache: bool = False) -> Counted | None:
        key = (single_token, checkpointing, cache)
        if key not in counts:
            configure(bench, Setting(checkpointing, single_token, fused_adamw=False))
            counts[key] = count_step(bench, cached_batch(batch, bench.models) if cache else batch)
        return counts[key]

    useful, exact = counted(True, None), True
    if useful is None:  # the plain step does not fit: the checkpointed one, less its recomputation
        useful, exact = counted(True, DEFAULT_CHECKPOINTING), False
    own = counted(setting.single_token, setting.checkpointing, setting.latent_cache)
    if useful is None or own is None:
        return None, exact
    return StepFlops(model=useful.model, hardware=own.total), exact


def time_steps(bench: Bench, batch: dict, warmup: int, steps: int):
    """(first step s, median s per step, peak memory GiB, peak above the start), or None when out of memory.

    The first step makes the optimizer state (and compiles); the start then holds the weights
    and the optimizer state, and what a step adds above it is its gradients, activations and
    temporaries.
    """
    try:
        bench.sync()
        start = time.perf_counter()
        bench.trainer_step(batch)
        bench.sync()
        first = time.perf_counter() - start
        release_memory(bench.device)
        resident = memory_gib(bench.device, peak=False)
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
        bench.net.zero_grad(set_to_none=True)
        release_memory(bench.device)
        return None
    peak = memory_gib(bench.device, peak=True)
    return first, statistics.median(times), peak, peak - resident


def trace_steps(bench: Bench, batch: dict, path: Path) -> list[str]:
    """TRACE_STEPS more steps under torch.profiler, written to `path`; the summary's lines."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    bench.sync()
    with profile(activities=activities) as prof:
        for _ in range(TRACE_STEPS):
            bench.trainer_step(batch)
        bench.sync()
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return [f"trace of {TRACE_STEPS} steps: {path}", *summarize(prof, on_gpu).lines()]


def header(unit: str) -> str:
    return (
        f"  {'':<28}{'s/step':>8}{'samples/s':>10}{'peak mem':>10}{'step adds':>11}{'model ' + unit:>10}"
        f"{'hw ' + unit:>8}{'MFU':>7}{'HFU':>7}   {'x time':>7}{'x peak':>8}{'1st step':>9}"
    )


def flop_unit(flops: float) -> tuple[float, str]:
    """TFLOP for SVD-xt's steps, GFLOP for the tiny model's."""
    return (1e12, "TF") if flops >= 1e12 else (1e9, "GF")


def describe(setting: Setting) -> str:
    return ", ".join(
        [
            f"checkpointing {setting.checkpointing}" if setting.checkpointing else "no checkpointing",
            *(["latent cache"] if setting.latent_cache else []),
            "single-token cross-attention" if setting.single_token else "diffusers' attention",
            "fused AdamW" if setting.fused_adamw else "torch's default AdamW",
            "compiled blocks" if setting.compile else "eager",
            f"sdpa {setting.sdpa_backend}",
        ]
    )


def format_row(name: str, result, base, flops, mark: str, batch_size: int, peak, scale: float) -> str:
    """One table row; the ratios divide by `base`, the baseline row's result; FLOPs in units of `scale`."""
    if result is None:
        return f"  {name:<28}{'out of memory':>18}"
    first, seconds, memory, added = result
    model = f"{mark}{flops.model / scale:.4g}" if flops else "-"
    hardware = f"{flops.hardware / scale:.4g}" if flops else "-"
    mfu, hfu = flops.utilisation(seconds, peak) if flops else (None, None)
    ratios = f"{seconds / base[1]:7.2f}x{memory / base[2]:7.2f}x" if base else f"{'-':>8}{'-':>8}"
    return (
        f"  {name:<28}{seconds:8.3f}{batch_size / seconds:10.2f}{memory:6.2f} GiB{added:7.2f} GiB"
        f"{model:>10}{hardware:>8}{_share(mfu):>7}{_share(hfu):>7}   {ratios}{first:8.1f}s"
    )


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def row_record(
    num_frames: int, name: str, setting: Setting, result, base, flops, exact: bool, peak, batch_size: int
) -> dict:
    """One row of the results file; `result` and `base` are `time_steps`' (None: out of memory)."""
    row = {"frames": num_frames, "setting": name, **dataclasses.asdict(setting)}
    if result is None:
        return row | {"out_of_memory": True}
    first, seconds, memory, added = result
    row |= {"first_step_s": round(first, 3), "s_per_step": round(seconds, 4)}
    row |= {"samples_per_s": round(batch_size / seconds, 4)}
    row |= {"peak_gib": round(memory, 3), "step_adds_gib": round(added, 3)}
    if base:
        row |= {
            "time_vs_original": round(seconds / base[1], 4),
            "peak_vs_original": round(memory / base[2], 4),
        }
    if flops:
        mfu, hfu = flops.utilisation(seconds, peak)
        row |= {"model_flops_per_step": flops.model, "model_flops_exact": exact}
        row |= {"hardware_flops_per_step": flops.hardware}
        row |= {"mfu": None if mfu is None else round(mfu, 4), "hfu": None if hfu is None else round(hfu, 4)}
    return row


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


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9+]+", "-", name.lower()).strip("-")


def planned(trainable: str, num_frames: int, setting: Setting, measured_gib: float | None) -> dict:
    """`cnx plan-memory`'s total for the row's setting on one GPU without ZeRO (no reserve)."""
    from cnx.memory import MemoryOptions, plan_memory

    checkpointing = {"gradient_checkpointing": setting.checkpointing is not None}
    if setting.checkpointing:
        checkpointing["checkpointing"] = setting.checkpointing
    options = MemoryOptions(
        profile="full",
        trainable=trainable,
        sample_n_frames=num_frames,
        latent_cache=setting.latent_cache,
        single_token_cross_attention=setting.single_token,
        reserve_gb=0,
        **checkpointing,
    )
    total = plan_memory(options).total_bytes / GIB
    row = {"planned_gib": round(total, 3)}
    if measured_gib:
        row["measured_vs_planned"] = round(measured_gib / total, 4)
    return row


SUITE_ROWS = ("original", "cnx, diffusers checkpointing", "cnx", "cnx+cache")


def suite(args) -> int:
    """The memory issue's GPU suite: each trainable set in turn (a fresh model each), SUITE_ROWS at
    14 and 21 frames, 1 warm-up and 3 timed steps a row, no FLOP counts; one record of every row."""
    if not args.svd_xt or not torch.cuda.is_available():
        raise SystemExit(
            "bench_train.py: --suite runs SVD-xt on a GPU: give --svd_xt, on a machine with CUDA"
        )
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cnx-suite-") as tmp:
        for trainable in TRAINABLE:
            out = Path(tmp) / f"{trainable}.json"
            argv = ["--svd_xt", "--trainable", trainable, "--frames", "14", "21", "--rows", *SUITE_ROWS]
            main([*argv, "--warmup", "1", "--steps", "3", "--no_flops", "--results", str(out)])
            part = json.loads(out.read_text())
            rows += [row | {"trainable": trainable} for row in part["rows"]]
            release_memory(torch.device("cuda"))
    minutes = (time.perf_counter() - started) / 60
    result = record("bench_train", settings={"suite": SUITE_ROWS, "minutes": round(minutes, 1)}, rows=rows)
    write(result, args.results, "suite_svd_xt")
    print(f"suite: {len(rows)} rows in {minutes:.1f} minutes")
    return 0


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
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=list(SETTINGS),
        default=None,
        help=f"settings to time after 'original' (default: {', '.join(CPU_ROWS[1:])} on a CPU, "
        f"{', '.join(GPU_ROWS[1:])} on a GPU)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each row")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's peak bf16 TFLOP/s")
    parser.add_argument("--trace", type=Path, default=None, help="write a profiler trace of each row here")
    parser.add_argument("--results", type=Path, default=None, help="write the record here, not in results/")
    parser.add_argument("--no_flops", dest="flops", action="store_false", help="skip the FLOP counts")
    parser.add_argument(
        "--suite",
        action="store_true",
        help="with --svd_xt: every trainable set at 14 and 21 frames, checkpointing diffusers vs blocks, "
        "cache off vs on, each beside cnx plan-memory's prediction (results: bench_train_suite_svd_xt)",
    )
    args = parser.parse_args(argv)
    if args.suite:
        return suite(args)
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
    default_rows = GPU_ROWS if device.type == "cuda" else CPU_ROWS
    names = ["original", *(name for name in args.rows or default_rows if name != "original")]

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
    use_default_cross_attention(net.unet)  # what --trainable selects, before any shortcut freezes a part
    selected = select_trainable(net, args.trainable, options.rank)
    net.to(device).train()
    if weight_dtype != torch.float32:  # accelerate's bf16: autocast around the trained model's forward only
        models.model.forward = torch.autocast(device.type, dtype=weight_dtype)(net.forward)
    bench = Bench(models, net, options, selected, device)
    build_s = time.perf_counter() - start

    peak = args.peak_tflops
    if device.type == "cuda" and not peak:
        peak = peak_of(torch.cuda.get_device_name(device))
    what = "SVD-xt architecture, random weights" if args.svd_xt else "tiny profile (stand-in SVD)"
    precision = "bf16 autocast, frozen models bf16" if weight_dtype != torch.float32 else "float32"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads"
    print(f"{where}: {what}, {sizes.width}x{sizes.height}, batch {args.batch_size}, {precision}")
    print(
        f"trainable {args.trainable}: {sum(p.numel() for p in selected):,} parameters, AdamW; "
        f"built in {build_s:.1f} s; a first step, then the median of {args.steps} after {args.warmup} warm-up"
    )
    print(
        "peak memory: torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "peak memory: the process's peak RSS (VmHWM), weights + optimizer state + activations"
    )
    if device.type == "cuda":
        print(f"peak bf16: {f'{peak:g} TFLOP/s' if peak else 'unknown (give --peak_tflops for MFU)'}")
    else:
        print("MFU, HFU: n/a on a CPU (FLOPs are counted all the same)")
    for name in names:
        print(f"  {name}: {describe(SETTINGS[name])}")

    rows, attention = [], []  # attention: model FLOPs per step with either cross-attention
    for num_frames in sizes.frames:
        batch = random_batch(args.batch_size, num_frames, sizes.height, sizes.width)
        counts: dict = {}
        print(f"\n{num_frames} frames")
        base, scale = None, None
        for name in names:
            setting = SETTINGS[name]
            flops, exact = step_flops(bench, batch, setting, counts) if args.flops else (None, True)
            if scale is None:
                scale, unit = flop_unit(flops.model if flops else 1e12)
                print(header(unit))
            configure(bench, setting)
            step_batch = cached_batch(batch, models) if setting.latent_cache else batch
            with sdpa_priority(setting.sdpa_backend):
                result = time_steps(bench, step_batch, args.warmup, args.steps)
                traced = []
                if args.trace and result:
                    traced = trace_steps(bench, step_batch, args.trace / f"{num_frames}f-{slug(name)}.json")
            base = result if name == "original" else base
            mark = "" if exact else "~"
            print(format_row(name, result, base, flops, mark, args.batch_size, peak, scale))
            for line in traced:
                print(f"      {line}")
            row = row_record(num_frames, name, setting, result, base, flops, exact, peak, args.batch_size)
            if args.svd_xt:  # the planner's prediction for the same setting, beside the measurement
                row |= planned(args.trainable, num_frames, setting, row.get("peak_gib"))
                print(
                    f"      plan-memory: {row['planned_gib']:.2f} GiB"
                    + (
                        f", measured / planned {row['measured_vs_planned']:.3f}"
                        if "measured_vs_planned" in row
                        else ""
                    )
                )
            rows.append(row)
        uncompile(net)
        plain, checkpointed = (counts.get((True, mode, False)) for mode in (None, DEFAULT_CHECKPOINTING))
        if counts and plain is None and checkpointed is not None:
            print("  ~: the plain step is out of memory: counted checkpointed, less its recomputation")
        saved = [
            counts.get((single, None, False)) or counts.get((single, DEFAULT_CHECKPOINTING, False))
            for single in (False, True)
        ]
        if all(saved):
            before, after = (c.model for c in saved)
            attention.append({"frames": num_frames, "diffusers_attention": before, "single_token": after})
            change = f"{before:.5g} -> {after:.5g} ({after / before - 1:+.2%})"
            print(f"  the single-token cross-attention's model FLOPs per step: {change}")
    tmp.cleanup()
    settings = {
        "model": what,
        "trainable": args.trainable,
        "trained_parameters": sum(p.numel() for p in selected),
        "width": sizes.width,
        "height": sizes.height,
        "batch_size": args.batch_size,
        "precision": precision,
        "threads": args.threads if device.type == "cpu" else None,
        "warmup": args.warmup,
        "steps": args.steps,
        "peak_bf16_tflops": peak,
        "baseline": "original",
    }
    result = record("bench_train", settings=settings, rows=rows, model_flops_by_cross_attention=attention)
    write(result, args.results, "svd_xt" if args.svd_xt else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
