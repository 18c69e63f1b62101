"""Numbers for generated videos: fidelity to ground truth, temporal consistency, and control fidelity.

Every function takes videos as (F, H, W, 3) arrays, uint8 or float in [0, 1]
(numpy or torch), and returns plain floats or (F,) arrays. PSNR and SSIM are
torchmetrics' functional metrics; nothing here is a network.

Control fidelity asks how closely the generated person follows the driving
poses, in two parts computed from one matrix `S[t, u]` = disagreement between
generated frame t and driving pose u (`pose_disagreement`):
- timed: mean_t S[t, t], does each frame show its own pose;
- untimed: mean_u min_t S[t, u], does the video show each pose at all.
A video with the right poses in the wrong order fails only the first; one that
ignores the poses (a still image) fails both. `control_fidelity` reports both
and their mean (lower is better), and a third figure that only motion can earn:
- contrast: mean_t (mean_{u != t} S[t, u] - S[t, t]), how much better each frame
  shows its own pose than the others (higher is better). A still video scores 0
  whatever it looks like, and an offset common to a frame's row (a colour cast,
  a washed-out decoder) cancels, so it tells "follows the poses" apart from
  "looks like the reference". Two scorers fill S:
- `AppearanceScorer` for synthetic dancers, whose poses are known exactly:
  colours sampled along each limb of the driving pose in the generated frame
  against colours along the same limb of the reference pose in the reference
  image. Where the person follows the pose, the limbs sit where the skeleton says.
- `DetectorScorer` for real data: any keypoint detector with `cnx.pose`'s
  `PoseDetector` interface (MediaPipe, `cnx.mediapipe_pose`; the DWPose adapter,
  `cnx.pose.load_dwpose_detector`) finds the generated person's keypoints; S is
  their distance to the driving keypoints in units of the driving person's height.

A detector also gives the usual pose-estimation figures of a video against its
driving poses, frame t against pose t (`pose_error`, `pose_metrics`): PCK, the
fraction of the driving keypoints found within PCK_ALPHA of the person's height
(`person_heights`: the vertical extent of the driving pose's confident keypoints)
of where they should be, a missed keypoint counting as wrong; the mean joint
error of those found, in person heights; and the fraction of frames where a
person was found. The maths (`keypoint_distances`, `pck_and_joint_error`,
`pose_error_of`) is plain numpy on keypoint arrays, apart from the detection.

FID and FVD need Inception / I3D weights that cannot be downloaded here, so
they are not computed. To add them, install `torchmetrics[image]` with
`torch-fidelity`, put the weights on disk and build
`torchmetrics.image.fid.FrechetInceptionDistance(feature=2048)` with
`feature_extractor_weights_path=<local .pth>`; feed it generated and ground-truth
frames as uint8 (N, 3, H, W). FVD needs an I3D network loaded the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from cnx.pose import BODY_LIMBS, box_from_points

SSIM_WINDOW = 11  # torchmetrics' default Gaussian window; crops are grown to at least this size
LIMB_SAMPLES = 9  # colours sampled along each limb, from 10% to 90% of its length
KEYPOINT_THRESHOLD = 0.3  # keypoints scored below this are left out (as `cnx.pose.draw_pose` does)


def as_video(frames) -> torch.Tensor:
    """(F, H, W, 3) uint8 or float in [0, 1] (numpy or torch) -> (F, 3, H, W) float32 in [0, 1]."""
    video = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected frames (F, H, W, 3), got {tuple(video.shape)}")
    video = video.float() / 255.0 if video.dtype == torch.uint8 else video.float()
    return video.permute(0, 3, 1, 2).contiguous()


def _pair(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = as_video(pred), as_video(target)
    if pred.shape != target.shape:
        raise ValueError(
            f"generated {tuple(pred.shape)} and ground truth {tuple(target.shape)} differ in shape"
        )
    return pred, target


# ---------------------------------------------------------------------------------------------
# Against ground truth


def psnr(pred, target) -> np.ndarray:
    """(F,) PSNR in dB of each frame, data range 1."""
    pred, target = _pair(pred, target)
    values = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return values.numpy()


def ssim(pred, target) -> np.ndarray:
    """(F,) SSIM of each frame (Gaussian window of 11, data range 1)."""
    pred, target = _pair(pred, target)
    return structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none").numpy()


def l1(pred, target) -> np.ndarray:
    """(F,) mean absolute error of each frame, in [0, 1] units."""
    pred, target = _pair(pred, target)
    return (pred - target).abs().flatten(1).mean(1).numpy()


def temporal_error(pred, target) -> float:
    """Mean absolute error of the frame-to-frame differences against ground truth's.

    Flicker, or a frozen video where the truth moves, shows here even when each
    frame alone is close to its ground truth.
    """
    pred, target = _pair(pred, target)
    if len(pred) < 2:
        raise ValueError("temporal_error needs at least two frames")
    return float(((pred[1:] - pred[:-1]) - (target[1:] - target[:-1])).abs().mean())


def person_boxes_from_keypoints(body, body_scores, margin: float = 0.1) -> np.ndarray:
    """(F, 2, 2) normalised boxes around each frame's confident body keypoints (F, 18, 2)."""
    boxes = []
    for points, scores in zip(np.asarray(body), np.asarray(body_scores), strict=True):
        confident = points[scores >= KEYPOINT_THRESHOLD]
        boxes.append(box_from_points(confident if len(confident) else points, margin))
    return np.asarray(boxes, dtype=np.float64)


def _box_crop(video: torch.Tensor, t: int, box, min_size: int) -> torch.Tensor:
    """Frame t of (F, 3, H, W) cut to a normalised box, grown about its centre to >= min_size pixels."""
    (x0, y0), (x1, y1) = np.asarray(box, dtype=np.float64)
    spans = []
    for lo, hi, size in ((x0, x1, video.shape[-1]), (y0, y1, video.shape[-2])):
        a, b = max(0, int(np.floor(lo * size))), min(size, int(np.ceil(hi * size)))
        need = min(min_size, size)
        if b - a < need:
            a = min(max(0, round((a + b - need) / 2)), size - need)
            b = a + need
        spans.append((a, b))
    (left, right), (top, bottom) = spans
    return video[t : t + 1, :, top:bottom, left:right]


def psnr_ssim_in_boxes(pred, target, boxes) -> tuple[np.ndarray, np.ndarray]:
    """(F,) PSNR and (F,) SSIM inside each frame's person box ((F, 2, 2) normalised).

    The person is a small part of a full-body frame; outside the box a plain
    background inflates both scores.
    """
    pred, target = _pair(pred, target)
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.shape != (len(pred), 2, 2):
        raise ValueError(f"boxes must be (F, 2, 2) for {len(pred)} frames, got {boxes.shape}")
    psnrs, ssims = [], []
    for t, box in enumerate(boxes):
        p, g = _box_crop(pred, t, box, SSIM_WINDOW), _box_crop(target, t, box, SSIM_WINDOW)
        psnrs.append(peak_signal_noise_ratio(p, g, data_range=1.0).item())
        ssims.append(structural_similarity_index_measure(p, g, data_range=1.0).item())
    return np.asarray(psnrs), np.asarray(ssims)


# ---------------------------------------------------------------------------------------------
# Control fidelity


@dataclass(frozen=True)
class Poses:
    """A pose sequence, normalised to the image: body (F, 18, 2) and body_scores (F, 18)."""

    body: np.ndarray
    body_scores: np.ndarray

    @classmethod
    def from_arrays(cls, arrays: dict) -> Poses:
        """From `cnx.pose.load_keypoints`' dict (or any dict with `body` and `body_scores`)."""
        return cls(np.asarray(arrays["body"], np.float64), np.asarray(arrays["body_scores"], np.float64))

    def __len__(self) -> int:
        return len(self.body)

    def take(self, indices: Sequence[int]) -> Poses:
        return Poses(self.body[list(indices)], self.body_scores[list(indices)])


def _limb_points(body: np.ndarray) -> np.ndarray:
    """(L, K, 2) normalised points along each limb of one body (18, 2)."""
    fractions = np.linspace(0.1, 0.9, LIMB_SAMPLES)[None, :, None]  # (1, K, 1)
    a = body[[i for i, _ in BODY_LIMBS]][:, None]  # (L, 1, 2)
    b = body[[j for _, j in BODY_LIMBS]][:, None]
    return a + fractions * (b - a)


def _visible_limbs(scores: np.ndarray) -> np.ndarray:
    """(L,) bool: limbs whose two keypoints are confident."""
    return np.array(
        [scores[i] >= KEYPOINT_THRESHOLD and scores[j] >= KEYPOINT_THRESHOLD for i, j in BODY_LIMBS]
    )


def _sample(video: torch.Tensor, points: np.ndarray) -> torch.Tensor:
    """Bilinear colours (F, 3, N) of (F, 3, H, W) frames at normalised points (F, N, 2)."""
    grid = torch.tensor(np.asarray(points), dtype=torch.float32) * 2 - 1  # grid_sample's [-1, 1]
    return F.grid_sample(video, grid[:, None], mode="bilinear", padding_mode="border", align_corners=False)[
        :, :, 0
    ]


class AppearanceScorer:
    """Disagreement of frames with poses by colour along limbs, for videos whose poses are known.

    For frame t and pose u: the colours along each limb of pose u in frame t,
    against the colours along the same limb of `reference_poses` in the reference
    image (mean absolute difference over limbs visible in both, in [0, 1] units).
    """

    def __init__(self, reference_image, reference_body, reference_scores):
        self.reference = as_video(np.asarray(reference_image)[None])  # (1, 3, H, W)
        self.reference_scores = np.asarray(reference_scores, np.float64)
        points = _limb_points(np.asarray(reference_body, np.float64))  # (L, K, 2)
        self.reference_colours = _sample(self.reference, points.reshape(1, -1, 2))[0]  # (3, L*K)

    def __call__(self, frames, poses: Poses) -> np.ndarray:
        video = as_video(frames)  # (F, 3, H, W)
        num_frames, num_poses = len(video), len(poses)
        limbs = len(BODY_LIMBS)
        matrix = np.zeros((num_frames, num_poses))
        for u in range(num_poses):
            visible = _visible_limbs(poses.body_scores[u]) & _visible_limbs(self.reference_scores)  # (L,)
            if not visible.any():
                raise ValueError(f"pose {u} shares no confident limb with the reference pose")
            points = np.broadcast_to(
                _limb_points(poses.body[u]).reshape(1, -1, 2), (num_frames, limbs * LIMB_SAMPLES, 2)
            )
            colours = _sample(video, points)  # (F, 3, L*K)
            error = (colours - self.reference_colours[None]).abs().mean(1)  # (F, L*K)
            per_limb = error.reshape(num_frames, limbs, LIMB_SAMPLES).mean(2)  # (F, L)
            matrix[:, u] = per_limb[:, torch.from_numpy(visible)].mean(1).numpy()
        return matrix


# A joint is correct (PCK) within this fraction of the person's height of where the driving pose puts it.
PCK_ALPHA = 0.1


def person_heights(body, body_scores, height: int) -> np.ndarray:
    """(...) heights in pixels of poses (..., 18, 2): the vertical extent of their confident keypoints.

    Vertical, because a person's height hardly changes as they turn or spread their arms while the
    width does; in pixels, so that distances along x and y count alike in a non-square frame. At
    least one pixel; a pose with no confident keypoint has no height (NaN).
    """
    confident = np.asarray(body_scores) >= KEYPOINT_THRESHOLD
    ys = np.where(confident, np.asarray(body)[..., 1] * height, np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: poses with nothing confident
        extent = np.nanmax(ys, axis=-1) - np.nanmin(ys, axis=-1)
    return np.maximum(extent, 1.0)


def keypoint_distances(found_body, found_scores, body, body_scores, height: int, width: int) -> np.ndarray:
    """(..., 18) distance of each found keypoint from the driving pose's, in the driving person's heights.

    Found and driving poses (..., 18, 2) normalised, scores (..., 18), broadcast against each other.
    NaN where the driving keypoint is not confident (nothing to score), inf where it is but the
    detector did not find it confidently (a miss).
    """
    found_body, body = np.asarray(found_body, np.float64), np.asarray(body, np.float64)
    scale = np.array([width, height], np.float64)
    gap = np.linalg.norm((found_body - body) * scale, axis=-1)  # (..., 18) pixels
    distances = gap / person_heights(body, body_scores, height)[..., None]
    distances = np.where(np.asarray(found_scores) >= KEYPOINT_THRESHOLD, distances, np.inf)
    return np.where(np.asarray(body_scores) >= KEYPOINT_THRESHOLD, distances, np.nan)


def pck_and_joint_error(distances, alpha: float = PCK_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """(...) PCK and (...) mean joint error of `keypoint_distances`' (..., 18).

    PCK: the fraction of the driving pose's confident keypoints found within `alpha` of it (a miss
    is wrong, so a frame with no person scores 0; NaN for a driving pose with no confident
    keypoint). Joint error: the mean distance over the keypoints found in both, NaN where there
    is none.
    """
    distances = np.asarray(distances, np.float64)
    scored = (~np.isnan(distances)).sum(axis=-1)
    correct = (distances <= alpha).sum(axis=-1)
    pck = np.divide(correct, scored, out=np.full(scored.shape, np.nan), where=scored > 0)
    found = np.isfinite(distances)
    count = found.sum(axis=-1)
    total = np.where(found, distances, 0.0).sum(axis=-1)
    error = np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)
    return pck, error


def pose_error_of(found: Poses, driving: Poses, height: int, width: int, alpha: float = PCK_ALPHA) -> dict:
    """{"pck", "joint_error", "detected"}: detected poses against driving poses, frame t against pose t.

    Means over frames of each frame's PCK and joint error (`pck_and_joint_error`; frames where no
    keypoint is found in both are left out of the joint error, which is NaN if that is every
    frame) and the fraction of frames where the detector found a person (a confident keypoint).
    Frames whose driving pose has no confident keypoint are left out of PCK and joint error.
    """
    if len(found) != len(driving):
        raise ValueError(f"{len(found)} frames of detected poses for {len(driving)} driving poses")
    distances = keypoint_distances(
        found.body, found.body_scores, driving.body, driving.body_scores, height, width
    )
    pck, error = pck_and_joint_error(distances, alpha)
    if np.isnan(pck).all():
        raise ValueError("no driving pose has a confident keypoint: there is nothing to score the video by")
    found_any = np.isfinite(error)
    return {
        "pck": float(np.nanmean(pck)),
        "joint_error": float(error[found_any].mean()) if found_any.any() else float("nan"),
        "detected": float((found.body_scores >= KEYPOINT_THRESHOLD).any(axis=1).mean()),
    }


def detect_poses(frames, detector: Callable) -> Poses:
    """The bodies `detector` (a `cnx.pose.PoseDetector`) finds in each frame of one video.

    A detector that tracks from frame to frame (`reset()`, as `cnx.mediapipe_pose`'s) is reset
    first, so that nothing of an earlier video carries over.
    """
    video = (as_video(frames).permute(0, 2, 3, 1) * 255).round().byte().numpy()  # (F, H, W, 3) uint8
    if hasattr(detector, "reset"):
        detector.reset()
    bodies, scores = [], []
    for frame in video:
        body, body_scores, *_ = detector(frame)
        bodies.append(np.asarray(body, np.float64))
        scores.append(np.asarray(body_scores, np.float64))
    return Poses(np.stack(bodies), np.stack(scores))


def pose_error(frames, poses: Poses, detector: Callable, alpha: float = PCK_ALPHA) -> dict:
    """{"pck", "joint_error", "detected"} of a video against its driving poses (`pose_error_of`)."""
    height, width = as_video(frames).shape[-2:]
    return pose_error_of(detect_poses(frames, detector), poses, height, width, alpha)


class DetectorScorer:
    """Disagreement of frames with poses by detected keypoints, for real data.

    `detector(frame (H, W, 3) uint8) -> (body (18, 2), body_scores (18,), hands, hand_scores, box)`
    (`cnx.pose.PoseDetector`). For frame t and pose u: the mean distance between keypoints
    confident in both, in units of pose u's height (`person_heights`); a frame where no common
    keypoint is found scores 1. The detector runs once per video: the last video's poses are kept,
    so `control_fidelity` and `pose_error` on the same frames share them.
    """

    def __init__(self, detector: Callable):
        self.detector = detector
        self._last: tuple[torch.Tensor, Poses] | None = None

    def detect(self, frames) -> Poses:
        video = as_video(frames)
        if self._last is None or not torch.equal(self._last[0], video):
            self._last = (video, detect_poses(frames, self.detector))
        return self._last[1]

    def __call__(self, frames, poses: Poses) -> np.ndarray:
        found = self.detect(frames)
        height, width = as_video(frames).shape[-2:]
        distances = keypoint_distances(  # (F, U, 18): every frame against every pose
            found.body[:, None],
            found.body_scores[:, None],
            poses.body[None],
            poses.body_scores[None],
            height,
            width,
        )
        found_both = np.isfinite(distances)
        count = found_both.sum(axis=-1)
        total = np.where(found_both, distances, 0.0).sum(axis=-1)
        return np.divide(total, count, out=np.ones(total.shape), where=count > 0)

    def pose_error(self, frames, poses: Poses, alpha: float = PCK_ALPHA) -> dict:
        """`pose_error` with this scorer's detections."""
        height, width = as_video(frames).shape[-2:]
        return pose_error_of(self.detect(frames), poses, height, width, alpha)


def pose_disagreement(frames, poses: Poses, scorer: Callable) -> np.ndarray:
    """(F, U) matrix S[t, u]: how badly generated frame t shows driving pose u (lower is better)."""
    matrix = np.asarray(scorer(frames, poses), dtype=np.float64)
    if matrix.shape != (len(as_video(frames)), len(poses)):
        raise ValueError(f"the scorer returned a {matrix.shape} matrix for {len(poses)} poses")
    return matrix


def control_fidelity(frames, poses: Poses, scorer: Callable) -> dict[str, float]:
    """{"timed", "untimed", "score", "contrast"}: see the module docstring.

    Lower is better and 0 is perfect for the first three; higher is better for the contrast,
    which is 0 for a single frame (there is no other pose to compare with).
    """
    matrix = pose_disagreement(frames, poses, scorer)
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{matrix.shape[0]} frames for {matrix.shape[1]} driving poses")
    own = np.diag(matrix)  # (F,)
    others = (matrix.sum(axis=1) - own) / max(len(matrix) - 1, 1)  # (F,) mean over the other poses
    timed = float(own.mean())
    untimed = float(matrix.min(axis=0).mean())
    contrast = float((others - own).mean()) if len(matrix) > 1 else 0.0
    return {"timed": timed, "untimed": untimed, "score": (timed + untimed) / 2, "contrast": contrast}


# ---------------------------------------------------------------------------------------------
# Everything at once


def pose_metrics(frames, poses: Poses, detector: Callable, alpha: float = PCK_ALPHA) -> dict[str, float]:
    """{"pose_pck", "pose_joint_error", "pose_detected", "pose_contrast"}: a detector's view of a video.

    `pose_error`'s three figures and the contrast of `control_fidelity` with a `DetectorScorer`
    (0 for a still video, however close its one pose is to the driving ones), detecting once.
    """
    scorer = DetectorScorer(detector)
    figures = {f"pose_{k}": v for k, v in scorer.pose_error(frames, poses, alpha).items()}
    return figures | {"pose_contrast": control_fidelity(frames, poses, scorer)["contrast"]}


def video_metrics(
    pred,
    target,
    boxes=None,
    poses: Poses | None = None,
    scorer: Callable | None = None,
    detector: Callable | None = None,
) -> dict:
    """Means over frames of every metric that the inputs allow, as a flat dict of floats.

    `scorer` fills the control fidelity (`control_*`), `detector` the detected pose's figures
    (`pose_metrics`), both against `poses`.
    """
    result = {
        "psnr": float(psnr(pred, target).mean()),
        "ssim": float(ssim(pred, target).mean()),
        "l1": float(l1(pred, target).mean()),
    }
    if len(as_video(pred)) > 1:
        result["temporal_error"] = temporal_error(pred, target)
    if boxes is not None:
        box_psnr, box_ssim = psnr_ssim_in_boxes(pred, target, boxes)
        result |= {"psnr_person": float(box_psnr.mean()), "ssim_person": float(box_ssim.mean())}
    if poses is not None and scorer is not None:
        result |= {f"control_{k}": v for k, v in control_fidelity(pred, poses, scorer).items()}
    if poses is not None and detector is not None:
        result |= pose_metrics(pred, poses, detector)
    return result
