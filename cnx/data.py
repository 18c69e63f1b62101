"""Training clips from a meta_info.json: frame sampling, crop geometry, hand weights, the Dataset.

The pieces are pure functions (frame indices, crop window, hand weights, reference
augmentation) so a notebook can call and plot each one; `ClipDataset` composes them.

Randomness. Every random choice of a sample comes from its own `torch.Generator`
seeded by `sample_generator(seed, epoch, index)`: a hash of the three numbers, so
the sample does not depend on which DataLoader worker or which rank draws it,
on the order samples are drawn, or on any global RNG. The index is the global
position in meta_info.json (a DistributedSampler hands out global indices), so
the rank is not needed. The dataset never shuffles; shuffling is the sampler's
job, seeded like everything else.

Failures. A sample whose files cannot be read raises `SampleError` naming the
entry and the file; nothing is retried with another video. A training loop
counts them with a `FailureBudget` (see `iterate_with_budget`), which stops
the run with the full list once more than `max_failure_fraction` of the samples
seen have failed.

Pitfall numbers refer to docs/pitfalls.md.
"""

from __future__ import annotations

import functools
import logging
import math
import traceback
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from cnx import video
from cnx.checks import aspect_problem, check_meta_info, clip_span, fitted_interval, length_problem
from cnx.meta import HAND_THRESHOLD, FrameDetections, MetaEntry, MetaInfoError, Problem, read_detections
from cnx.seeding import stream_generator

logger = logging.getLogger(__name__)

RANDOM_INTERVAL = (2, 7)  # spacing drawn per sample (inclusive) when interval_frame <= 0, as originally
HAND_WEIGHT = 1 + 4 * 0.8  # loss weight inside confident hand boxes (1 elsewhere)
HAND_MARGIN_PX = 10  # hand boxes grow by this many pixels of the source video on each side


# ---------------------------------------------------------------------------------------------
# Randomness


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator for one sample: the ("data", seed, epoch, index) stream of `cnx.seeding`."""
    return stream_generator("data", seed, epoch, index)


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high], both inclusive."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator).item())


# ---------------------------------------------------------------------------------------------
# Which frames


def sample_frame_indices(
    video_length: int, sample_n_frames: int, interval_frame: int, generator: torch.Generator
) -> tuple[np.ndarray, int]:
    """Indices (F,) of one clip and the spacing used, with the original code's semantics.

    Frames are `interval_frame` apart (<= 0: a spacing drawn uniformly from
    [2, 7] for this sample); the spacing shrinks when the video is too short for
    it; the start is uniform over every position where the clip fits.
    Draws: the spacing (only when interval_frame <= 0), then the start.
    """
    if video_length < sample_n_frames:
        raise ValueError(f"a {video_length}-frame video is too short for a {sample_n_frames}-frame clip")
    interval = interval_frame if interval_frame > 0 else _randint(generator, *RANDOM_INTERVAL)
    interval = fitted_interval(video_length, sample_n_frames, interval)
    span = clip_span(sample_n_frames, interval)
    start = _randint(generator, 0, video_length - span)
    return start + interval * np.arange(sample_n_frames), interval


def sample_reference_index(video_length: int, generator: torch.Generator) -> int:
    """The reference frame: uniform over the whole video, not just the clip."""
    return _randint(generator, 0, video_length - 1)


@dataclass(frozen=True)
class ClipIndices:
    """Which frames one sample reads."""

    clip_indices: np.ndarray  # (F,) the sampled clip
    reference_index: int
    interval: int  # spacing used after fitting to the video
    frame_indices: np.ndarray  # (F,) what the sample returns: [reference, clip[1], ..., clip[F-1]]


def sample_clip(
    video_length: int, sample_n_frames: int, interval_frame: int, generator: torch.Generator
) -> ClipIndices:
    """Clip frames plus a reference frame, which replaces the clip's frame 0.

    Why replace frame 0: SVD is an image-to-video model whose first output frame
    reproduces its conditioning image, and at inference the reference image and
    its pose come first. Training with the reference (and its pose) as frame 0
    is the same arrangement. Drawing the reference from the whole video, not
    from next to the clip, makes the model carry appearance across large pose
    changes instead of copying a neighbouring frame.
    """
    clip, interval = sample_frame_indices(video_length, sample_n_frames, interval_frame, generator)
    reference = sample_reference_index(video_length, generator)
    frames = clip.copy()
    frames[0] = reference
    return ClipIndices(clip_indices=clip, reference_index=reference, interval=interval, frame_indices=frames)


# ---------------------------------------------------------------------------------------------
# Geometry


class CropBox(NamedTuple):
    """A crop window in normalised coordinates (fractions of the frame's width and height)."""

    x0: float
    y0: float
    x1: float
    y1: float

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The window in whole pixels of a `width` x `height` frame: (left, top, right, bottom)."""
        left, right = round(self.x0 * width), round(self.x1 * width)
        top, bottom = round(self.y0 * height), round(self.y1 * height)
        return left, top, max(right, left + 1), max(bottom, top + 1)


def crop_window(src_width: int, src_height: int, width: int, height: int, offset: float = 0.5) -> CropBox:
    """The largest window of the source with the output's aspect ratio, in normalised coordinates.

    `offset` in [0, 1] places it along the axis that is cropped (0.5: centred).
    Normalised, so the same window cuts the same content out of the pose video
    and the hand weights whatever their resolution (the original code applied a pixel window
    computed from the RGB size to the pose video too).
    """
    if not 0.0 <= offset <= 1.0:
        raise ValueError(f"crop offset must be in [0, 1], got {offset}")
    src_aspect, aspect = src_width / src_height, width / height
    if src_aspect > aspect:  # source is wider: crop left/right
        w = aspect / src_aspect
        x0 = offset * (1.0 - w)
        return CropBox(x0, 0.0, x0 + w, 1.0)
    h = src_aspect / aspect  # source is taller (or equal): crop top/bottom
    y0 = offset * (1.0 - h)
    return CropBox(0.0, y0, 1.0, y0 + h)


MIN_DECODE_WIDTH = 64  # decord cannot hand back frames narrower than this


def decode_size(
    src_width: int, src_height: int, box: CropBox, width: int, height: int
) -> tuple[int, int] | None:
    """(width, height) to decode a source at so `box` still covers at least width x height pixels.

    None keeps the source size (no downscaling to gain). Decoding straight to
    this size skips making and resizing full-resolution RGB frames: at 1080p it
    cuts about a third of a clip's read time, and the final antialiased resize
    becomes a small one. Sizes are even and never below MIN_DECODE_WIDTH wide.
    """
    crop_width, crop_height = (box.x1 - box.x0) * src_width, (box.y1 - box.y0) * src_height
    scale = max(width / crop_width, height / crop_height, MIN_DECODE_WIDTH / src_width)
    size = (2 * math.ceil(src_width * scale / 2), 2 * math.ceil(src_height * scale / 2))
    return None if size[0] >= src_width or size[1] >= src_height else size


def crop_resize(frames: np.ndarray | torch.Tensor, box: CropBox, width: int, height: int) -> torch.Tensor:
    """Crop (F, H, W, 3) uint8 frames to `box` and resize to (F, 3, height, width) uint8, antialiased.

    Resizing uint8 in channels-last layout uses torch's vectorised uint8 kernel,
    about 20x faster than float32 on one core at 1080p; the result differs from a
    float resize by under one grey level.
    """
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected (F, H, W, 3) uint8 frames, got {tuple(frames.shape)} {frames.dtype}")
    left, top, right, bottom = box.pixels(frames.shape[2], frames.shape[1])
    crop = frames[:, top:bottom, left:right].permute(0, 3, 1, 2)  # (F, 3, h, w), channels-last in memory
    out = F.interpolate(crop, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return out.contiguous()  # (F, 3, height, width)


def hand_weights(
    detections: Sequence[FrameDetections | None],
    box: CropBox,
    source_size: tuple[int, int],
    size: tuple[int, int],
    threshold: float = HAND_THRESHOLD,
    weight: float = HAND_WEIGHT,
    margin_px: float = HAND_MARGIN_PX,
) -> torch.Tensor:
    """Per-pixel loss weights (F, 1, H, W): `weight` inside confident hand boxes, 1 elsewhere.

    A hand is confident when its mean keypoint score exceeds `threshold`; its box
    grows by `margin_px` pixels of the source video (`source_size` = (width,
    height)) on each side. Overlapping boxes take the maximum, so an unconfident
    box never lowers a confident one (the original code assigned, so the box drawn last
    won). Computed at output pixel centres mapped back through the normalised
    crop `box`, so the weights line up with the cropped frames. A frame given as
    None gets all ones. `size` is the output (width, height).
    """
    width, height = size
    src_width, src_height = source_size
    margin_x, margin_y = margin_px / src_width, margin_px / src_height
    xs = box.x0 + (np.arange(width) + 0.5) / width * (box.x1 - box.x0)  # (W,) normalised source x
    ys = box.y0 + (np.arange(height) + 0.5) / height * (box.y1 - box.y0)  # (H,)
    weights = np.ones((len(detections), 1, height, width), dtype=np.float32)  # (F, 1, H, W)
    for t, frame in enumerate(detections):
        if frame is None:
            continue
        for ((bx0, by0), (bx1, by1)), confidence in zip(
            frame.hands_boxes, frame.hands_confidence, strict=True
        ):
            value = weight if confidence > threshold else 1.0  # an unconfident hand gets no extra weight
            inside_x = (xs >= bx0 - margin_x) & (xs <= bx1 + margin_x)
            inside_y = (ys >= by0 - margin_y) & (ys <= by1 + margin_y)
            region = inside_y[:, None] & inside_x[None, :]  # (H, W)
            weights[t, 0][region] = np.maximum(weights[t, 0][region], value)  # max, never assign: pitfall 17
    return torch.from_numpy(weights)


# ---------------------------------------------------------------------------------------------
# Reference augmentation


def augment_reference(
    image: torch.Tensor,
    generator: torch.Generator,
    scale: float = 0.1,
    shift: float = 0.05,
    brightness: float = 0.1,
    contrast: float = 0.1,
    saturation: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """A randomly zoomed, shifted and colour-jittered copy of a (3, H, W) image in [0, 1].

    Zoom by a factor in [1 - scale, 1 + scale], shift by up to `shift` of the
    frame in x and y (edges repeat), then multiply brightness, contrast and
    saturation by factors in [1 - c, 1 + c]. Used on the reference image only:
    the model then cannot solve frame 0 by copying the reference pixel for
    pixel and must learn appearance transfer that tolerates the small framing
    and colour differences between a user's reference photo and the video.
    Draws, in order: zoom, shift x, shift y, brightness, contrast, saturation.
    """
    params = {
        "zoom": _uniform(generator, 1 - scale, 1 + scale),
        "shift_x": _uniform(generator, -shift, shift),
        "shift_y": _uniform(generator, -shift, shift),
        "brightness": _uniform(generator, 1 - brightness, 1 + brightness),
        "contrast": _uniform(generator, 1 - contrast, 1 + contrast),
        "saturation": _uniform(generator, 1 - saturation, 1 + saturation),
    }
    zoom = params["zoom"]
    # Output point p samples the input at (p - t) / zoom; grid coordinates span [-1, 1], so t = 2 * shift.
    theta = torch.tensor(
        [[1 / zoom, 0.0, -2 * params["shift_x"] / zoom], [0.0, 1 / zoom, -2 * params["shift_y"] / zoom]],
        dtype=image.dtype,
    )
    grid = F.affine_grid(theta[None], [1, *image.shape], align_corners=False)
    out = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    out = out * params["brightness"]
    grey = (0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2])[None]  # (1, H, W) luma
    out = (out - grey.mean()) * params["contrast"] + grey.mean()
    grey = (0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2])[None]
    out = grey + (out - grey) * params["saturation"]
    return out.clamp(0, 1), params


# ---------------------------------------------------------------------------------------------
# Failures


class SampleError(RuntimeError):
    """One sample could not be read. The message names the entry, its file and the cause.

    Constructible from the message alone, so it crosses DataLoader worker
    processes with its type intact (torch re-raises `type(err)(message)`).
    """

    def __init__(self, message: str, index: int | None = None, path: str | None = None):
        super().__init__(message)
        self.index, self.path = index, path


class TooManyFailures(RuntimeError):
    """More samples failed than the budget allows; the message lists every failure."""


@dataclass
class FailureBudget:
    """Counts samples seen and failed; raises TooManyFailures past `max_fraction`.

    The fraction is taken over max(seen, min_samples), so a single early failure
    does not stop a run at sample 3, while a dataset whose files are broken
    stops within its first `min_samples` samples.
    """

    max_fraction: float = 0.01
    min_samples: int = 100
    seen: int = 0
    failures: list[str] = field(default_factory=list)

    def success(self, n: int = 1) -> None:
        self.seen += n

    def failure(self, error: BaseException | str, n: int = 1) -> None:
        """Log and count a failed sample (`n`: samples lost with it, e.g. the rest of its batch)."""
        self.seen += n
        # From a DataLoader worker the message is torch's traceback text; its last line is ours.
        lines = [line for line in str(error).splitlines() if line.strip()] or [repr(error)]
        message = lines[-1].removeprefix(f"{SampleError.__module__}.{SampleError.__name__}: ")
        self.failures.append(message)
        logger.warning("skipping a failed sample (%d/%d failed): %s", len(self.failures), self.seen, message)
        self.check()

    @property
    def allowed(self) -> float:
        return self.max_fraction * max(self.seen, self.min_samples)

    def check(self) -> None:
        if len(self.failures) > self.allowed:
            lines = "\n".join(f"  {m}" for m in self.failures)
            raise TooManyFailures(
                f"{len(self.failures)} of {self.seen} samples failed, more than "
                f"{self.max_fraction:.1%} (of at least {self.min_samples}); fix the data "
                f"(`cnx check-data`) and restart. Failures:\n{lines}"
            )


def iterate_with_budget(loader: Iterable, budget: FailureBudget, batch_size: int | None = None) -> Iterator:
    """Yield the loader's batches; a batch that raised SampleError is counted and skipped.

    Works with a DataLoader with or without workers: a failing sample fails its
    whole batch (`batch_size` samples are counted as seen with one failure).
    `batch_size` defaults to the loader's own (1 for a loader without one); a
    last, partial batch is counted as a full one.
    Only SampleError is caught; any other exception is a bug and propagates.
    """
    if batch_size is None:
        batch_size = getattr(loader, "batch_size", None) or 1
    iterator = iter(loader)
    while True:
        failure = None
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except SampleError as err:
            failure = str(err)
            # torch re-raises worker errors from a frame that references the error: a cycle that
            # keeps the loader's iterator, and its workers, alive until a garbage collection,
            # whose shutdown then waits 5 s per worker. Clearing the frames breaks the cycle.
            traceback.clear_frames(err.__traceback__)
        if failure is not None:
            budget.failure(failure, n=batch_size)
            continue
        budget.success(batch_size)
        yield batch


# ---------------------------------------------------------------------------------------------
# The dataset


@functools.lru_cache(maxsize=256)
def _detections(path: str, mtime_ns: int, size: int) -> tuple[FrameDetections, ...]:
    return tuple(read_detections(path))


@functools.lru_cache(maxsize=65536)
def _video_size(path: str, mtime_ns: int, size: int) -> tuple[int, int]:
    info = video.container_info(path)
    return info.width, info.height


def cached_video_size(path: str | Path) -> tuple[int, int]:
    """A video's (width, height) from its container header, cached per process like the detections."""
    try:
        stat = Path(path).stat()
    except FileNotFoundError:
        raise video.VideoReadError(f"{path}: cannot open video: the file does not exist") from None
    return _video_size(str(path), stat.st_mtime_ns, stat.st_size)


def cached_detections(path: str | Path) -> tuple[FrameDetections, ...]:
    """`read_detections`, cached per process and keyed by the file's mtime and size (an edit re-reads it).

    Parsing a few hundred frames of json costs milliseconds, a visible share of a
    small clip's time; each DataLoader worker keeps its own cache.
    """
    try:
        stat = Path(path).stat()
    except FileNotFoundError:
        raise MetaInfoError(f"{path}: detection json does not exist") from None
    return _detections(str(path), stat.st_mtime_ns, stat.st_size)


class DecodedVideos:
    """Whole videos decoded once and kept in host memory, up to `max_bytes`; then served from there.

    For small datasets read for many epochs (the tiny profile's eight dancers): opening and
    decoding two videos per sample costs more than the training step's data needs. A video that
    no longer fits is decoded per sample as usual, so a large dataset only fills the budget.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used = int(max_bytes), 0
        self.videos: dict[tuple, np.ndarray] = {}  # (path, decode size) -> (N, h, w, 3) uint8

    def get(self, key: tuple) -> np.ndarray | None:
        return self.videos.get(key)

    def room_for(self, frame_bytes: int, num_frames: int) -> bool:
        return self.used + frame_bytes * num_frames <= self.max_bytes

    def keep(self, key: tuple, frames: np.ndarray) -> None:
        self.videos[key] = frames
        self.used += frames.nbytes


class ClipDataset(torch.utils.data.Dataset):
    """Training clips for ControlNeXt-SVD from a meta_info.json (the original code's `--dataset_type ubc`).

    Each item is a dict:
      pixel_values    (F, 3, H, W) in [-1, 1]  RGB frames; frame 0 is the reference frame
      pose_frames     (F, 3, H, W) in [0, 1]   pose frames; frame 0 is the reference's pose
      reference_image (3, H, W) in [-1, 1]     the reference frame (augmented when ref_augment)
      hand_weights    (F, 1, H, W)             per-pixel loss weights, see `hand_weights`; frame 0 all ones
      frame_indices   (F,) source frames read; [0] is the reference
      reference_index, interval, crop_box (4,) normalised x0, y0, x1, y1, crop_offset, video_path,
      guide_path, index
    Without `pixel_frames` only the reference frame of the RGB video is read and pixel_values is left
    out: a latent cache (`cnx.latent_cache`) holds the clip's latents. `crop_offsets` snaps the random
    crop offset to the nearest of these (a latent cache's crop positions); None: any offset in [0, 1].

    `deterministic=True` (validation): the same clip for the same index in every
    epoch, centred crop. Otherwise call `set_epoch(epoch)` before each epoch (as
    with DistributedSampler) so epochs differ; with `persistent_workers=True`
    the workers keep the epoch they started with, so use `sample(index, epoch)`
    or leave persistent workers off.

    The cheap checks of `cnx check-data` run at construction (`check=True`) and
    raise DataCheckError with the same lines check-data prints: one per problem,
    then its summary. `check=False` checks only the json's shape and keys.
    """

    def __init__(
        self,
        meta_info_path: str | Path,
        width: int,
        height: int,
        sample_n_frames: int,
        interval_frame: int,
        seed: int = 0,
        deterministic: bool = False,
        ref_augment: bool = False,
        max_failure_fraction: float = 0.01,
        check: bool = True,
        video_cache_mb: int = 0,
        crop_offsets: Sequence[float] | None = None,
        pixel_frames: bool = True,
    ):
        self.meta_info_path = Path(meta_info_path)
        self.width, self.height = int(width), int(height)
        self.sample_n_frames, self.interval_frame = int(sample_n_frames), int(interval_frame)
        self.seed, self.deterministic, self.ref_augment = int(seed), bool(deterministic), bool(ref_augment)
        self.max_failure_fraction = float(max_failure_fraction)
        self.epoch = 0
        self.crop_offsets = None if crop_offsets is None else tuple(float(x) for x in crop_offsets)
        self.pixel_frames = bool(pixel_frames)
        self.videos = DecodedVideos(video_cache_mb * 2**20) if video_cache_mb > 0 else None
        if self.sample_n_frames < 1 or self.width < 1 or self.height < 1:
            raise ValueError("width, height and sample_n_frames must be positive")
        report = check_meta_info(
            self.meta_info_path,
            self.sample_n_frames,
            self.interval_frame,
            self.width,
            self.height,
            decode=False,
            files=check,
        )
        report.raise_if_bad()  # DataCheckError
        if report.problems:  # only warnings are left
            logger.warning(
                "%s: %d data warnings (e.g. %s); `cnx check-data` lists them",
                self.meta_info_path,
                len(report.problems),
                report.problems[0],
            )
        self.entries: list[MetaEntry] = report.entries  # json order; never shuffled here

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def generator(self, index: int, epoch: int | None = None) -> torch.Generator:
        """The generator of one sample; deterministic mode ignores the epoch."""
        epoch = 0 if self.deterministic else (self.epoch if epoch is None else epoch)
        return sample_generator(self.seed, epoch, index)

    def failure_budget(self, min_samples: int = 100) -> FailureBudget:
        """A FailureBudget with this dataset's `max_failure_fraction`, for `iterate_with_budget`."""
        return FailureBudget(max_fraction=self.max_failure_fraction, min_samples=min_samples)

    def __getitem__(self, index: int) -> dict:
        return self.sample(index)

    def _error(self, index: int, message: str, path: Path | None = None) -> SampleError:
        """A SampleError worded like check-data's lines; `path` is the file that failed (default: video)."""
        shown = str(self.entries[index].video_path)
        return SampleError(str(Problem(index, shown, message)), index=index, path=str(path or shown))

    def _read(self, reader, key: tuple, size: tuple[int, int], wanted: np.ndarray) -> np.ndarray:
        """Frames `wanted` (U, h, w, 3); a whole video is decoded and kept when the cache has room."""
        if isinstance(reader, np.ndarray):
            return reader[wanted]
        if self.videos is not None and self.videos.room_for(size[0] * size[1] * 3, len(reader)):
            frames = video.read_frames(reader)  # (N, h, w, 3)
            self.videos.keep(key, frames)
            return frames[wanted]
        return video.read_frames(reader, wanted.tolist())

    def sample(self, index: int, epoch: int | None = None) -> dict:
        """One training sample (see the class docstring); raises SampleError when its files fail."""
        if not 0 <= index < len(self.entries):
            raise IndexError(f"index {index} out of range for {len(self.entries)} entries")
        entry = self.entries[index]
        generator = self.generator(index, epoch)
        # Each file in its own try: decord's messages do not name the file, so the message must.
        files = (("video", entry.video_path), ("pose video", entry.guide_path))
        sizes = []  # source (width, height) of each, from the container header
        for what, path in files:
            try:
                sizes.append(cached_video_size(path))
            except video.VideoReadError as err:
                raise self._error(index, f"{what}: {err}", path) from err
        (src_width, src_height), pose_size = sizes
        mismatch = aspect_problem((src_width, src_height), pose_size, entry.guide_path)
        if mismatch is not None:  # also caught at construction; this covers check=False
            raise self._error(index, mismatch, entry.guide_path)
        # The crop's size does not depend on where it sits, so the decode size is known before any draw.
        centred = crop_window(src_width, src_height, self.width, self.height)
        # (width, height) each video is decoded at; decord keeps the source size when given None.
        decoded_sizes = [decode_size(w, h, centred, self.width, self.height) for w, h in sizes]
        readers = []  # a decord reader, or the whole video already decoded (`video_cache_mb`)
        for (what, path), size in zip(files, decoded_sizes, strict=True):
            cached = self.videos.get((str(path), size)) if self.videos is not None else None
            try:
                readers.append(cached if cached is not None else video.open_video(path, size))
            except video.VideoReadError as err:
                raise self._error(index, f"{what}: {err}", path) from err
        num_video, num_pose = map(len, readers)
        mismatch = length_problem(num_video, num_pose, entry.guide_path)
        if mismatch is not None:
            raise self._error(index, mismatch, entry.guide_path)
        usable = min(num_video, num_pose)  # pose and video may differ by a few frames
        if usable < self.sample_n_frames:
            raise self._error(index, f"only {usable} usable frames for a {self.sample_n_frames}-frame clip")

        # Which frames, and where to crop (the draws happen in this order, then the augmentation).
        clip = sample_clip(usable, self.sample_n_frames, self.interval_frame, generator)
        offset = _uniform(generator)
        if self.deterministic:
            offset = 0.5
        if self.crop_offsets:  # the same draw, snapped: a run with and without a latent cache crop alike
            offset = min(self.crop_offsets, key=lambda position: abs(position - offset))

        # One get_batch per video, frames in increasing order: decord then decodes forward without
        # seeking back (2-3x faster at 1080p than the clip's order, which puts the reference first).
        wanted = np.unique(clip.frame_indices)
        # wanted[order] == frame_indices
        order = torch.from_numpy(np.searchsorted(wanted, clip.frame_indices))
        # Without pixel_frames the RGB video gives the reference frame alone (the pose video: every frame).
        reads = (wanted if self.pixel_frames else np.array([clip.reference_index]), wanted)
        decoded = []
        for (what, path), source, size, reader, frames in zip(
            files, sizes, decoded_sizes, readers, reads, strict=True
        ):
            try:
                decoded.append(self._read(reader, (str(path), size), size or source, frames))
            except video.VideoReadError as err:
                raise self._error(index, f"{what}: {path}: {err}", path) from err
        video_uint8, pose_uint8 = decoded  # (U, h, w, 3) and (U, h', w', 3) uint8 RGB, at decode size
        detections = None
        if entry.meta_info is not None:
            try:
                all_detections = cached_detections(entry.meta_info)
            except MetaInfoError as err:
                raise self._error(index, str(err), entry.meta_info) from err
            if len(all_detections) <= int(clip.frame_indices.max()):
                raise self._error(
                    index,
                    f"{entry.meta_info}: detections cover {len(all_detections)} frames, "
                    f"the clip needs frame {int(clip.frame_indices.max())}",
                    entry.meta_info,
                )
            detections = [all_detections[i] for i in clip.frame_indices]
            detections[0] = None  # frame 0 is the reference the model is given: no extra weight

        box = crop_window(src_width, src_height, self.width, self.height, offset)
        pixels = crop_resize(video_uint8, box, self.width, self.height)  # (U or 1, 3, H, W) uint8
        if self.pixel_frames:
            pixels = pixels[order]  # (F, 3, H, W)
        poses = crop_resize(pose_uint8, box, self.width, self.height)[order]  # (F, 3, H, W) uint8
        pixel_values = pixels.to(torch.float32).div_(127.5).sub_(1.0)  # in place: no extra 37M-value copies
        pose_frames = poses.to(torch.float32).div_(255.0)
        if detections is None:
            weights = torch.ones(self.sample_n_frames, 1, self.height, self.width)
        else:
            weights = hand_weights(detections, box, (src_width, src_height), (self.width, self.height))
        reference_image = pixel_values[0].clone()  # (3, H, W) in [-1, 1]
        if self.ref_augment:  # the target frame 0 stays the true frame; only the conditioning input moves
            augmented, _ = augment_reference((reference_image + 1.0) / 2.0, generator)
            reference_image = augmented * 2.0 - 1.0
        item = {
            "pixel_values": pixel_values,
            "pose_frames": pose_frames,
            "reference_image": reference_image,
            "hand_weights": weights,
            "frame_indices": torch.from_numpy(clip.frame_indices.astype(np.int64)),
            "reference_index": clip.reference_index,
            "interval": clip.interval,
            "crop_box": torch.tensor(box, dtype=torch.float32),
            "crop_offset": offset,
            "video_path": str(entry.video_path),
            "guide_path": str(entry.guide_path),
            "index": index,
        }
        if not self.pixel_frames:
            del item["pixel_values"]
        return item


__all__ = [
    "HAND_THRESHOLD",
    "HAND_WEIGHT",
    "ClipDataset",
    "ClipIndices",
    "CropBox",
    "FailureBudget",
    "SampleError",
    "TooManyFailures",
    "augment_reference",
    "cached_detections",
    "clip_span",
    "crop_resize",
    "crop_window",
    "fitted_interval",
    "hand_weights",
    "iterate_with_budget",
    "sample_clip",
    "sample_frame_indices",
    "sample_generator",
    "sample_reference_index",
]
