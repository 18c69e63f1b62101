"""Sampling speed: seconds per generated frame of ControlNeXtSVDPipeline, against diffusers' SVD pipeline.

    .venv/bin/python benchmarks/bench_sample.py                  # tiny stand-in on the CPU
    python benchmarks/bench_sample.py --svd_xt --frames 14 21   # SVD-xt's architecture, random weights, GPU

Rows, all measured in the same run on the same inputs:
- diffusers' StableVideoDiffusionPipeline (no control): the baseline;
- cnx's pipeline with the control on, one window, guidance on (the default);
- the same without guidance (max_guidance_scale 1: half the UNet batch);
- the same in windows (frames_per_batch, overlap), as long videos are made.
The ratio column divides by the baseline. `--svd_xt` builds SVD-xt's UNet, VAE
and image encoder from their configurations with random weights (nothing is
downloaded) at 576x1024 in half precision and reports peak GPU memory.

The rows go to `benchmarks/results/bench_sample.json` (`bench_sample_svd_xt.json` with
`--svd_xt`; `--results` elsewhere).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from record import record, write

from cnx.controlnext import ControlNeXt, controlnext_config_for


def tiny_pipelines(folder: Path):
    from diffusers import StableVideoDiffusionPipeline

    from cnx.pipeline import ControlNeXtSVDPipeline
    from cnx.tiny import write_tiny_svd

    write_tiny_svd(folder)
    torch.manual_seed(0)
    controlnext = ControlNeXt(**controlnext_config_for(32))
    return (
        StableVideoDiffusionPipeline.from_pretrained(folder),
        ControlNeXtSVDPipeline.from_pretrained(folder, controlnext=controlnext),
    )


def svd_xt_pipelines(device: str, dtype: torch.dtype):
    """SVD-xt's five components and the published ControlNeXt, random weights, built on `device`."""
    from diffusers import StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor

    from cnx.latents import CLIP_MEAN, CLIP_STD
    from cnx.pipeline import ControlNeXtSVDPipeline
    from cnx.tiny import build_svd_xt_components

    unet, vae, image_encoder, scheduler, controlnext = build_svd_xt_components(device, dtype)
    parts = dict(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)),
    )
    return StableVideoDiffusionPipeline(**parts), ControlNeXtSVDPipeline(**parts, controlnext=controlnext)


def calls(svd, pipe, reference, poses, per_batch: int, overlap: int, common: dict) -> dict:
    """The timed rows: name -> a call generating len(poses) frames."""
    from PIL import Image

    num_frames = len(poses)
    return {
        "diffusers SVD (baseline)": lambda: svd(Image.fromarray(reference), num_frames=num_frames, **common),
        "cnx, control + guidance": lambda: pipe(reference, poses, frames_per_batch=num_frames, **common),
        "cnx, no guidance": lambda: pipe(
            reference, poses, frames_per_batch=num_frames, max_guidance_scale=1.0, **common
        ),
        f"cnx, windows of {per_batch}": lambda: pipe(
            reference, poses, frames_per_batch=per_batch, overlap=overlap, **common
        ),
    }


def seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--svd_xt", action="store_true", help="SVD-xt's architecture at full size (GPU)")
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="video lengths to time")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps")
    parser.add_argument("--frames_per_batch", type=int, default=None, help="window for the windowed row")
    parser.add_argument("--overlap", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--results", type=Path, default=None, help="write the record here, not in results/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.svd_xt:
        frames, height, width, steps = (
            args.frames or [14, 21],
            args.height or 1024,
            args.width or 576,
            args.steps or 25,
        )
        per_batch, overlap = args.frames_per_batch or 14, args.overlap if args.overlap is not None else 4
        svd, pipe = svd_xt_pipelines(device, torch.float16 if device == "cuda" else torch.float32)
    else:
        frames, height, width, steps = (
            args.frames or [16],
            args.height or 96,
            args.width or 64,
            args.steps or 10,
        )
        per_batch, overlap = args.frames_per_batch or 8, args.overlap if args.overlap is not None else 4
        tmp = tempfile.TemporaryDirectory(prefix="cnx-bench-")
        svd, pipe = tiny_pipelines(Path(tmp.name) / "tiny-svd")
    svd, pipe = svd.to(device), pipe.to(device)
    for p in (svd, pipe):
        p.set_progress_bar_config(disable=True)
    print(f"{device}: {width}x{height}, {steps} steps, windows of {per_batch} sharing {overlap}")

    rows = []
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    for num_frames in frames:
        poses = rng.integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)
        common = dict(
            height=height, width=width, num_inference_steps=steps, output_type="pt", decode_chunk_size=8
        )
        print(f"\n{num_frames} frames                   s/frame   ratio   peak GPU memory")
        base = None
        for name, fn in calls(svd, pipe, reference, poses, per_batch, overlap, common).items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            per_frame = seconds(fn, args.repeats) / num_frames
            base = base or per_frame
            memory = f"{torch.cuda.max_memory_allocated() / 2**30:6.1f} GiB" if device == "cuda" else "   -"
            print(f"  {name:<28} {per_frame:8.3f} {per_frame / base:6.2f}x   {memory}")
            peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None
            rows.append(
                {"frames": num_frames, "name": name, "s_per_frame": round(per_frame, 4)}
                | {"ratio": round(per_frame / base, 3), "peak_gib": peak}
            )
    settings = {"width": width, "height": height, "steps": steps, "frames_per_batch": per_batch}
    settings |= {"overlap": overlap, "repeats": args.repeats, "dtype": str(pipe.unet.dtype)[6:]}
    settings |= {"threads": args.threads if device == "cpu" else None}
    settings |= {"model": f"{'SVD-xt architecture' if args.svd_xt else 'tiny stand-in'}, random weights"}
    write(record("bench_sample", settings=settings, rows=rows), args.results, "svd_xt" if args.svd_xt else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
