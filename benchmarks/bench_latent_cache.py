"""The latent cache on the tiny profile: its build, its size, a step's time and loss with and without it.

    .venv/bin/python benchmarks/bench_latent_cache.py              # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_latent_cache.py --steps 40 --json figures.json

Builds `data_samples`' cache at the tiny profile's resolution in float32 and in bfloat16
(`cnx.latent_cache.build_cache`, as `cnx cache-latents`), then trains the tiny profile's run
(validation off) through `python -m cnx.train` three times from the same seed: without a cache,
with the float32 one and with the bfloat16 one. Records the build times and sizes, the median
seconds per step (the first step, which warms up, left out) and how far each cached run's logged
losses are from the uncached run's (float32: equal; bfloat16: the posteriors are rounded).
Writes `benchmarks/results/bench_latent_cache.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from record import record, write

from cnx.latent_cache import build_cache
from cnx.launch import profile_options
from cnx.options import VALIDATION_FLAGS
from cnx.profiles import quiet_known_warnings


def train(options) -> list[dict]:
    """`python -m cnx.train` with `options`; its steps.jsonl records. Stops on failure."""
    command = [sys.executable, "-m", "cnx.train", *options.as_argv()]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"CNX_PROGRESS": "off"})
    if done.returncode != 0:
        sys.exit(f"training failed ({done.returncode}):\n{done.stderr[-4000:]}")
    lines = (Path(options.output_dir) / "logs" / "steps.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of each training run")
    parser.add_argument("--json", type=Path, default=None, help="write the record here, not in results/")
    args = parser.parse_args(argv)
    quiet_known_warnings()

    with tempfile.TemporaryDirectory(prefix="cnx-bench-latent-cache-") as tmp:
        work = Path(tmp)
        flags = [f"--max_train_steps={args.steps}", f"--checkpointing_steps={args.steps}", "--report_to=none"]
        base = replace(profile_options("tiny", flags, str(work / "run")), **dict.fromkeys(VALIDATION_FLAGS))
        builds, runs = {}, {}
        for dtype in ("float32", "bfloat16"):
            started = time.perf_counter()
            summary = build_cache(
                work / dtype,
                base.meta_info_path,
                base.pretrained_model_name_or_path,
                width=base.width,
                height=base.height,
                dtype=dtype,
                progress=False,
            )
            builds[dtype] = {
                "seconds": round(time.perf_counter() - started, 1),
                "mib": round(summary.bytes / 2**20, 2),
                "frames": summary.frames,
            }
        for name, cache in (("none", None), ("float32", work / "float32"), ("bfloat16", work / "bfloat16")):
            options = replace(
                base, output_dir=str(work / f"run-{name}"), latent_cache_dir=cache and str(cache)
            )
            runs[name] = train(options)

    def loss_gap(name: str) -> float:
        return max(abs(a["loss"] - b["loss"]) for a, b in zip(runs[name], runs["none"], strict=True))

    result = record(
        "bench_latent_cache",
        threads=int(os.environ.get("OMP_NUM_THREADS", 0)) or None,  # None: torch's default
        profile="tiny",
        width=base.width,
        height=base.height,
        sample_n_frames=base.sample_n_frames,
        steps=args.steps,
        build=builds,
        seconds_per_step={
            name: round(statistics.median(r["seconds"] for r in records[1:]), 4)
            for name, records in runs.items()
        },
        max_abs_loss_difference={name: loss_gap(name) for name in ("float32", "bfloat16")},
        mean_loss_uncached=statistics.fmean(r["loss"] for r in runs["none"]),
    )
    print(
        json.dumps({k: result[k] for k in ("build", "seconds_per_step", "max_abs_loss_difference")}, indent=1)
    )
    write(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
