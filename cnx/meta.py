"""The original training code's data index: `meta_info.json`, per-frame detection json, and `cnx build-meta`.

`meta_info.json` is a json list with one object per training video:

    {"video_path": "...", "guide_path": "...", "meta_info": "..."}   # meta_info optional

`video_path` is the RGB clip, `guide_path` its pose video (same frames, any
resolution covering the same field of view), `meta_info` a per-frame detection
json: a list with one object per RGB frame,

    {"boxes": [[[x0, y0], [x1, y1]], ...],        # person boxes, normalised to the frame
     "hands_boxes": [[[x0, y0], [x1, y1]], ...],  # one box per detected hand
     "hands_score": [[s_1, ..., s_K], ...]}       # per hand, one score per hand keypoint

Coordinates are fractions of the RGB frame's width (x) and height (y).
Relative paths resolve against the folder holding `meta_info.json`, so a
dataset folder can be moved or copied as a whole.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENTRY_KEYS = ("video_path", "guide_path")  # required in every entry
OPTIONAL_KEYS = ("meta_info",)
DETECTION_KEYS = ("boxes", "hands_boxes", "hands_score")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
HAND_THRESHOLD = 0.5  # a hand is confident (gets the loss weight) when its mean keypoint score exceeds this


class MetaInfoError(ValueError):
    """A meta_info or detection json that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one entry (or with the whole file when `index` is None)."""

    index: int | None
    path: str  # the entry's video path (resolved), or the json file for file-level problems
    message: str
    warning: bool = False  # a warning is reported but does not make the entry bad

    def __str__(self) -> str:
        what = f"warning: {self.message}" if self.warning else self.message
        if self.index is None:
            return f"{self.path}: {what}"
        return f"entry {self.index} ({self.path}): {what}"


@dataclass(frozen=True)
class MetaEntry:
    """One training video: RGB clip, its pose video and (optionally) its per-frame detections."""

    index: int  # position in meta_info.json; the dataset's sample index
    video_path: Path
    guide_path: Path
    meta_info: Path | None = None


@dataclass(frozen=True)
class FrameDetections:
    """Detections of one frame, as arrays (coordinates normalised to the RGB frame)."""

    boxes: np.ndarray  # (N, 2, 2) person boxes [[x0, y0], [x1, y1]]
    hands_boxes: np.ndarray  # (M, 2, 2) hand boxes
    hands_score: np.ndarray  # (M, K) keypoint scores of each hand

    @property
    def hands_confidence(self) -> np.ndarray:
        """(M,) mean keypoint score per hand: what the hand weights compare with HAND_THRESHOLD."""
        if self.hands_score.shape[0] == 0:
            return np.zeros(0)
        return self.hands_score.mean(axis=1)


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _read_json_list(path: Path, what: str, expected: str) -> list:
    """The json list in `path`; MetaInfoError naming the file when it is missing, unreadable or not a list."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MetaInfoError(f"{path}: {what} json does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MetaInfoError(f"{path}: cannot read {what} json: {err}") from err
    if not isinstance(data, list):
        raise MetaInfoError(f"{path}: {expected}, got {type(data).__name__}")
    return data


def parse_meta_info(path: str | Path) -> tuple[list[MetaEntry], list[Problem]]:
    """Entries of a meta_info.json plus the problems of its shape and keys.

    Entries with an error are left out of the list (their problems say why),
    so a caller can report every problem at once instead of stopping at the first.
    A file that is not a json list raises MetaInfoError: nothing in it can be used.
    """
    path = Path(path)
    data = _read_json_list(path, "meta_info", "meta_info must be a json list of entries")
    base = path.resolve().parent
    entries, problems = [], []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            problems.append(Problem(i, str(path), f"entry must be a json object, got {type(item).__name__}"))
            continue
        raw_video = item.get("video_path")
        # Name the entry by its video; without one, by the json file itself.
        shown = str(_resolve(base, raw_video)) if isinstance(raw_video, str) and raw_video else str(path)
        bad = False
        for key in ENTRY_KEYS:
            if key not in item:
                problems.append(Problem(i, shown, f"missing key {key!r}"))
                bad = True
            elif not isinstance(item[key], str) or not item[key]:
                problems.append(Problem(i, shown, f"{key!r} must be a non-empty string, got {item[key]!r}"))
                bad = True
        meta = item.get("meta_info")
        if meta is not None and (not isinstance(meta, str) or not meta):
            problems.append(Problem(i, shown, f"'meta_info' must be a non-empty string, got {meta!r}"))
            bad = True
        unknown = sorted(set(item) - set(ENTRY_KEYS) - set(OPTIONAL_KEYS))
        if unknown:  # a misspelt 'meta_info' would otherwise silently drop the hand weights
            problems.append(Problem(i, shown, f"unknown keys {unknown} are ignored (typo?)", warning=True))
        if bad:
            continue
        entries.append(
            MetaEntry(
                index=i,
                video_path=_resolve(base, item["video_path"]),
                guide_path=_resolve(base, item["guide_path"]),
                meta_info=_resolve(base, meta) if meta else None,
            )
        )
    if not data:
        problems.append(Problem(None, str(path), "meta_info lists no entries"))
    return entries, problems


def read_meta_info(path: str | Path) -> list[MetaEntry]:
    """Entries of a meta_info.json; raises MetaInfoError listing every shape/key error."""
    entries, problems = parse_meta_info(path)
    errors = [p for p in problems if not p.warning]
    if errors:
        raise MetaInfoError("\n".join(map(str, errors)))
    return entries


def _boxes(value, where: str) -> np.ndarray:
    """(N, 2, 2) float array from a list of [[x0, y0], [x1, y1]]."""
    if not isinstance(value, list):
        raise MetaInfoError(f"{where} must be a list of [[x0, y0], [x1, y1]] boxes")
    try:
        array = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError) as err:
        raise MetaInfoError(f"{where} must be a list of [[x0, y0], [x1, y1]] boxes ({err})") from err
    if array.size == 0:
        return np.zeros((0, 2, 2))
    if array.ndim != 3 or array.shape[1:] != (2, 2):
        raise MetaInfoError(f"{where} must be a list of [[x0, y0], [x1, y1]] boxes, got shape {array.shape}")
    return array


def read_detections(path: str | Path) -> list[FrameDetections]:
    """Per-frame detections of one video; raises MetaInfoError naming the file and frame on bad shape."""
    path = Path(path)
    data = _read_json_list(path, "detection", "detections must be a json list with one object per frame")
    frames = []
    for t, item in enumerate(data):
        where = f"{path}: frame {t}"
        if not isinstance(item, dict):
            raise MetaInfoError(f"{where}: must be a json object with keys {list(DETECTION_KEYS)}")
        missing = [k for k in DETECTION_KEYS if k not in item]
        if missing:
            raise MetaInfoError(f"{where}: missing keys {missing}")
        boxes = _boxes(item["boxes"], f"{where}: 'boxes'")
        hands = _boxes(item["hands_boxes"], f"{where}: 'hands_boxes'")
        scores = item["hands_score"]
        try:
            score_array = np.asarray(scores, dtype=np.float64) if isinstance(scores, list) else None
        except (ValueError, TypeError):
            score_array = None
        if score_array is None or (score_array.size and score_array.ndim != 2):
            raise MetaInfoError(f"{where}: 'hands_score' must be a list of per-hand keypoint score lists")
        if score_array.size == 0:
            score_array = np.zeros((len(scores), 0))
        if score_array.shape[0] != hands.shape[0]:
            raise MetaInfoError(
                f"{where}: {hands.shape[0]} hands_boxes but {score_array.shape[0]} hands_score lists"
            )
        if hands.shape[0] and score_array.shape[1] == 0:
            raise MetaInfoError(f"{where}: a hand has no keypoint scores")
        frames.append(FrameDetections(boxes=boxes, hands_boxes=hands, hands_score=score_array))
    return frames


# ---------------------------------------------------------------------------------------------
# cnx build-meta


@dataclass
class BuildReport:
    """What build-meta matched and what it could not."""

    entries: list[dict]
    videos_without_pose: list[Path]
    poses_without_video: list[Path]
    videos_without_meta: list[Path]  # only when a meta folder was given
    metas_without_video: list[Path]

    def lines(self) -> list[str]:
        groups = [
            ("video without pose video", self.videos_without_pose),
            ("pose video without video", self.poses_without_video),
            ("video without detection json", self.videos_without_meta),
            ("detection json without video", self.metas_without_video),
        ]
        return [f"unmatched {what}: {p}" for what, paths in groups for p in paths]


def _by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        raise MetaInfoError(f"{folder}: not a folder")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes:
            if p.stem in found:
                raise MetaInfoError(
                    f"{folder}: two files share the stem {p.stem!r}: {found[p.stem].name}, {p.name}"
                )
            found[p.stem] = p
    return found


def _relative(path: Path, base: Path) -> str:
    """`path` relative to `base` when it can be (so the dataset folder moves as a whole)."""
    try:
        return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return str(path.resolve())


def build_meta(
    video_dir: str | Path,
    pose_dir: str | Path,
    output: str | Path,
    meta_dir: str | Path | None = None,
) -> BuildReport:
    """Write `output` (a meta_info.json) pairing videos and pose videos by file stem.

    As in the UBC-Fashion layout (`train/A.mp4` with `train_pose/A.mp4` and
    `train_meta/A.json`). Entries are sorted by stem; paths are written relative
    to the output's folder. Unmatched files are reported, not guessed at.
    """
    output = Path(output)
    videos = _by_stem(Path(video_dir), VIDEO_SUFFIXES)
    poses = _by_stem(Path(pose_dir), VIDEO_SUFFIXES)
    metas = _by_stem(Path(meta_dir), (".json",)) if meta_dir is not None else {}
    base = output.parent
    entries = []
    for stem in sorted(set(videos) & set(poses)):
        entry = {"video_path": _relative(videos[stem], base), "guide_path": _relative(poses[stem], base)}
        if stem in metas:
            entry["meta_info"] = _relative(metas[stem], base)
        entries.append(entry)
    report = BuildReport(
        entries=entries,
        videos_without_pose=[videos[s] for s in sorted(set(videos) - set(poses))],
        poses_without_video=[poses[s] for s in sorted(set(poses) - set(videos))],
        videos_without_meta=[videos[s] for s in sorted(set(videos) - set(metas))] if meta_dir else [],
        metas_without_video=[metas[s] for s in sorted(set(metas) - set(videos))],
    )
    if entries:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(entries, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    """`cnx build-meta`: exit 0 when at least one pair was written, 1 when nothing matched."""
    parser = argparse.ArgumentParser(
        prog="cnx build-meta",
        description="Build a meta_info.json from videos and pose videos matched by stem.",
    )
    parser.add_argument("--video_dir", required=True, help="folder of RGB videos")
    parser.add_argument("--pose_dir", required=True, help="folder of pose videos with the same file stems")
    parser.add_argument("--meta_dir", default=None, help="optional folder of per-frame detection json")
    parser.add_argument("--output", required=True, help="meta_info.json to write")
    args = parser.parse_args(argv)
    try:
        report = build_meta(args.video_dir, args.pose_dir, args.output, meta_dir=args.meta_dir)
    except MetaInfoError as err:
        print(f"cnx build-meta: {err}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    if not report.entries:
        print("cnx build-meta: no video matched a pose video by stem; nothing written", file=sys.stderr)
        return 1
    print(f"wrote {len(report.entries)} entries to {args.output} ({len(report.lines())} unmatched files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
