"""Do cnx's speed options train the same model? Loss curves against the original's configuration.

    .venv/bin/python benchmarks/loss_match.py                 # 200 steps x 3 runs, the tiny profile
    python benchmarks/loss_match.py --compile                 # on a GPU: with regional compile too

Trains the tiny profile on `data_samples` through the real entry point (`python -m
cnx.train`, `make demo`'s options without validation) three times:

- "original": the original code's configuration: diffusers' gradient checkpointing,
  diffusers' attention (the query and key of the one-token cross-attention computed),
  torch's default AdamW, no compile, the VAE encoding in every step;
- "cnx": cnx's defaults (block checkpointing, the single-token cross-attention, fused
  AdamW), with `--compile` when asked;
- "original, seed + 1": the original's configuration with another seed, whose
  distance from the first run is the noise that "within noise" is measured against.

The two same-seed runs draw the same clips, sigmas and noise, so their curves may differ
only by rounding. The verdict compares the curves smoothed over `--window` steps: the
largest gap between "cnx" and "original" must be smaller than the largest gap between
the two seeds. The record goes to `benchmarks/results/loss_match.json` (`loss_match_cuda.json` on a GPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from convergence import train, training_options
from record import record, write

from cnx.convergence import read_steps

ORIGINAL = ["--checkpointing=diffusers", "--no_single_token_cross_attention", "--no_fused_adamw"]


def smoothed(losses: np.ndarray, window: int) -> np.ndarray:
    """The moving mean over `window` steps (valid part only): (N - window + 1,)."""
    return np.convolve(losses, np.ones(window) / window, mode="valid")


def gap(a: np.ndarray, b: np.ndarray, window: int) -> dict[str, float]:
    """Largest and mean absolute difference of two loss curves, raw and smoothed."""
    raw = np.abs(a - b)
    smooth = np.abs(smoothed(a, window) - smoothed(b, window))
    return {
        "max_raw": float(raw.max()),
        "mean_raw": float(raw.mean()),
        "max_smoothed": float(smooth.max()),
        "mean_smoothed": float(smooth.mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=20, help="steps in the moving mean")
    parser.add_argument("--compile", action="store_true", help="the cnx run compiles its blocks")
    parser.add_argument("--json", type=Path, default=None, help="write the record here, not in results/")
    args = parser.parse_args(argv)
    if args.steps <= args.window:
        parser.error(f"--steps ({args.steps}) must be more than --window ({args.window})")

    cnx_flags = ["--compile"] if args.compile else []
    runs = {
        "original": (args.seed, ORIGINAL),
        "cnx": (args.seed, cnx_flags),
        "original, seed + 1": (args.seed + 1, ORIGINAL),
    }
    common = [
        f"--max_train_steps={args.steps}",
        f"--checkpointing_steps={args.steps}",
        "--gradient_checkpointing",
    ]
    losses, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (seed, flags) in runs.items():
            out_dir = Path(tmp) / name.replace(" ", "_").replace(",", "")
            options = training_options(out_dir, seed, [*common, *flags])
            print(f"{name}: {args.steps} steps, seed {seed} {' '.join(flags)}", flush=True)
            seconds[name] = round(train(options), 1)
            steps = read_steps(options.output_dir)
            losses[name] = np.array([step["loss"] for step in steps], dtype=np.float64)
            if len(losses[name]) != args.steps:
                sys.exit(f"{name}: {len(losses[name])} logged steps, expected {args.steps}")

    same_seed = gap(losses["cnx"], losses["original"], args.window)
    noise = gap(losses["original, seed + 1"], losses["original"], args.window)
    within = same_seed["max_smoothed"] < noise["max_smoothed"]
    print(f"{'':22}{'max |gap| smoothed':>20}{'mean |gap| raw':>16}")
    for name, figures in (("cnx vs original", same_seed), ("seed + 1 vs original", noise)):
        print(f"{name:22}{figures['max_smoothed']:>20.3e}{figures['mean_raw']:>16.3e}")
    print(f"within noise: {'yes' if within else 'NO'}")

    result = record(
        "loss_match",
        settings={
            "profile": "tiny",
            "steps": args.steps,
            "seed": args.seed,
            "window": args.window,
            "original_flags": ORIGINAL,
            "cnx_flags": cnx_flags,
        },
        seconds=seconds,
        final_loss={name: round(float(curve[-args.window :].mean()), 5) for name, curve in losses.items()},
        cnx_vs_original=same_seed,
        seed_vs_seed=noise,
        within_noise=within,
        losses={name: [round(float(x), 6) for x in curve] for name, curve in losses.items()},
    )
    write(result, args.json, variant="cuda" if torch.cuda.is_available() else "")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
