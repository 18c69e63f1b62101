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
  move, 0.117 for the ground truth of these two dancers).

It prints a table and five verdicts. Measured with the tiny profile's 600 steps from the shipped
pretrained model (VAE at 28.2 dB, UNet stage 600 steps), on 2 CPU cores, one thread each and two
runs at a time (as `make test` runs it beside the other tests): training in float32 (the profile's
precision on a CPU, as the CI test runs it) 345-361 s, under bf16 autocast
(`-- --mixed_precision=bf16`) 309-314 s; one measurement 65-72 s; control on unless said:

    seed       loss step 0 -> end  end: off  reversed poses  score step 0 -> end  end: off  contrast 0 -> end
    0          0.3180 -> 0.2634    0.2912    0.2908          0.1753 -> 0.1616     0.1822    0.0008 -> 0.0151
    1          0.3185 -> 0.2791    0.3061    0.3087          0.1747 -> 0.1548     0.1877    0.0009 -> 0.0193
    2          0.3180 -> 0.2651    0.2876    0.2962          0.1738 -> 0.1558     0.1838    0.0007 -> 0.0171
    0, bf16    0.3180 -> 0.2668    0.2930    0.2937          0.1753 -> 0.1644     0.1854    0.0008 -> 0.0152
    1, bf16    0.3185 -> 0.2789    0.3056    0.3083          0.1747 -> 0.1554     0.1879    0.0009 -> 0.0194
    2, bf16    0.3180 -> 0.2641    0.2865    0.2949          0.1738 -> 0.1549     0.1831    0.0007 -> 0.0171

In every run the right poses beat both no control (by 7.8-9.5%) and the same poses reversed (by
9.2-10.5%; at step 0 the untrained control changes the loss by 0.1-0.3% and the order of the poses
makes no difference), the held-out loss falls (by 12.4-17.2%), the score of videos sampled with the
control improves (by 6.2-11.4%) and beats the same model sampled without it (by 11.3-17.5%), and
their contrast grows from 0.0007-0.0009 to 0.0151-0.0194. `tests/test_convergence.py` asserts
these in CI (seed 0, float32). A run at one thread repeats its figures exactly. From the previous
pretrained tiny SVD (the same VAE, UNet stage 800 steps at learning rate 3e-4) the loss fell
3.4-15.1%, by 3.4% only at float32 seed 1; from the one before (VAE at 27.6 dB) float32 runs had it
fall 4.5-13.2% but bf16 ones only 0.8-7.8%; from earlier ones (27.4 and 26.7 dB) 4.5-13.0%, and in
float32 only 1.4% at seed 1 from the 26.7 dB one; from one at 24.9 dB, only 4.1-6.4%. The ground
truth of the validation dancer scores a contrast of 0.118 (notebook 05 shows it through the VAE
too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from cnx import convergence
from cnx.launch import profile_options
from cnx.options import VALIDATION_FLAGS
from cnx.profiles import quiet_known_warnings


def training_options(out_dir: Path, seed: int, extra: list[str]):
    """The tiny profile's options (`make demo`'s run) with another seed and no validation."""
    options = profile_options("tiny", [f"--seed={seed}", *extra], str(out_dir / "output"))
    return replace(options, **dict.fromkeys(VALIDATION_FLAGS))  # measured here instead


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="the training run's --seed")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--work_dir", type=Path, default=None, help="keep the run here (default: temporary)")
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
        started = time.perf_counter()
        before = convergence.measure(convergence.initial_pipeline(options), batches, validations, options)
        measure_seconds = time.perf_counter() - started
        train_seconds = train(options)
        trained = convergence.trained_pipeline(options, Path(options.output_dir) / "final")
        after = convergence.measure(trained, batches, validations, options)

    result = {
        "model": options.pretrained_model_name_or_path,
        "steps": options.max_train_steps,
        "seed": args.seed,
        "learning_rate": options.learning_rate,
        "trainable": options.trainable,
        "control_scale": options.control_scale,
        "train_seconds": round(train_seconds, 1),
        "measure_seconds": round(measure_seconds, 1),
        "step_0": asdict(before),
        "end": asdict(after),
        "verdicts": verdicts(before, after),
    }
    print(f"{options.max_train_steps} steps, seed {args.seed}: training {train_seconds:.0f} s, ", end="")
    print(f"one measurement {measure_seconds:.0f} s")
    print(f"{'':28}{'step 0':>10}{'end':>10}")
    for key in result["end"]:
        print(f"{key:28}{result['step_0'][key]:10.4f}{result['end'][key]:10.4f}")
    for claim, holds in result["verdicts"].items():
        print(f"{'yes' if holds else 'NO ':4} {claim}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
