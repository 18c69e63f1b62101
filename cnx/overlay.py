"""Pose skeletons drawn over video frames, so a reader sees at a glance whether a dancer follows them."""

from __future__ import annotations

import numpy as np


def overlay_pose(frames: np.ndarray, poses: np.ndarray, alpha: float = 0.7, threshold: int = 40):
    """(F, H, W, 3) uint8 frames with the skeleton of (F, H, W, 3) uint8 pose frames blended on top.

    A pose frame is a skeleton drawn on black: its pixels brighter than `threshold` (in any channel)
    are the skeleton, mixed in with weight `alpha`; every other pixel keeps the frame's own colour.
    """
    frames, poses = np.asarray(frames), np.asarray(poses)
    if frames.shape != poses.shape:
        raise ValueError(f"frames {frames.shape} and poses {poses.shape} differ in shape")
    skeleton = poses.max(axis=-1, keepdims=True) > threshold  # (F, H, W, 1)
    mixed = (1 - alpha) * frames.astype(np.float32) + alpha * poses.astype(np.float32)
    return np.where(skeleton, mixed.round(), frames).astype(np.uint8)
