"""Does ControlNeXt training learn? Train from the pretrained tiny SVD, measure before and after.

    .venv/bin/python benchmarks/convergence.py                 # about 5 minutes on 2 CPU cores
    .venv/bin/python benchmarks/convergence.py --seed 1 --json figures.json -- --max_train_steps=100

Trains ControlNeXt on `data_samples` through the real entry point (`python -m
cnx.train` in a subprocess) with the tiny profile's options from `cnx.launch`
(the run `make demo` makes, validation off), then measures the model training
started from (the pretrained tiny SVD with ControlNeXt's seeded initial weights,
rebuilt exactly as `cnx.train` builds it) and the trained one on held-out dancers
(`cnx samples --seed 1`, which `data_samples` does not hold), with the control at
the trained scale and off (`cnx.convergence`):

- the held-out loss at fixed sigmas with fixed noise (lower is better), also with each
  clip's poses in reverse order: the same poses at the wrong times;
- the control fidelity of sampled videos (`cnx.metrics.control_fidelity`): its score
  (lower is better) and its contrast (higher is better; 0 for a video that does not
  move). The ground truth of the same two dancers is scored too, as the contrast's ceiling.

It prints a table and five verdicts and writes its record to `benchmarks/results/convergence.json`
(`--json` elsewhere). `tests/test_convergence.py` runs it in CI (seed 0, float32, the profile's
precision on a CPU) and asserts the verdicts with margins; the figures those margins come from,
six runs at seeds 0-2 in float32 and bf16, are in `benchmarks/results/convergence_600_steps.json`.
bf16 weights updated by stochastic rounding (`-- --mixed_precision=bf16 --weights_dtype=bf16
--stochastic_rounding`): `benchmarks/results/convergence_bf16_weights.json`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from record import record, write

from cnx import convergence
from cnx.launch import profile_options
from cnx.options import VALIDATION_FLAGS
from cnx.profiles import REPO_ROOT as ROOT
from cnx.profiles import quiet_known_warnings


def training_options(out_dir: Path, seed: int, extra: list[str]):
    """The tiny profile's options (`make demo`'s run) with another seed and no validation."""
    options = profile_options("tiny", [f"--seed={seed}", *extra], str(out_dir / "output"))
    return replace(options, **dict.fromkeys(VALIDATION_FLAGS))  # measured here instead


def cache_latents(options, cache_dir: Path):
    """`make demo`'s latent cache for this run: each frame of data_samples encoded once, not every step."""
    from cnx.latent_cache import build_cache

    build_cache(
        cache_dir,
        options.meta_info_path,
        options.pretrained_model_name_or_path,
        width=options.width,
        height=options.height,
        progress=False,
    )
    return replace(options, latent_cache_dir=str(cache_dir))


def train(options) -> float:
    """Run `python -m cnx.train` with `options`; its wall time in seconds. Stops on failure."""
    command = [sys.executable, "-m", "cnx.train", *options.as_argv()]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"CNX_PROGRESS": "off"})
    if done.returncode != 0:
        sys.exit(f"training failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return time.perf_counter() - started


def verdicts(start: convergence.Figures, end: convergence.Figures) -> dict[str, bool]:
    return {
        "the held-out loss falls": end.loss < start.loss,
        "the control lowers the held-out loss": end.loss < end.loss_no_control,
        "the right poses beat the same poses reversed": end.loss < end.loss_reversed_poses,
        "control fidelity improves": end.fidelity < start.fidelity,
        "the sampled dancer follows the poses more (contrast)": end.contrast > start.contrast,
    }


def ground_truth(validations, options) -> dict[str, float]:
    """The control fidelity of the held-out dancers' own videos (mean over them): the ceiling."""
    from cnx.media import fit
    from cnx.validation import score

    results = []
    for validation in validations:
        frames = fit(validation.ground_truth[: options.num_frames], options.height, options.width)
        results.append(score(frames, validation, options.height, options.width))
    return {key: sum(r[f"control_{key}"] for r in results) / len(results) for key in ("score", "contrast")}


def write_grid(path: Path, validation, options, videos: dict) -> None:
    """Rows: the ground truth, the poses, then each model's video with the poses drawn over it."""
    from PIL import Image

    from cnx.media import fit, frame_grid
    from cnx.overlay import overlay_pose

    poses = fit(validation.poses, options.height, options.width)
    truth = fit(validation.ground_truth, options.height, options.width)
    rows = [truth, poses, *(overlay_pose(v, poses[: len(v)]) for v in videos.values())]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame_grid([r[: len(rows[-1])] for r in rows])).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="the training run's --seed")
    parser.add_argument("--json", type=Path, default=None, help="write the record here, not in results/")
    parser.add_argument("--work_dir", type=Path, default=None, help="keep the run here (default: temporary)")
    parser.add_argument(
        "--grid", type=Path, default=None, help="write the first held-out dancer's videos here (PNG or JPEG)"
    )
    parser.add_argument("extra", nargs="*", help="training flags, e.g. -- --max_train_steps=100")
    args = parser.parse_args(argv)
    quiet_known_warnings()

    with tempfile.TemporaryDirectory(prefix="cnx-convergence-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        options = training_options(work, args.seed, args.extra)
        options.to_json(work / "training_options.json")  # a run folder: CNX_RUN=WORK_DIR for notebook 05
        heldout_meta = convergence.write_heldout(work / "heldout")
        batches = convergence.heldout_batches(heldout_meta, options)
        validations = convergence.validation_sets(work / "heldout", options.num_frames)
        videos = {"step 0": {}, "end": {}}  # what `measure` samples, kept for --grid
        started = time.perf_counter()
        initial = convergence.initial_pipeline(options)
        before = convergence.measure(initial, batches, validations, options, videos=videos["step 0"])
        measure_seconds = time.perf_counter() - started
        started = time.perf_counter()
        options = cache_latents(options, work / "latent_cache")
        cache_seconds = time.perf_counter() - started
        train_seconds = train(options)
        trained = convergence.trained_pipeline(options, Path(options.output_dir) / "final")
        after = convergence.measure(trained, batches, validations, options, videos=videos["end"])
        truth = ground_truth(validations, options)
        if args.grid:
            write_grid(
                args.grid,
                validations[0],
                options,
                {k: v[(0, options.control_scale, convergence.SAMPLING_STEPS)] for k, v in videos.items()},
            )

    result = record(
        "convergence",
        threads=int(os.environ.get("OMP_NUM_THREADS", 0)) or None,  # None: torch's default
        model=os.path.relpath(options.pretrained_model_name_or_path, ROOT),
        steps=options.max_train_steps,
        seed=args.seed,
        learning_rate=options.learning_rate,
        trainable=options.trainable,
        control_scale=options.control_scale,
        mixed_precision=options.mixed_precision,
        weights_dtype=options.weights_dtype,
        stochastic_rounding=options.stochastic_rounding,
        training_flags=args.extra,
        train_seconds=round(train_seconds, 1),
        cache_seconds=round(cache_seconds, 1),
        measure_seconds=round(measure_seconds, 1),
        step_0=asdict(before),
        end=asdict(after),
        ground_truth=truth,
        verdicts=verdicts(before, after),
        grid=os.path.relpath(args.grid.resolve(), ROOT) if args.grid else None,
    )
    print(f"{options.max_train_steps} steps, seed {args.seed}: training {train_seconds:.0f} s, ", end="")
    print(f"one measurement {measure_seconds:.0f} s")
    print(f"{'':28}{'step 0':>10}{'end':>10}")
    for key in result["end"]:
        print(f"{key:28}{result['step_0'][key]:10.4f}{result['end'][key]:10.4f}")
    for claim, holds in result["verdicts"].items():
        print(f"{'yes' if holds else 'NO ':4} {claim}")
    print(f"the ground truth's contrast: {truth['contrast']:.4f}")
    write(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
