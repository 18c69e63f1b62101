"""Reading and writing videos: decord in, PyAV (libx264) out, RGB everywhere.

Both libraries hand frames over as RGB, so no channel swap happens anywhere in
cnx (the original training code's BGR->RGB swap after decord coloured poses
wrongly, pitfall 15 in docs/pitfalls.md). This is the only module that knows
about decord and PyAV; both are imported on first use, and their errors leave
it as `VideoReadError`, which names the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np


class VideoReadError(RuntimeError):
    """A video that cannot be opened or decoded; the message starts with the file's path."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    width: int
    height: int


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What decord raises: RuntimeError for unreadable files, its DECORDError (not a RuntimeError) for
    corrupt streams. Catching exactly these keeps bugs in cnx itself loud."""
    from decord._ffi.base import DECORDError

    return (RuntimeError, DECORDError)


def frame_rate(fps: float) -> int | Fraction:
    """An exact frame rate for the encoder (PyAV rejects plain floats): 8.0 -> 8, 29.97 -> 30000/1001."""
    rate = Fraction(fps).limit_denominator(1001)
    return int(rate) if rate.denominator == 1 else rate


def write_video(
    path: str | Path, frames: Iterable[np.ndarray], fps: float = 8, crf: int = 18, deterministic: bool = True
) -> Path:
    """Write uint8 RGB frames (H, W, 3) to an H.264 mp4.

    `deterministic` (the default) gives byte-identical files for the same frames;
    off, x264 uses its usual settings, as typical footage is encoded.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = None
        for frame in frames:
            frame = np.ascontiguousarray(frame, dtype=np.uint8)
            if stream is None:
                h, w = frame.shape[:2]
                if h % 2 or w % 2 or w < 64:
                    # Odd sizes break yuv420p; decord cannot read back widths under 64.
                    raise ValueError(f"{path}: frames must have even sizes and width >= 64, got {w}x{h}")
                stream = container.add_stream("libx264", rate=frame_rate(fps))
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                stream.options = {"crf": str(crf), "preset": "medium"}
                if deterministic:
                    # One thread, and x264's macroblock-tree rate control off (it is not deterministic on
                    # small frames), keep the file byte-identical across runs, at some cost in bitrate.
                    stream.options |= {"threads": "1", "x264-params": "mbtree=0"}
                    stream.thread_count = 1
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        if stream is None:
            raise ValueError(f"{path}: no frames to write")
        container.mux(stream.encode())
    return path


def open_video(path: str | Path, size: tuple[int, int] | None = None):
    """A decord VideoReader on the CPU (RGB frames), scaling frames to `size` (width, height) if given.

    The scaling happens inside the decoder while it converts YUV to RGB, so no
    full-resolution RGB frame is ever made. decord cannot return frames narrower than 64.
    """
    import decord

    width, height = size or (-1, -1)
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1, width=width, height=height)
    except _decode_errors() as err:
        raise VideoReadError(f"{path}: cannot open video: {err}") from err


def read_frames(path_or_reader, indices: Sequence[int] | None = None) -> np.ndarray:
    """Frames (F, H, W, 3) uint8 RGB with one decord `get_batch` call.

    Given a reader rather than a path, a VideoReadError cannot name the file: the caller adds it.
    """
    is_path = isinstance(path_or_reader, (str, Path))
    reader = open_video(path_or_reader) if is_path else path_or_reader
    indices = list(range(len(reader)) if indices is None else indices)
    try:
        return reader.get_batch(indices).asnumpy()
    except _decode_errors() as err:
        where = f"{path_or_reader}: " if is_path else ""
        raise VideoReadError(f"{where}cannot decode frames {indices}: {err}") from err


def container_info(path: str | Path) -> VideoInfo:
    """Frame count and size from the container's metadata (cheap: nothing is decoded).

    Falls back to decord's frame index for containers that do not store a count.
    """
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path}: no video stream")
            stream = container.streams.video[0]
            num_frames, width, height = stream.frames, stream.codec_context.width, stream.codec_context.height
    except av.FFmpegError as err:
        raise VideoReadError(f"{path}: cannot open video: {err}") from err
    if num_frames <= 0:
        num_frames = len(open_video(path))
    return VideoInfo(num_frames=int(num_frames), width=int(width), height=int(height))


def decode_info(path: str | Path) -> VideoInfo:
    """Frame count and size as decord sees them, after decoding the first and last frame."""
    reader = open_video(path)
    if len(reader) == 0:
        raise VideoReadError(f"{path}: video has no frames")
    try:
        frames = read_frames(reader, [0, len(reader) - 1])  # (2, H, W, 3)
    except VideoReadError as err:
        raise VideoReadError(f"{path}: cannot decode video: {err}") from err
    return VideoInfo(num_frames=len(reader), width=frames.shape[2], height=frames.shape[1])
