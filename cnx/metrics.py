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
  `PoseDetector` interface (the DWPose adapter, `cnx.pose.load_dwpose_detector`)
  finds the generated person's keypoints; S is their distance to the driving
  keypoints in units of the driving person's height.

FID and FVD need Inception / I3D weights that cannot be downloaded here, so
they are not computed. To add them, install `torchmetrics[image]` with
`torch-fidelity`, put the weights on disk and build
`torchmetrics.image.fid.FrechetInceptionDistance(feature=2048)` with
`feature_extractor_weights_path=<local .pth>`; feed it generated and ground-truth
frames as uint8 (N, 3, H, W). FVD needs an I3D network loaded the same way.
"""

from __future__ import annotations

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


class DetectorScorer:
    """Disagreement of frames with poses by detected keypoints, for real data.

    `detector(frame (H, W, 3) uint8) -> (body (18, 2), body_scores (18,), hands, hand_scores, box)`
    (`cnx.pose.PoseDetector`). For frame t and pose u: the mean distance between
    keypoints confident in both, in units of pose u's height (its confident
    keypoints' vertical extent); a frame where no common keypoint is found scores 1.
    """

    def __init__(self, detector: Callable):
        self.detector = detector

    def detect(self, frames) -> Poses:
        video = (as_video(frames).permute(0, 2, 3, 1) * 255).round().byte().numpy()  # (F, H, W, 3) uint8
        bodies, scores = [], []
        for frame in video:
            body, body_scores, *_ = self.detector(frame)
            bodies.append(np.asarray(body, np.float64))
            scores.append(np.asarray(body_scores, np.float64))
        return Poses(np.stack(bodies), np.stack(scores))

    def __call__(self, frames, poses: Poses) -> np.ndarray:
        found = self.detect(frames)
        width, height = as_video(frames).shape[-1], as_video(frames).shape[-2]
        scale = np.array([width, height], np.float64)
        matrix = np.ones((len(found), len(poses)))
        for u in range(len(poses)):
            confident_u = poses.body_scores[u] >= KEYPOINT_THRESHOLD
            ys = poses.body[u, confident_u, 1] * height
            size = max(float(ys.max() - ys.min()), 1.0) if len(ys) else 1.0
            for t in range(len(found)):
                common = confident_u & (found.body_scores[t] >= KEYPOINT_THRESHOLD)
                if common.any():
                    gap = (found.body[t, common] - poses.body[u, common]) * scale
                    matrix[t, u] = float(np.linalg.norm(gap, axis=1).mean()) / size
        return matrix


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


def video_metrics(
    pred, target, boxes=None, poses: Poses | None = None, scorer: Callable | None = None
) -> dict:
    """Means over frames of every metric that the inputs allow, as a flat dict of floats."""
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
    return result
