"""The tiny stand-in SVD and ControlNeXt on CPU: build time, size, forward and training-step times.

    .venv/bin/python benchmarks/bench_models.py [--threads 2] [--repeats 15]

Targets: the stand-in folder under 20 MB and built in under 30 s (a notebook cell writes it);
one UNet forward on 8 frames at 64x96 pixels well under a second. The baseline
for ControlNeXt's cost is the plain UNet measured in the same run: the ratio says
what the control adds to a forward and to a forward+backward step. The first call of
each is reported apart: it pays one-time setup and is often several times slower.
The figures go to `benchmarks/results/bench_models.json` (`--results` elsewhere).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from record import record, write

from cnx.controlnext import ControlNeXt, ControlNeXtSVD, controlnext_config_for, count_parameters
from cnx.tiny import folder_size, write_tiny_svd


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn, repeats: int) -> tuple[float, float]:
    """(first call, median of `repeats` later calls): the first pays one-time setup (allocator, kernels)."""
    first = timed(fn)
    return first, statistics.median(timed(fn) for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per measurement (median)")
    parser.add_argument("--results", type=Path, default=None, help="write the record here, not in results/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="cnx-bench-") as tmp:
        start = time.perf_counter()
        folder = write_tiny_svd(Path(tmp) / "tiny-svd")
        build_s = time.perf_counter() - start
        size_mb = folder_size(folder) / 1e6
        from diffusers import UNetSpatioTemporalConditionModel

        unet = UNetSpatioTemporalConditionModel.from_pretrained(folder, subfolder="unet")

    torch.manual_seed(0)
    controlnext = ControlNeXt(**controlnext_config_for(unet.config.block_out_channels[0]))
    model = ControlNeXtSVD(unet, controlnext)
    latents = torch.randn(1, 8, 8, 12, 8)  # (B, F, noisy + reference latent channels, 96/8, 64/8)
    pose_frames = torch.rand(1, 8, 3, 96, 64)  # (B, F, 3, H, W)
    timestep = torch.tensor([0.25])
    embeddings = torch.randn(1, 1, unet.config.cross_attention_dim)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]])

    def forward(control: bool):
        poses = pose_frames if control else None
        return model(latents, timestep, embeddings, time_ids, pose_frames=poses).sample

    def step(control: bool):
        model.zero_grad(set_to_none=True)
        forward(control).square().mean().backward()

    with torch.no_grad():
        fwd_plain = median_seconds(lambda: forward(False), args.repeats)
        fwd_control = median_seconds(lambda: forward(True), args.repeats)
    step_plain = median_seconds(lambda: step(False), args.repeats)
    step_control = median_seconds(lambda: step(True), args.repeats)

    print(f"torch threads: {args.threads}; latents (1, 8, 8, 12, 8) = 8 frames at 64x96 pixels")
    print(f"stand-in SVD folder: {size_mb:.1f} MB (target < 20), built in {build_s:.1f} s (target < 30)")
    print(f"parameters: UNet {count_parameters(unet):,}, ControlNeXt {count_parameters(controlnext):,}")
    print(f"median of {args.repeats} (first call in brackets)")
    print(f"{'':<22}{'plain UNet':>22}{'+ ControlNeXt':>22}{'ratio':>8}")
    for name, (first_plain, plain), (first_control, control) in (
        ("forward (no grad)", fwd_plain, fwd_control),
        ("forward + backward", step_plain, step_control),
    ):
        print(
            f"{name:<22}{plain * 1e3:>10.1f}ms ({first_plain * 1e3:>6.0f}ms)"
            f"{control * 1e3:>10.1f}ms ({first_control * 1e3:>6.0f}ms){control / plain:>7.2f}x"
        )
    verdict = "met" if fwd_plain[1] < 1.0 else "NOT met"
    print(f"UNet forward under 1 s: {verdict} ({fwd_plain[1] * 1e3:.0f} ms)")

    def ms(pair) -> dict:
        return {"first_ms": round(pair[0] * 1e3, 2), "median_ms": round(pair[1] * 1e3, 2)}

    settings = {"threads": args.threads, "repeats": args.repeats, "latents": [1, 8, 8, 12, 8]}
    figures = {
        "folder_mb": round(size_mb, 2),
        "build_s": round(build_s, 2),
        "unet_parameters": count_parameters(unet),
        "controlnext_parameters": count_parameters(controlnext),
        "forward": {"plain_unet": ms(fwd_plain), "with_controlnext": ms(fwd_control)},
        "forward_backward": {"plain_unet": ms(step_plain), "with_controlnext": ms(step_control)},
    }
    write(record("bench_models", settings=settings, figures=figures), args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
