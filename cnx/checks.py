"""`cnx check-data`: find every problem in a dataset before a training run does.

A bad entry found at step 40,000 on 8 GPUs is expensive; found here it costs
seconds. Each problem prints as one line, `entry <i> (<video>): <what is wrong>`,
then a summary; the exit status is 1 when any entry is bad.

Two depths:
- cheap (what `cnx.data.ClipDataset` runs when it is built): meta_info json
  shape and keys, files exist, frame counts from the container's metadata
  (PyAV reads the mp4 index, nothing is decoded), pose/RGB counts within 25,
  each video long enough for the clip, pose and RGB videos of the same aspect
  ratio (within 1%);
- full (the default of `check-data`): also decodes the first and last frame
  of both videos with decord (the reader training uses), and checks the
  per-frame detection json: it covers every frame, box coordinates are
  normalised and ordered, scores are finite.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnx.meta import MetaEntry, MetaInfoError, Problem, parse_meta_info, read_detections
from cnx.video import VideoReadError, container_info, decode_info

MAX_LENGTH_GAP = 25  # pose and RGB frame counts must differ by fewer than this many frames
# Person boxes come from the detector with padding and often overhang the frame
# (the original code's own example reaches y = 1.098); training does not use them, so only
# a gross overhang (pixel coordinates, swapped axes) is an error. Hand boxes feed
# the loss weights and must lie inside the frame.
PERSON_BOX_OVERHANG = 0.25
# The crop window is shared by the RGB and the pose video in normalised coordinates, which cuts the
# same content out of both only when they show the same field of view: equal aspect ratios. Pose
# videos may have another resolution; rounding to even sizes moves the aspect by well under 1%.
MAX_ASPECT_GAP = 0.01


class DataCheckError(ValueError):
    """The dataset has bad entries; the message lists one line per problem."""


def clip_span(sample_n_frames: int, interval: int) -> int:
    """Frames covered by a clip from its first to its last frame."""
    return (sample_n_frames - 1) * interval + 1


def fitted_interval(video_length: int, sample_n_frames: int, interval: int) -> int:
    """The spacing actually used: `interval`, shrunk until the clip fits in the video.

    Lives here rather than in `cnx.data` so that check-data's warning and the
    dataset's sampling use one rule (`cnx.data` imports this module, not the reverse).
    """
    if sample_n_frames <= 1:
        return interval
    return max(1, min(interval, (video_length - 1) // (sample_n_frames - 1)))


def aspect_problem(
    video_size: tuple[int, int], pose_size: tuple[int, int], pose_path: str | Path = "pose video"
) -> str | None:
    """Why the pose video `pose_path` of `pose_size` (width, height) cannot guide a video of `video_size`.

    Their aspect ratios must agree within MAX_ASPECT_GAP: the crop window is in
    normalised coordinates, right for both only when they frame the same view.
    """
    (width, height), (pose_width, pose_height) = video_size, pose_size
    aspect, pose_aspect = width / height, pose_width / pose_height
    gap = abs(pose_aspect / aspect - 1.0)
    if gap <= MAX_ASPECT_GAP:
        return None
    return (
        f"pose video {pose_path} is {pose_width}x{pose_height} (aspect {pose_aspect:.3f}), "
        f"video is {width}x{height} "
        f"(aspect {aspect:.3f}): aspect ratios differ by {gap:.1%} (at most {MAX_ASPECT_GAP:.0%}), "
        "so they do not show the same field of view and one crop window cannot fit both"
    )


def length_problem(num_video: int, num_pose: int, pose_path: str | Path) -> str | None:
    """Why a pose video of `num_pose` frames cannot guide a video of `num_video`, or None.

    A few frames' difference is normal (encoders drop or add a frame at the ends);
    MAX_LENGTH_GAP or more means the pose video belongs to another clip.
    """
    gap = abs(num_video - num_pose)
    if gap < MAX_LENGTH_GAP:
        return None
    return (
        f"pose video {pose_path} has {num_pose} frames, video has {num_video}: "
        f"they differ by {gap} (must be under {MAX_LENGTH_GAP})"
    )


def detection_problems(
    detections, num_frames: int, box_overhang: float = PERSON_BOX_OVERHANG, eps: float = 1e-6
) -> list[str]:
    """What is wrong with one video's per-frame detections (one message per kind of problem).

    `detections` is a list of `cnx.meta.FrameDetections`; `num_frames` the RGB video's length.
    """
    messages = []
    if len(detections) < num_frames:
        messages.append(f"detections cover {len(detections)} frames but the video has {num_frames}")
    bad: dict[str, list[int]] = {}

    def flag(kind: str, t: int) -> None:
        bad.setdefault(kind, []).append(t)

    for t, frame in enumerate(detections):
        for kind, boxes, low, high in (
            ("hands_boxes", frame.hands_boxes, 0.0, 1.0),
            ("boxes", frame.boxes, -box_overhang, 1.0 + box_overhang),
        ):
            if not np.isfinite(boxes).all():
                flag(f"{kind} with non-finite coordinates", t)
                continue
            if boxes.size and ((boxes < low - eps).any() or (boxes > high + eps).any()):
                flag(f"{kind} outside [{low:g}, {high:g}] (normalised coordinates expected)", t)
            if boxes.size and ((boxes[:, 1] < boxes[:, 0]).any()):
                flag(f"{kind} not ordered as [[x0, y0], [x1, y1]] with x0 <= x1, y0 <= y1", t)
        if not np.isfinite(frame.hands_score).all():
            flag("hands_score with non-finite values", t)
    for kind, frames in bad.items():
        messages.append(f"{kind} in {len(frames)} frames (first: frame {frames[0]})")
    return messages


def entry_problems(
    entry: MetaEntry,
    sample_n_frames: int,
    interval_frame: int,
    width: int | None = None,
    height: int | None = None,
    decode: bool = False,
) -> list[Problem]:
    """Problems of one entry: cheap checks, plus decoding and detection checks when `decode`."""
    shown = str(entry.video_path)

    def problem(message: str, warning: bool = False) -> Problem:
        return Problem(entry.index, shown, message, warning=warning)

    problems = []
    files = [("video", entry.video_path), ("pose video", entry.guide_path)]
    if entry.meta_info is not None:
        files.append(("detection json", entry.meta_info))
    for what, path in files:
        if not path.is_file():
            problems.append(problem(f"{what} does not exist: {path}"))
    if problems:
        return problems
    infos = {}
    for what, path in files[:2]:
        try:
            infos[what] = decode_info(path) if decode else container_info(path)
        except VideoReadError as err:
            problems.append(problem(f"{what}: {err}"))
    if problems:
        return problems
    video, pose = infos["video"], infos["pose video"]
    for message in (
        length_problem(video.num_frames, pose.num_frames, entry.guide_path),
        aspect_problem((video.width, video.height), (pose.width, pose.height), entry.guide_path),
    ):
        if message is not None:
            problems.append(problem(message))
    usable = min(video.num_frames, pose.num_frames)
    # The shorter of the two limits the clip: name it.
    shorter = entry.video_path if video.num_frames <= pose.num_frames else entry.guide_path
    if usable < sample_n_frames:
        problems.append(
            problem(f"{shorter}: only {usable} usable frames, fewer than sample_n_frames={sample_n_frames}")
        )
    elif interval_frame > 0 and fitted_interval(usable, sample_n_frames, interval_frame) < interval_frame:
        shrunk = fitted_interval(usable, sample_n_frames, interval_frame)
        problems.append(
            problem(
                f"{shorter}: {usable} usable frames are too few for {sample_n_frames} frames at interval "
                f"{interval_frame}: spacing shrinks to {shrunk}",
                warning=True,
            )
        )
    if width and height:
        crop_w = min(video.width, video.height * width / height)
        if crop_w < width - 0.5:
            problems.append(
                problem(
                    f"{entry.video_path}: frames ({video.width}x{video.height}) are smaller than the "
                    f"{width}x{height} output "
                    "after cropping to its aspect ratio: they will be upscaled",
                    warning=True,
                )
            )
    if decode and entry.meta_info is not None:
        try:
            detections = read_detections(entry.meta_info)
        except MetaInfoError as err:
            problems.append(problem(str(err)))
        else:
            problems += [
                problem(f"{entry.meta_info}: {m}") for m in detection_problems(detections, video.num_frames)
            ]
    return problems


@dataclass
class CheckReport:
    """Result of checking one meta_info.json."""

    meta_info_path: Path
    num_entries: int
    problems: list[Problem] = field(default_factory=list)
    entries: list[MetaEntry] = field(default_factory=list)  # those whose json shape and keys are right

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if not p.warning]

    @property
    def bad_entries(self) -> list[int]:
        return sorted({p.index for p in self.errors if p.index is not None})

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        warnings = len(self.problems) - len(self.errors)
        file_errors = sum(p.index is None for p in self.errors)
        text = (
            f"{self.meta_info_path}: checked {self.num_entries} entries, {len(self.bad_entries)} bad, "
            f"{self.num_entries - len(self.bad_entries)} good"
        )
        if file_errors:
            text += f", {file_errors} file-level errors"
        return text + (f" ({warnings} warnings)" if warnings else "")

    def raise_if_bad(self) -> None:
        """DataCheckError with one line per error, then the summary: the lines check-data prints."""
        if not self.ok:
            lines = [str(p) for p in self.errors]
            raise DataCheckError("\n".join(lines + [self.summary()]))


def check_meta_info(
    meta_info_path: str | Path,
    sample_n_frames: int = 1,
    interval_frame: int = 1,
    width: int | None = None,
    height: int | None = None,
    decode: bool = True,
    progress: bool = False,
    files: bool = True,
) -> CheckReport:
    """Check every entry of a meta_info.json (cheap checks only when `decode` is False).

    `files=False` checks only the json's shape and keys (what `ClipDataset(check=False)` does).
    """
    meta_info_path = Path(meta_info_path)
    try:
        entries, problems = parse_meta_info(meta_info_path)
    except MetaInfoError as err:
        return CheckReport(
            meta_info_path, 0, [Problem(None, str(meta_info_path), str(err).split(": ", 1)[-1])]
        )
    num_entries = len(entries) + len({p.index for p in problems if p.index is not None and not p.warning})
    iterator = entries if files else []
    if progress and files:
        from tqdm.auto import tqdm

        iterator = tqdm(entries, desc="check-data", unit="entry", file=sys.stderr)
    for entry in iterator:
        problems += entry_problems(entry, sample_n_frames, interval_frame, width, height, decode=decode)
    problems.sort(key=lambda p: -1 if p.index is None else p.index)
    return CheckReport(meta_info_path, num_entries, problems, entries)


def main(argv: list[str] | None = None) -> int:
    """`cnx check-data`: print one line per problem and a summary; exit 1 when any entry is bad."""
    parser = argparse.ArgumentParser(
        prog="cnx check-data", description="Check every entry of a meta_info.json before training."
    )
    parser.add_argument("--meta_info_path", required=True, help="the dataset's meta_info.json")
    parser.add_argument("--sample_n_frames", type=int, default=1, help="frames per training clip")
    parser.add_argument("--interval_frame", type=int, default=1, help="spacing between clip frames")
    parser.add_argument("--width", type=int, default=None, help="training width (warns about upscaling)")
    parser.add_argument("--height", type=int, default=None, help="training height")
    parser.add_argument(
        "--no_decode", action="store_true", help="cheap checks only (no decoding, no detection json)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.sample_n_frames < 1:
        parser.error("--sample_n_frames must be at least 1")
    if args.width is None and args.height is not None:
        parser.error("--height needs --width too (both set the training size)")
    if args.height is None and args.width is not None:
        parser.error("--width needs --height too (both set the training size)")
    report = check_meta_info(
        args.meta_info_path,
        sample_n_frames=args.sample_n_frames,
        interval_frame=args.interval_frame,
        width=args.width,
        height=args.height,
        decode=not args.no_decode,
        progress=not args.quiet,
    )
    for p in report.problems:
        print(p)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
