"""A validation folder: reading it, generating its video with a pipeline, scoring it.

The folder has the original code's layout: `ground_truth/0.png..N.png`,
`pose/0.png..N.png` and `reference_image.png` (the original training flags
`--validation_image_folder`, `--validation_control_folder`, `--validation_image`
name the three parts one by one). `run_validation` writes the videos and grid
of `cnx.media.write_outputs` plus `metrics.json`: PSNR, SSIM, L1 and temporal
error against the ground truth, and, given the poses' keypoints (e.g. the
synthetic dancers' known poses), PSNR/SSIM inside the person's box and control
fidelity (`cnx.metrics`). Given a pose detector (`scoring_detector`), also PCK,
joint error, detection rate and contrast of the pose it finds in the generated
frames (`cnx.metrics.pose_metrics`), against the keypoints or, without them,
against the poses it finds in the ground truth. Used by `cnx validate`, by
training's validation and by the convergence checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnx.conditioning import DEFAULT_FPS
from cnx.media import InputError, fit, numbered_images, read_frames_input, read_image, to_uint8, write_outputs


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


# The pose detectors that `cnx validate --pose_detector` scores with (`scoring_detector`).
POSE_DETECTORS = ("mediapipe",)


def scoring_detector(name: str):
    """A `cnx.pose.PoseDetector` for scoring videos: every frame on its own, bodies only.

    On its own, so that no frame's pose is smoothed towards or tracked from another's (a still or
    shuffled video would borrow its neighbours' poses) and nothing carries over between videos.
    """
    if name == "mediapipe":
        from cnx.mediapipe_pose import MediaPipePoseDetector

        return MediaPipePoseDetector(video=False, hands=False)
    raise ValueError(f"unknown pose detector {name!r}: one of {', '.join(POSE_DETECTORS)}")


def score(generated: np.ndarray, validation: ValidationSet, height: int, width: int, detector=None) -> dict:
    """Metrics of (F, H, W, 3) uint8 generated frames against the validation set (module docstring).

    With a `detector` (`scoring_detector`), also the detected pose's figures (`cnx.metrics.pose_metrics`)
    against the known keypoints, or, without them, against the poses it detects in the ground truth.
    """
    from cnx import metrics

    truth = fit(validation.ground_truth[: len(generated)], height, width)
    if validation.keypoints is None:
        result = metrics.video_metrics(generated, truth)
        if detector is not None:
            result |= metrics.pose_metrics(generated, metrics.detect_poses(truth, detector), detector)
        return result
    source = validation.ground_truth.shape[1:3]
    body = crop_keypoints(validation.keypoints["body"][: len(generated)], source, height, width)
    scores = np.asarray(validation.keypoints["body_scores"][: len(generated)])
    poses = metrics.Poses(body, scores)
    boxes = metrics.person_boxes_from_keypoints(body, scores)
    scorer = metrics.AppearanceScorer(fit(validation.reference[None], height, width)[0], body[0], scores[0])
    return metrics.video_metrics(generated, truth, boxes, poses, scorer, detector)


def run_validation(
    pipe, validation: ValidationSet, out_dir: str | Path, height: int, width: int, detector=None, **options
) -> dict:
    """Generate the validation video with `pipe`, write videos, grid and metrics.json; return the metrics.

    `detector`: see `score`.
    """
    frames = pipe(
        validation.reference, validation.poses, height=height, width=width, output_type="np", **options
    )
    generated = to_uint8(frames.frames[0])
    rows = [
        fit(validation.ground_truth[: len(generated)], height, width),
        fit(validation.poses, height, width),
    ]
    write_outputs(out_dir, generated, options.get("fps", DEFAULT_FPS), rows)
    result = score(generated, validation, height, width, detector)
    record = {"frames": len(generated), "width": width, "height": height, "metrics": result}
    (Path(out_dir) / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    return result
