"""`cnx validate`: generate a validation folder's video and score it against its ground truth.

The folder has the original code's layout: `ground_truth/0.png..N.png`,
`pose/0.png..N.png` and `reference_image.png`, or its three parts named one by
one. `--controlnext` takes a weights file, an export (`final/`), any
`checkpoint-<step>` that `cnx train` wrote, or a training output_dir. The output
folder gets the videos and grid of `cnx generate` plus `metrics.json`
(`cnx.validation`). `--pose_detector mediapipe` adds a real detector's view of the
generated person (`cnx.metrics.pose_metrics`: PCK, joint error, detection rate,
contrast) against `--keypoints`, or against the poses it finds in the ground truth;
it is off by default, as it costs a fraction of a second per frame.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnx.media import InputError, output_size
from cnx.sampler import add_sampling_arguments, find_trained_weights, pipeline_from_args, sampling_options
from cnx.validation import POSE_DETECTORS, read_validation_set, run_validation, scoring_detector


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnx validate", description=__doc__.splitlines()[0])
    add_sampling_arguments(parser)
    parser.add_argument(
        "--validation_dir", default=None, help="folder with ground_truth/, pose/, reference_image.png"
    )
    parser.add_argument(
        "--validation_image_folder", default=None, help="ground-truth frames (default: DIR/ground_truth)"
    )
    parser.add_argument("--validation_control_folder", default=None, help="pose frames (default: DIR/pose)")
    parser.add_argument(
        "--validation_image", default=None, help="reference image (default: DIR/reference_image.png)"
    )
    parser.add_argument(
        "--keypoints", default=None, help="known poses of the frames (.npz, cnx.pose.save_keypoints)"
    )
    parser.add_argument(
        "--pose_detector",
        choices=["none", *POSE_DETECTORS],
        default="none",
        help="score the generated person's pose with this detector (needs `pip install -e '.[pose]'`)",
    )
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    folder = Path(args.validation_dir) if args.validation_dir else None
    parts = {
        "validation_image_folder": args.validation_image_folder or (folder and folder / "ground_truth"),
        "validation_control_folder": args.validation_control_folder or (folder and folder / "pose"),
        "validation_image": args.validation_image or (folder and folder / "reference_image.png"),
    }
    missing = [f"--{name}" for name, value in parts.items() if value is None]
    if missing:
        parser.error(f"give --validation_dir or all of {', '.join(missing)}")
    try:
        validation = read_validation_set(*parts.values(), args.keypoints, args.max_frames)
        height, width = output_size(validation.reference, args.height, args.width)
        weights = find_trained_weights(args.controlnext, args.ema)
    except InputError as err:
        print(f"cnx validate: {err}", file=sys.stderr)
        return 2
    try:  # before the models load: a missing detector is said at once
        detector = None if args.pose_detector == "none" else scoring_detector(args.pose_detector)
    except ImportError as err:
        print(f"cnx validate: --pose_detector {args.pose_detector}: {err}", file=sys.stderr)
        return 2
    from cnx.weights import WeightLoadError

    try:
        pipe = pipeline_from_args(args, weights)
    except WeightLoadError as err:  # weights that do not fit this SVD
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 1
    result = run_validation(
        pipe, validation, args.output_dir, height, width, detector, **sampling_options(args)
    )
    for name, value in result.items():
        print(f"{name:>16}: {value:.4f}")
    print(f"written to {args.output_dir} (video.mp4, video.gif, grid.png, metrics.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
