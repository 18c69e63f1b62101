"""Tiny videos and meta_info files for the dataset tests (written with cnx.video.write_video).

Every frame of an "index" video is a flat grey whose level encodes the frame
number, so a test can read back which source frame a sample returned.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cnx.video import write_video

LEVEL0, LEVEL_STEP = 5, 6  # frame i is grey level 5 + 6 * i (up to 41 frames)


def index_frames(num_frames: int, width: int = 64, height: int = 96) -> list[np.ndarray]:
    """Flat frames whose grey level encodes their index (modulo 42: decode only in shorter videos)."""
    return [np.full((height, width, 3), LEVEL0 + LEVEL_STEP * (i % 42), np.uint8) for i in range(num_frames)]


def decode_index(values: np.ndarray, scale: float = 1.0) -> int:
    """Frame index of a (C, H, W) image in [0, 1] (scale 1) or of uint8 levels (scale 255)."""
    level = float(np.median(np.asarray(values, dtype=np.float64))) * 255.0 / scale
    return int(round((level - LEVEL0) / LEVEL_STEP))


def detections_json(num_frames: int, hands: list[tuple[list, float]] | None = None) -> list[dict]:
    """Per-frame detections in the original code's schema; `hands` = [(box [[x0,y0],[x1,y1]], mean score)]."""
    hands = hands or []
    return [
        {
            "boxes": [[[0.2, 0.1], [0.8, 1.05]]],  # person boxes may overhang the frame, as originally
            "hands_boxes": [box for box, _ in hands],
            "hands_score": [[score] * 21 for _, score in hands],
        }
        for _ in range(num_frames)
    ]


def write_entry(
    folder: Path,
    name: str,
    num_frames: int = 30,
    pose_frames: int | None = None,
    size: tuple[int, int] = (64, 96),
    pose_size: tuple[int, int] | None = None,
    detections: list[dict] | None | bool = True,
    video: list[np.ndarray] | None = None,
    pose: list[np.ndarray] | None = None,
) -> dict:
    """Write one clip (RGB video, pose video, detection json) and return its meta_info entry."""
    folder = Path(folder)
    width, height = size
    pose_width, pose_height = pose_size or size
    write_video(folder / "videos" / f"{name}.mp4", video or index_frames(num_frames, width, height))
    pose_count = num_frames if pose_frames is None else pose_frames
    write_video(folder / "poses" / f"{name}.mp4", pose or index_frames(pose_count, pose_width, pose_height))
    entry = {"video_path": f"videos/{name}.mp4", "guide_path": f"poses/{name}.mp4"}
    if detections is not False and detections is not None:
        if detections is True:
            detections = detections_json(num_frames)
        (folder / "meta").mkdir(parents=True, exist_ok=True)
        (folder / "meta" / f"{name}.json").write_text(json.dumps(detections))
        entry["meta_info"] = f"meta/{name}.json"
    return entry


def write_meta_info(folder: Path, entries: list[dict]) -> Path:
    path = Path(folder) / "meta_info.json"
    path.write_text(json.dumps(entries, indent=2))
    return path


def write_dataset(folder: Path, num_entries: int = 2, num_frames: int = 30, **kwargs) -> Path:
    """A small dataset of index videos; returns the meta_info.json path."""
    entries = [write_entry(folder, f"clip{i}", num_frames=num_frames, **kwargs) for i in range(num_entries)]
    return write_meta_info(folder, entries)


def corrupt_middle(path: Path) -> None:
    """Zero the middle half of a video file: the container opens, decoding fails."""
    data = bytearray(Path(path).read_bytes())
    quarter = len(data) // 4
    data[quarter : 3 * quarter] = bytes(2 * quarter)
    Path(path).write_bytes(bytes(data))


def noise_frames(num_frames: int, width: int = 64, height: int = 96, seed: int = 0) -> list[np.ndarray]:
    """Random frames: nearly incompressible, so most of the file is frame data."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(num_frames)]
