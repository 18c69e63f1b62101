"""Pose tools: the DWPose/OpenPose skeleton, drawing it, aligning it, extracting it from a video.

ControlNeXt-SVD-v2 is conditioned on pose videos drawn in the DWPose style: 18
OpenPose body keypoints joined by 17 coloured "sticks", plus two 21-point hands,
on black. The network learns those exact colours, so every pose image in cnx is
drawn by `draw_pose` and kept RGB from end to end.

Conventions used throughout cnx:
- keypoints are normalised `(x, y)` in [0, 1] of the image width and height;
- `body` (18, 2) with `body_scores` (18,); `hands` (2, 21, 2) with `hand_scores`
  (2, 21), hand 0 the person's left hand, hand 1 the right (COCO-WholeBody order);
- a point whose score is below the threshold (DWPose: 0.3) is missing: it is not
  drawn and neither is any limb touching it.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

BODY_KEYPOINTS = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
)

# The 17 drawn limbs (0-based keypoint pairs); limb i is drawn in BODY_COLORS[i].
BODY_LIMBS = (
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
)

# The OpenPose colour wheel, read as RGB: limb i and keypoint i share colour i.
BODY_COLORS = (
    (255, 0, 0),
    (255, 85, 0),
    (255, 170, 0),
    (255, 255, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 255, 255),
    (0, 170, 255),
    (0, 85, 255),
    (0, 0, 255),
    (85, 0, 255),
    (170, 0, 255),
    (255, 0, 255),
    (255, 0, 170),
    (255, 0, 85),
)

# Limbs are dimmed to this fraction of their colour before the joints go on top (DWPose look).
LIMB_BRIGHTNESS = 0.6

# 21 hand points: 0 wrist, then 4 per finger (thumb, index, middle, ring, little) from base to tip.
HAND_EDGES = tuple(
    (0 if j == 0 else 4 * f + j, 4 * f + j + 1) for f in range(5) for j in range(4)
)  # 20 edges
HAND_EDGE_COLORS = tuple(
    tuple(round(255 * c) for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0))
    for i in range(len(HAND_EDGES))
)
HAND_POINT_COLOR = (0, 0, 255)

# Keypoints that stay put while a person dances (head, neck, shoulders, hips): used to align poses.
ALIGN_KEYPOINTS = (0, 1, 2, 5, 8, 11, 14, 15, 16, 17)


def _as_points(name: str, array, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    return array


def draw_pose(
    body,
    body_scores,
    hands,
    hand_scores,
    height: int,
    width: int,
    threshold: float = 0.3,
    stick_width: int = 4,
    joint_radius: int = 4,
    hand_line_width: int = 2,
    hand_point_radius: int = 4,
) -> np.ndarray:
    """Draw one person's pose as a DWPose-style image, (H, W, 3) uint8 **RGB** on black.

    Colours: limb i (BODY_LIMBS) is a filled ellipse in BODY_COLORS[i] dimmed to 60%,
    keypoint i a filled circle in BODY_COLORS[i] (limb 0, neck to right shoulder, is red);
    hand edge i is coloured HSV(i / 20, 1, 1) and hand points are blue dots. Points with a
    score below `threshold`, and limbs or edges touching them, are left out. `hands` and
    `hand_scores` may be None for a body-only image. Sizes are in pixels (DWPose's defaults).
    """
    from PIL import Image, ImageDraw

    body = _as_points("body", body, (18, 2))
    body_scores = _as_points("body_scores", body_scores, (18,))
    scale = np.array([width, height], dtype=np.float64)
    body_px = body * scale  # (18, 2) pixels
    visible = body_scores >= threshold

    # Limbs: ellipses along each bone, all dimmed together so joints stand out on top.
    limbs = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(limbs)
    angles = np.linspace(0.0, 2.0 * math.pi, 72, endpoint=False)
    for (a, b), color in zip(BODY_LIMBS, BODY_COLORS, strict=False):
        if not (visible[a] and visible[b]):
            continue
        center = (body_px[a] + body_px[b]) / 2.0
        delta = body_px[a] - body_px[b]
        half_length = float(np.hypot(*delta)) / 2.0
        theta = math.atan2(delta[1], delta[0])
        ex, ey = half_length * np.cos(angles), stick_width * np.sin(angles)
        xs = center[0] + ex * math.cos(theta) - ey * math.sin(theta)
        ys = center[1] + ex * math.sin(theta) + ey * math.cos(theta)
        draw.polygon(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=color)
    canvas = (np.asarray(limbs, dtype=np.float64) * LIMB_BRIGHTNESS).astype(np.uint8)

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    r = joint_radius
    for i, (x, y) in enumerate(body_px):
        if visible[i]:
            x, y = int(x), int(y)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=BODY_COLORS[i])

    if hands is not None:
        hands = _as_points("hands", hands, (2, 21, 2))
        hand_scores = _as_points("hand_scores", hand_scores, (2, 21))
        for points, scores in zip(hands * scale, hand_scores, strict=True):
            seen = scores >= threshold
            for (a, b), color in zip(HAND_EDGES, HAND_EDGE_COLORS, strict=True):
                if seen[a] and seen[b]:
                    line = [(int(points[a, 0]), int(points[a, 1])), (int(points[b, 0]), int(points[b, 1]))]
                    draw.line(line, fill=color, width=hand_line_width)
            r = hand_point_radius
            for (x, y), ok in zip(points, seen, strict=True):
                if ok:
                    x, y = int(x), int(y)
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=HAND_POINT_COLOR)
    return np.asarray(image, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Alignment: make the driving dancer as big as, and stand where, the reference person stands.


@dataclass(frozen=True)
class AlignedPose:
    body: np.ndarray  # (F, 18, 2) normalised to the reference image
    hands: np.ndarray | None  # (F, 2, 21, 2) normalised to the reference image
    scale: float  # reference pixels per driving pixel
    offset: np.ndarray  # (2,) reference pixels added after scaling


def fit_alignment(
    driving_body,
    driving_scores,
    reference_body,
    reference_scores,
    driving_size: tuple[int, int] = (1, 1),
    reference_size: tuple[int, int] = (1, 1),
    threshold: float = 0.3,
    keypoint_ids=ALIGN_KEYPOINTS,
    anchor: str = "first",
) -> tuple[float, np.ndarray]:
    """Scale and offset (in pixels) mapping driving poses onto the reference pose.

    One uniform scale keeps the body's proportions and aspect. It is fitted by least
    squares on the head/neck/shoulder/hip keypoints after centring every frame on its
    own centroid, so the dancer's sway does not shrink the estimate. The offset puts the
    `anchor` frame's centroid ("first": the first frame with two usable points; "mean":
    the average over frames) on the reference's. Only keypoints seen in both poses
    (score >= threshold) count, so missing points are handled frame by frame.
    Sizes are (height, width) of the driving video and of the reference image.
    """
    if anchor not in {"first", "mean"}:
        raise ValueError(f"anchor must be 'first' or 'mean', got {anchor!r}")
    driving_body = np.asarray(driving_body, dtype=np.float64)
    if driving_body.ndim != 3 or driving_body.shape[1:] != (18, 2):
        raise ValueError(f"driving_body must have shape (F, 18, 2), got {driving_body.shape}")
    num_frames = driving_body.shape[0]
    driving_scores = _as_points("driving_scores", driving_scores, (num_frames, 18))
    reference_body = _as_points("reference_body", reference_body, (18, 2))
    reference_scores = _as_points("reference_scores", reference_scores, (18,))
    ids = np.asarray(keypoint_ids)
    d_px = driving_body[:, ids] * np.array(driving_size[::-1], dtype=np.float64)  # (F, K, 2)
    r_px = reference_body[ids] * np.array(reference_size[::-1], dtype=np.float64)  # (K, 2)
    both = (driving_scores[:, ids] >= threshold) & (reference_scores[ids] >= threshold)  # (F, K)
    usable = both.sum(axis=1) >= 2
    if not usable.any():
        raise ValueError(
            "cannot align poses: no frame shares two confident keypoints "
            f"(ids {tuple(int(i) for i in ids)}) with the reference pose"
        )

    cross, spread, centroids = 0.0, 0.0, []
    for f in np.flatnonzero(usable):
        d, r = d_px[f, both[f]], r_px[both[f]]  # (k, 2) each
        d_mean, r_mean = d.mean(axis=0), r.mean(axis=0)
        cross += float(((d - d_mean) * (r - r_mean)).sum())
        spread += float(((d - d_mean) ** 2).sum())
        centroids.append((d_mean, r_mean))
    if spread <= 0.0:
        raise ValueError("cannot align poses: the usable driving keypoints all coincide")
    scale = cross / spread
    if scale <= 0.0:
        raise ValueError("cannot align poses: the driving pose is mirrored relative to the reference")
    pairs = centroids[:1] if anchor == "first" else centroids
    offset = np.mean([r - scale * d for d, r in pairs], axis=0)
    return scale, offset


def apply_alignment(points, scale: float, offset, driving_size=(1, 1), reference_size=(1, 1)) -> np.ndarray:
    """Normalised driving points (..., 2) -> normalised reference points (..., 2)."""
    points = np.asarray(points, dtype=np.float64)
    d_scale = np.array(driving_size[::-1], dtype=np.float64)  # (W, H)
    r_scale = np.array(reference_size[::-1], dtype=np.float64)
    return (points * d_scale * scale + np.asarray(offset)) / r_scale


def align_pose(
    driving_body,
    driving_body_scores,
    reference_body,
    reference_body_scores,
    driving_hands=None,
    *,
    driving_size: tuple[int, int] = (1, 1),
    reference_size: tuple[int, int] = (1, 1),
    threshold: float = 0.3,
    keypoint_ids=ALIGN_KEYPOINTS,
    anchor: str = "first",
) -> AlignedPose:
    """Scale and move a driving pose sequence (F, 18, 2) onto the reference image's body.

    A driving dancer that is taller, smaller or off to one side compared to the person in
    the reference image makes SVD stretch the person or tear the background, so the
    sequence is aligned first. Hands (F, 2, 21, 2) get the same transform; scores are
    unchanged. See `fit_alignment` for how the transform is found.
    """
    scale, offset = fit_alignment(
        driving_body,
        driving_body_scores,
        reference_body,
        reference_body_scores,
        driving_size=driving_size,
        reference_size=reference_size,
        threshold=threshold,
        keypoint_ids=keypoint_ids,
        anchor=anchor,
    )
    body = apply_alignment(driving_body, scale, offset, driving_size, reference_size)
    hands = None
    if driving_hands is not None:
        driving_hands = np.asarray(driving_hands, dtype=np.float64)
        if driving_hands.shape != (body.shape[0], 2, 21, 2):
            raise ValueError(f"driving_hands must have shape (F, 2, 21, 2), got {driving_hands.shape}")
        hands = apply_alignment(driving_hands, scale, offset, driving_size, reference_size)
    return AlignedPose(body=body, hands=hands, scale=scale, offset=offset)


def render_pose_track(track: dict, height: int, width: int, threshold: float = 0.3) -> np.ndarray:
    """(F, H, W, 3) uint8 pose images of a keypoint track (`load_keypoints`' dict: body, body_scores,
    hands, hand_scores; hands optional), drawn with `draw_pose` at height x width."""
    body = np.asarray(track["body"])
    hands, hand_scores = track.get("hands"), track.get("hand_scores")
    return np.stack(
        [
            draw_pose(
                body[t],
                track["body_scores"][t],
                None if hands is None else hands[t],
                None if hand_scores is None else hand_scores[t],
                height,
                width,
                threshold,
            )
            for t in range(len(body))
        ]
    )


def align_track(
    track: dict, reference, driving_size: tuple[int, int], reference_size: tuple[int, int], **fit_options
) -> dict:
    """A keypoint track moved and scaled onto the reference person (`align_pose`), scores unchanged.

    `reference` has `body` (18, 2) and `body_scores` (18,) (a `Keypoints` or a
    dict); sizes are (height, width) of the driving video and the reference image.
    The result is normalised to the reference image.
    """
    get = reference.get if isinstance(reference, dict) else lambda name: getattr(reference, name)
    aligned = align_pose(
        track["body"],
        track["body_scores"],
        get("body"),
        get("body_scores"),
        track.get("hands"),
        driving_size=driving_size,
        reference_size=reference_size,
        **fit_options,
    )
    result = {**track, "body": aligned.body, "size": np.array(reference_size, dtype=np.int32)}
    if aligned.hands is not None:
        result["hands"] = aligned.hands
    return result


# ---------------------------------------------------------------------------------------------
# Known poses: one frame's keypoints, and a clip's saved as .npz (data_samples/keypoints/).


@dataclass(frozen=True)
class Keypoints:
    """One frame's pose, normalised to the image (x, y in [0, 1]), float32; known or detected."""

    body: np.ndarray  # (18, 2)
    body_scores: np.ndarray  # (18,)
    hands: np.ndarray  # (2, 21, 2) [left, right]
    hand_scores: np.ndarray  # (2, 21)


def save_keypoints(path: str | Path, keypoints: list[Keypoints], width: int, height: int, fps: float) -> Path:
    """A byte-deterministic .npz of a clip's known poses (np.savez stamps the current time)."""
    from numpy.lib import format as npy_format

    arrays = {
        "body": np.stack([k.body for k in keypoints]),  # (F, 18, 2)
        "body_scores": np.stack([k.body_scores for k in keypoints]),  # (F, 18)
        "hands": np.stack([k.hands for k in keypoints]),  # (F, 2, 21, 2)
        "hand_scores": np.stack([k.hand_scores for k in keypoints]),  # (F, 2, 21)
        "size": np.array([height, width], dtype=np.int32),
        "fps": np.array(fps, dtype=np.float32),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            npy_format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())
    return path


def load_keypoints(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays `save_keypoints` wrote: body, body_scores, hands, hand_scores, size (H, W), fps."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such keypoints file")
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def joint_errors(points, scores, truth, truth_scores, size: tuple[int, int], threshold: float = 0.3):
    """How far each detected point (..., 2) lies from its true place, as a fraction of the frame height.

    Both are normalised (x, y); `size` is the frame's (height, width), so x and y
    distances count in pixels alike. NaN where either score is below `threshold`:
    a point one side does not see has no error, only a miss (count those apart).
    """
    points, truth = np.asarray(points, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if points.shape != truth.shape or points.shape[-1:] != (2,):
        raise ValueError(f"points and truth must both have shape (..., 2), got {points.shape}, {truth.shape}")
    height, width = size
    pixels = (points - truth) * np.array([width, height], dtype=np.float64)
    error = np.hypot(pixels[..., 0], pixels[..., 1]) / height
    seen = (np.asarray(scores) >= threshold) & (np.asarray(truth_scores) >= threshold)
    return np.where(seen, error, np.nan)


# ---------------------------------------------------------------------------------------------
# Boxes and the per-frame detection json (the original code's `meta_info/<n>.json` schema).


def box_from_points(points, margin: float = 0.1) -> list[list[float]]:
    """[[x0, y0], [x1, y1]] around normalised points (N, 2), padded by `margin` x its longer
    side on every side, clipped to [0, 1]; always ordered (x0 <= x1, y0 <= y1)."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
        raise ValueError(f"points must have shape (N, 2) with N >= 1, got {points.shape}")
    lo, hi = points.min(axis=0), points.max(axis=0)
    pad = margin * float((hi - lo).max())
    lo, hi = np.clip(lo - pad, 0.0, 1.0), np.clip(hi + pad, 0.0, 1.0)
    return [[float(lo[0]), float(lo[1])], [float(hi[0]), float(hi[1])]]


def hand_boxes(hands, margin: float = 0.1) -> list[list[list[float]]]:
    """One box per hand from (2, 21, 2) normalised hand keypoints (see `box_from_points`).

    All 21 points count, confident or not: the score says how sure the detector is,
    and the original code keeps it next to the box (`hands_score`) for the loss weights.
    """
    hands = _as_points("hands", hands, (2, 21, 2))
    return [box_from_points(points, margin) for points in hands]


def detection_entry(person_box, hands, hand_scores, margin: float = 0.1, digits: int = 5) -> dict:
    """One frame's entry of the per-frame detection json.

    `{"boxes": [person box], "hands_boxes": [left box, right box], "hands_score": [[21], [21]]}`,
    boxes as [[x0, y0], [x1, y1]] normalised; `person_box` None gives `"boxes": []`.
    """
    hand_scores = _as_points("hand_scores", hand_scores, (2, 21))

    def _round(box):
        return [[round(v, digits) for v in corner] for corner in box]

    boxes = []
    if person_box is not None:
        (x0, y0), (x1, y1) = np.clip(np.asarray(person_box, dtype=np.float64), 0.0, 1.0)
        if x1 < x0 or y1 < y0:
            raise ValueError(f"person box corners are not ordered: {person_box}")
        boxes = [_round([[x0, y0], [x1, y1]])]
    return {
        "boxes": boxes,
        "hands_boxes": [_round(box) for box in hand_boxes(hands, margin)],
        "hands_score": [[round(float(s), 4) for s in scores] for scores in hand_scores],
    }


# ---------------------------------------------------------------------------------------------
# Extracting poses from a real video with any detector: MediaPipe (cnx.mediapipe_pose, what
# `cnx extract-poses` uses) or DWPose through rtmlib (load_dwpose_detector, your own onnx models).


class PoseDetector(Protocol):
    """frame (H, W, 3) uint8 RGB -> (body (18, 2), body_scores (18,), hands (2, 21, 2),
    hand_scores (2, 21), person_box [[x0, y0], [x1, y1]] or None); coordinates normalised."""

    def __call__(self, frame: np.ndarray) -> tuple: ...


def extract_pose_video(
    video_path: str | Path,
    out_pose_video: str | Path,
    out_meta_json: str | Path,
    detector: PoseDetector | Callable,
    threshold: float = 0.3,
    chunk_size: int = 32,
    crf: int = 18,
    progress: bool = True,
) -> list[dict]:
    """Run `detector` on every frame of a video; write the pose video and per-frame json.

    The pose video has the source's size, frame count and frame rate, drawn by
    `draw_pose`; the json is a list with one `detection_entry` per frame. Returns it.
    A frame where the detector found no person (box None) is drawn black and its
    entry has `"boxes": []`, so the loss weights and `cnx check-data` see it as missing.
    """
    from tqdm.auto import tqdm

    from cnx.video import VideoReadError, open_video, read_frames, write_video

    video_path = Path(video_path)
    if not video_path.is_file():
        raise FileNotFoundError(f"{video_path}: no such video")
    reader = open_video(video_path)
    num_frames, fps = len(reader), float(reader.get_avg_fps())
    try:
        height, width = read_frames(reader, [0]).shape[1:3]
    except VideoReadError as error:
        raise VideoReadError(f"{video_path}: {error}") from error
    entries: list[dict] = []

    def pose_frames():
        bar = tqdm(total=num_frames, desc=video_path.name, unit="frame", leave=False, disable=not progress)
        with bar:
            for start in range(0, num_frames, chunk_size):
                frames = read_frames(reader, range(start, min(start + chunk_size, num_frames)))
                for offset, frame in enumerate(frames):
                    detection = detector(frame)
                    if not isinstance(detection, tuple) or len(detection) != 5:
                        raise ValueError(
                            f"{video_path} frame {start + offset}: the detector must return "
                            "(body, body_scores, hands, hand_scores, person_box)"
                        )
                    body, body_scores, hands, hand_scores, person_box = detection
                    try:
                        entries.append(detection_entry(person_box, hands, hand_scores))
                        if person_box is None:
                            image = np.zeros((height, width, 3), dtype=np.uint8)
                        else:
                            image = draw_pose(body, body_scores, hands, hand_scores, height, width, threshold)
                    except ValueError as error:
                        raise ValueError(f"{video_path} frame {start + offset}: {error}") from error
                    yield image
                    bar.update(1)

    write_video(out_pose_video, pose_frames(), fps=fps, crf=crf)
    out_meta_json = Path(out_meta_json)
    out_meta_json.parent.mkdir(parents=True, exist_ok=True)
    out_meta_json.write_text(json.dumps(entries))
    return entries


# COCO-WholeBody (133 points) -> the 18 OpenPose body points; the neck (-1) is the shoulders' midpoint.
_WHOLEBODY_TO_OPENPOSE = (0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
_WHOLEBODY_LEFT_HAND = slice(91, 112)
_WHOLEBODY_RIGHT_HAND = slice(112, 133)


def wholebody_to_openpose(keypoints, scores, height: int, width: int):
    """COCO-WholeBody pixels (133, 2) and scores (133,) -> normalised OpenPose body and hands.

    Returns body (18, 2), body_scores (18,), hands (2, 21, 2) [left, right], hand_scores (2, 21).
    The neck is the shoulders' midpoint, scored by the weaker shoulder.
    """
    keypoints = _as_points("keypoints", keypoints, (133, 2)) / np.array([width, height], dtype=np.float64)
    scores = _as_points("scores", scores, (133,))
    body = np.empty((18, 2))
    body_scores = np.empty(18)
    for i, j in enumerate(_WHOLEBODY_TO_OPENPOSE):
        if j < 0:
            body[i] = keypoints[[5, 6]].mean(axis=0)
            body_scores[i] = scores[[5, 6]].min()
        else:
            body[i], body_scores[i] = keypoints[j], scores[j]
    hands = np.stack([keypoints[_WHOLEBODY_LEFT_HAND], keypoints[_WHOLEBODY_RIGHT_HAND]])
    hand_scores = np.stack([scores[_WHOLEBODY_LEFT_HAND], scores[_WHOLEBODY_RIGHT_HAND]])
    return body, body_scores, hands, hand_scores


def load_dwpose_detector(
    det_model_path: str | Path,
    pose_model_path: str | Path,
    device: str = "cpu",
    det_input_size: tuple[int, int] = (640, 640),
    pose_input_size: tuple[int, int] = (288, 384),
) -> PoseDetector:
    """A DWPose detector (YOLOX person boxes + RTMPose/DWPose whole-body keypoints) on ONNX Runtime.

    `cnx extract-poses` uses MediaPipe (`cnx.mediapipe_pose`), whose models come with its
    wheel; this is for those who have DWPose's models, the detector the original training
    data was drawn with: `cnx extract-poses --detector dwpose --dwpose_det D.onnx
    --dwpose_pose P.onnx`, or pass it to `extract_pose_video`. You supply the two .onnx
    files (e.g. YOLOX-l and DWPose-l 384x288); nothing is downloaded. Needs the `dwpose`
    extra (`pip install -e '.[dwpose]'`: rtmlib, onnxruntime). The largest detected person
    is kept per frame; its keypoints map to cnx's skeleton by `wholebody_to_openpose`.
    """
    for path in (det_model_path, pose_model_path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such onnx model file (you supply the DWPose onnx models)")
    try:
        from rtmlib import YOLOX, RTMPose
    except ImportError as error:
        raise ImportError(
            "the DWPose extractor needs the optional packages rtmlib and onnxruntime: `pip install -e "
            "'.[dwpose]'` (or `pip install rtmlib onnxruntime`); you also supply the two .onnx model files"
        ) from error

    det_model = YOLOX(
        str(det_model_path), model_input_size=det_input_size, backend="onnxruntime", device=device
    )
    pose_model = RTMPose(
        str(pose_model_path), model_input_size=pose_input_size, backend="onnxruntime", device=device
    )

    def detect(frame: np.ndarray):
        height, width = frame.shape[:2]
        bgr = np.ascontiguousarray(frame[..., ::-1])  # rtmlib follows OpenCV: BGR in
        boxes = np.asarray(det_model(bgr), dtype=np.float64).reshape(-1, 4)  # (N, 4) pixels xyxy
        if len(boxes) == 0:
            return np.zeros((18, 2)), np.zeros(18), np.zeros((2, 21, 2)), np.zeros((2, 21)), None
        box = boxes[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))]
        keypoints, scores = pose_model(bgr, bboxes=[box.tolist()])  # (1, 133, 2), (1, 133)
        body, body_scores, hands, hand_scores = wholebody_to_openpose(keypoints[0], scores[0], height, width)
        person_box = [[box[0] / width, box[1] / height], [box[2] / width, box[3] / height]]
        return body, body_scores, hands, hand_scores, person_box

    return detect
