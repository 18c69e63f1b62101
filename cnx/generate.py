"""`cnx generate`: animate a reference image along poses with an SVD folder and a trained ControlNeXt.

Inputs are checked before any model loads (files exist, images decode, at
least one pose, sizes multiples of 8, weights found), each problem named with
its file. `--controlnext` takes a weights file, an export (`final/`), any
`checkpoint-<step>` that `cnx train` wrote, or a training output_dir
(`cnx.sampler`). The output folder gets `video.mp4`, `video.gif` and
`grid.png`: rows of ground truth (when given), pose and generated frames at the
video's own aspect ratio (`cnx.media`).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from cnx.media import InputError, fit, output_size, read_frames_input, read_image, to_uint8, write_outputs
from cnx.sampler import add_sampling_arguments, find_trained_weights, pipeline_from_args, sampling_options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnx generate", description=__doc__.splitlines()[0])
    add_sampling_arguments(parser)
    parser.add_argument("--reference_image", required=True, help="the person to animate")
    parser.add_argument(
        "--pose", required=True, help="pose video, folder of pose images, or keypoint track .npz"
    )
    parser.add_argument("--ground_truth", default=None, help="video or image folder shown above the result")
    parser.add_argument(
        "--align_poses", action="store_true", help="move a .npz track onto the reference person"
    )
    parser.add_argument(
        "--reference_keypoints", default=None, help=".npz track whose frame 0 is the reference"
    )
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    try:
        reference = read_image(args.reference_image)
        height, width = output_size(reference, args.height, args.width)
        poses = read_frames_input(args.pose, "pose", args.max_frames)
        truth = (
            read_frames_input(args.ground_truth, "ground truth", args.max_frames)
            if args.ground_truth
            else None
        )
        poses = pose_images(poses, reference, height, width, args.align_poses, args.reference_keypoints)
        weights = find_trained_weights(args.controlnext, args.ema)
    except InputError as err:
        print(f"cnx generate: {err}", file=sys.stderr)
        return 2
    from cnx.weights import WeightLoadError

    try:
        pipe = pipeline_from_args(args, weights)
    except WeightLoadError as err:  # weights that do not fit this SVD
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 1
    options = sampling_options(args)
    generated = to_uint8(
        pipe(reference, poses, height=height, width=width, output_type="np", **options).frames[0]
    )
    rows = [] if truth is None else [fit(truth[: len(generated)], height, width)]
    paths = write_outputs(args.output_dir, generated, args.fps, [*rows, fit(poses, height, width)])
    print(f"{len(generated)} frames of {width}x{height}: " + ", ".join(str(p) for p in paths.values()))
    return 0


def pose_images(
    poses, reference: np.ndarray, height: int, width: int, align: bool, keypoints_path
) -> np.ndarray:
    """(F, h, w, 3) uint8 pose images; a keypoint track is drawn (aligned to the reference if `align`)."""
    from cnx.pipeline import crop_to_aspect, pose_track_frames, reference_tensor

    if not isinstance(poses, dict):
        if align:
            raise InputError("--align_poses needs a keypoint track (.npz) as --pose, not images")
        return poses
    reference_keypoints = None
    if align:
        if keypoints_path is None:
            raise InputError(
                "--align_poses needs --reference_keypoints (an .npz track whose frame 0 is the reference)"
            )
        track = read_frames_input(keypoints_path, "reference keypoints")
        reference_keypoints = {"body": track["body"][0], "body_scores": track["body_scores"][0]}
    cropped = crop_to_aspect(reference_tensor(reference), height, width)
    return pose_track_frames(poses, cropped, align, reference_keypoints)


if __name__ == "__main__":
    sys.exit(main())
