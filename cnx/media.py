"""Images, frame folders and videos in and out: what generating, validating and training read and write.

Reading refuses bad input with an `InputError` that names the file, before any
model loads. Writing gives a generated video as `video.mp4`, `video.gif` and
`grid.png`: rows of frames (ground truth, poses, generated) at the video's own
aspect ratio.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GRID_COLUMNS = 16  # at most this many frames per grid row, evenly spread over the video


class InputError(ValueError):
    """Bad command-line input, found before any model loads; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Reading inputs


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file; InputError naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image does not exist")
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"{path}: cannot read image: {err}") from err


def numbered_images(folder: str | Path) -> list[Path]:
    """A folder's images in numeric order (0.png, 1.png, ..., 10.png), as the original layout names them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: folder does not exist")
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]

    def key(path: Path):
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem)]

    return sorted(files, key=key)


def read_frames_input(path: str | Path, what: str, max_frames: int | None = None):
    """Frames from a video file, a folder of numbered images, or (for poses) a keypoint track `.npz`.

    Returns an (F, H, W, 3) uint8 array, or the track's dict for an `.npz`.
    """
    from cnx.video import VideoReadError, read_frames

    path = Path(path)
    if path.suffix.lower() == ".npz":
        from cnx.pose import load_keypoints

        if not path.is_file():
            raise InputError(f"{path}: {what} keypoints file does not exist")
        track = load_keypoints(path)
        if max_frames:
            track = {k: v[:max_frames] if k not in ("size", "fps") else v for k, v in track.items()}
        if len(track["body"]) == 0:
            raise InputError(f"{path}: no {what} frames")
        return track
    if path.is_dir():
        files = numbered_images(path)[:max_frames]
        if not files:
            raise InputError(f"{path}: no {what} images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        frames = [read_image(f) for f in files]
        sizes = {f.shape for f in frames}
        if len(sizes) > 1:
            raise InputError(f"{path}: {what} images differ in size: {sorted(sizes)}")
        return np.stack(frames)
    if not path.is_file():
        raise InputError(f"{path}: {what} video or folder does not exist")
    try:
        frames = read_frames(path)
    except VideoReadError as err:
        raise InputError(f"{what}: {err}") from err
    if len(frames) == 0:
        raise InputError(f"{path}: no {what} frames")
    return frames[:max_frames]


def output_size(reference: np.ndarray, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width): as given (multiples of 8 required), else the reference's size rounded down to 8."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value < 8 or value % 8):
            raise InputError(f"--{name} must be a positive multiple of 8, got {value}")
    return height or reference.shape[0] // 8 * 8, width or reference.shape[1] // 8 * 8


def fit(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(F, h, w, 3) uint8 cropped and resized to (F, height, width, 3) as the pipeline does."""
    from cnx.pipeline import fit_frames

    return fit_frames(frames, height, width).permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------
# Writing


def frame_grid(rows: list[np.ndarray], columns: int = GRID_COLUMNS, gap: int = 2) -> np.ndarray:
    """One image of rows of frames (each (F, H, W, 3) uint8, same size), `columns` frames spread evenly.

    Frames keep their size and so their aspect ratio (the original code squashed
    them into a square grid, pitfall 20 in docs/pitfalls.md).
    """
    num_frames, height, width = rows[0].shape[:3]
    picks = np.unique(np.linspace(0, num_frames - 1, min(columns, num_frames)).round().astype(int))
    grid = np.full(
        (len(rows) * (height + gap) - gap, len(picks) * (width + gap) - gap, 3), 255, dtype=np.uint8
    )
    for r, frames in enumerate(rows):
        if frames.shape[1:] != (height, width, 3):
            raise ValueError(
                f"grid row {r} has frames {frames.shape[1:]}, the first row {(height, width, 3)}"
            )
        for c, t in enumerate(picks):
            top, left = r * (height + gap), c * (width + gap)
            grid[top : top + height, left : left + width] = frames[t]
    return grid


def write_outputs(
    out_dir: str | Path, frames: np.ndarray, fps: float, rows: list[np.ndarray]
) -> dict[str, Path]:
    """video.mp4, video.gif and grid.png of (F, H, W, 3) uint8 generated frames; `rows` go above them."""
    from PIL import Image

    from cnx.video import write_video

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"mp4": out_dir / "video.mp4", "gif": out_dir / "video.gif", "grid": out_dir / "grid.png"}
    even = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]  # H.264 needs even sizes
    if even.shape[2] >= 64:
        write_video(paths["mp4"], even, fps=fps)
    else:  # decord cannot read back narrower videos; scale up for the mp4 only
        scale = -(-64 // even.shape[2])
        write_video(paths["mp4"], even.repeat(scale, axis=1).repeat(scale, axis=2), fps=fps)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(paths["gif"], save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    Image.fromarray(frame_grid([*rows, frames])).save(paths["grid"])
    return paths


def to_uint8(frames) -> np.ndarray:
    """(F, H, W, 3) float in [0, 1] (the pipeline's "np" output for one video) -> uint8."""
    return (np.clip(np.asarray(frames), 0.0, 1.0) * 255).round().astype(np.uint8)
