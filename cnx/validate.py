"""`cnx validate`: generate a validation folder's video and score it against its ground truth.

The folder has the original code's layout: `ground_truth/0.png..N.png`,
`pose/0.png..N.png` and `reference_image.png` (the original training flags
`--validation_image_folder`, `--validation_control_folder`, `--validation_image`
name the three parts one by one). The output folder gets the videos and grid
of `cnx generate` plus `metrics.json`: PSNR, SSIM, L1 and temporal error
against the ground truth, and, given the poses' keypoints (`--keypoints`, e.g.
the synthetic dancers' known poses), PSNR/SSIM inside the person's box and
control fidelity (`cnx.metrics`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnx.conditioning import DEFAULT_FPS
from cnx.generate import (
    InputError,
    add_sampling_arguments,
    find_trained_weights,
    fit,
    numbered_images,
    output_size,
    pipeline_from_args,
    read_frames_input,
    read_image,
    sampling_options,
    to_uint8,
    write_outputs,
)


@dataclass(frozen=True)
class ValidationSet:
    """One validation video: the reference, its poses and the true frames, at their source size."""

    reference: np.ndarray  # (H, W, 3) uint8
    poses: np.ndarray  # (F, h, w, 3) uint8
    ground_truth: np.ndarray  # (F, H, W, 3) uint8
    keypoints: dict | None = None  # `cnx.pose.load_keypoints`' dict for the F frames, normalised


def read_validation_set(
    image_folder: str | Path,
    control_folder: str | Path,
    reference_image: str | Path,
    keypoints: str | Path | None = None,
    max_frames: int | None = None,
) -> ValidationSet:
    """Read and check a validation folder; InputError naming the folder or file at the first problem."""
    truth_files, pose_files = numbered_images(image_folder), numbered_images(control_folder)
    if not pose_files:
        raise InputError(f"{control_folder}: no pose images")
    if len(truth_files) != len(pose_files):
        raise InputError(
            f"{image_folder} has {len(truth_files)} ground-truth images but {control_folder} has "
            f"{len(pose_files)} pose images: they must match one to one"
        )
    reference = read_image(reference_image)
    ground_truth = read_frames_input(image_folder, "ground truth", max_frames)
    poses = read_frames_input(control_folder, "pose", max_frames)
    track = None
    if keypoints is not None:
        track = read_frames_input(keypoints, "keypoints", max_frames)
        if len(track["body"]) != len(poses):
            raise InputError(f"{keypoints}: {len(track['body'])} frames of keypoints for {len(poses)} poses")
    return ValidationSet(reference, poses, ground_truth, track)


def crop_keypoints(points: np.ndarray, source_size: tuple[int, int], height: int, width: int) -> np.ndarray:
    """Normalised points (..., 2) of a (H, W) source mapped into its centre crop to the output's aspect."""
    from cnx.data import crop_window

    box = crop_window(source_size[1], source_size[0], width, height)
    origin, span = np.array([box.x0, box.y0]), np.array([box.x1 - box.x0, box.y1 - box.y0])
    return (np.asarray(points) - origin) / span


def score(generated: np.ndarray, validation: ValidationSet, height: int, width: int) -> dict:
    """Metrics of (F, H, W, 3) uint8 generated frames against the validation set (module docstring)."""
    from cnx import metrics

    truth = fit(validation.ground_truth[: len(generated)], height, width)
    if validation.keypoints is None:
        return metrics.video_metrics(generated, truth)
    source = validation.ground_truth.shape[1:3]
    body = crop_keypoints(validation.keypoints["body"][: len(generated)], source, height, width)
    scores = np.asarray(validation.keypoints["body_scores"][: len(generated)])
    poses = metrics.Poses(body, scores)
    boxes = metrics.person_boxes_from_keypoints(body, scores)
    scorer = metrics.AppearanceScorer(fit(validation.reference[None], height, width)[0], body[0], scores[0])
    return metrics.video_metrics(generated, truth, boxes=boxes, poses=poses, scorer=scorer)


def run_validation(
    pipe, validation: ValidationSet, out_dir: str | Path, height: int, width: int, **options
) -> dict:
    """Generate the validation video with `pipe`, write videos, grid and metrics.json; return the metrics."""
    frames = pipe(
        validation.reference, validation.poses, height=height, width=width, output_type="np", **options
    )
    generated = to_uint8(frames.frames[0])
    rows = [
        fit(validation.ground_truth[: len(generated)], height, width),
        fit(validation.poses, height, width),
    ]
    write_outputs(out_dir, generated, options.get("fps", DEFAULT_FPS), rows)
    result = score(generated, validation, height, width)
    record = {"frames": len(generated), "width": width, "height": height, "metrics": result}
    (Path(out_dir) / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnx validate", description=__doc__.splitlines()[0])
    add_sampling_arguments(parser)
    parser.add_argument(
        "--controlnext", required=True, help="ControlNeXt weights, export, checkpoint or output_dir"
    )
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
        weights = find_trained_weights(args.controlnext)
    except InputError as err:
        print(f"cnx validate: {err}", file=sys.stderr)
        return 2
    pipe = pipeline_from_args(args, weights)
    result = run_validation(pipe, validation, args.output_dir, height, width, **sampling_options(args))
    for name, value in result.items():
        print(f"{name:>16}: {value:.4f}")
    print(f"written to {args.output_dir} (video.mp4, video.gif, grid.png, metrics.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
