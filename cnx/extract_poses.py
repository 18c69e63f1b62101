"""`cnx extract-poses`: pose videos and detection json for a folder of ordinary videos.

    cnx extract-poses --video_dir mydata/videos --output_dir mydata
    cnx build-meta --video_dir mydata/videos --pose_dir mydata/poses --meta_dir mydata/meta \\
        --output mydata/meta_info.json

For every video of `--video_dir` (mp4, avi, mov, mkv, webm; sorted) it writes
`<output_dir>/poses/<stem>.mp4`, the pose drawn as the training expects (same size,
length and frame rate), and `<output_dir>/meta/<stem>.json`, the per-frame person and
hand boxes (`cnx.meta`'s schema), then `<output_dir>/extract_report.json` with each
video's counts. The detector is MediaPipe Holistic (`cnx.mediapipe_pose`, offline),
a fresh tracker per video; `--detector dwpose` runs your own DWPose onnx models instead.

A frame without a person is drawn black and counted; a video whose detected fraction
is under `--min_detected` is flagged (its files are written: remove it or keep it);
a video that cannot be read fails, with its file and the problem on one line, and the
exit status is 1. Files are written under `<output_dir>/.partial/` and moved into
place only when complete, so a rerun keeps every finished video (`--overwrite` redoes
them) and never mistakes a half-written file for a finished one.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cnx.meta import HAND_THRESHOLD, VIDEO_SUFFIXES

REPORT_NAME = "extract_report.json"
PARTIAL = ".partial"  # unfinished files; a dot folder, so build-meta never reads it


@dataclass
class VideoResult:
    """What happened to one video: status done, skipped (finished earlier) or failed."""

    video: str
    status: str
    frames: int = 0
    detected: int = 0  # frames with a person
    missing_frames: list[int] = field(default_factory=list)  # frames without a person, drawn black
    hands_found: list[int] = field(default_factory=lambda: [0, 0])  # frames with a confident [left, right]
    flagged: bool = False  # detected fraction under --min_detected
    error: str | None = None

    @property
    def detected_fraction(self) -> float:
        return self.detected / self.frames if self.frames else 0.0

    def line(self, min_detected: float) -> str | None:
        """The one line a bad video gets (file and problem); None for a good one."""
        if self.status == "failed":
            return f"{self.video}: failed: {self.error}"
        if self.flagged:
            return (
                f"{self.video}: a person in only {self.detected} of {self.frames} frames "
                f"({self.detected_fraction:.0%} < --min_detected {min_detected:.0%}); written, but check it"
            )
        return None


def video_files(video_dir: str | Path) -> list[Path]:
    """The videos of a folder, sorted; a clear error when the folder is missing or holds none."""
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        raise FileNotFoundError(f"{video_dir}: no such folder")
    videos = sorted(p for p in video_dir.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise FileNotFoundError(f"{video_dir}: no videos ({', '.join(VIDEO_SUFFIXES)})")
    return videos


def output_paths(output_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """(pose video, detection json) of one video: the folders `cnx build-meta` pairs by stem."""
    output_dir = Path(output_dir)
    return output_dir / "poses" / f"{stem}.mp4", output_dir / "meta" / f"{stem}.json"


def count_detections(video: str | Path, entries: list[dict]) -> VideoResult:
    """A video's counts from its detection entries: frames with a person, frames with each hand."""
    result = VideoResult(video=str(video), status="done", frames=len(entries))
    for t, entry in enumerate(entries):
        if entry["boxes"]:
            result.detected += 1
        else:
            result.missing_frames.append(t)
        for hand, scores in enumerate(entry["hands_score"][:2]):
            if scores and sum(scores) / len(scores) > HAND_THRESHOLD:
                result.hands_found[hand] += 1
    return result


def finished_entries(video: Path, pose_path: Path, meta_path: Path) -> list[dict] | None:
    """The detection entries of a video extracted earlier, or None when its outputs are not complete.

    Complete: both files exist, the json is a list, and the pose video and the json have as
    many frames as the video (counted as extraction counts them; a video replaced since by
    one of another length is redone).
    """
    from cnx.video import VideoReadError, container_info, open_video

    if not (pose_path.is_file() and meta_path.is_file()):
        return None
    try:
        entries = json.loads(meta_path.read_text())
        frames = {len(open_video(video)), container_info(pose_path).num_frames}
    except (OSError, ValueError, VideoReadError):
        return None
    if not isinstance(entries, list) or frames != {len(entries)}:
        return None
    if not all(isinstance(e, dict) and {"boxes", "hands_score"} <= set(e) for e in entries):
        return None
    return entries


def _duplicate_stems(videos: list[Path]) -> dict[Path, str]:
    """Videos whose stem another video shares: their outputs would overwrite each other."""
    by_stem: dict[str, list[Path]] = {}
    for video in videos:
        by_stem.setdefault(video.stem, []).append(video)
    return {
        video: f"shares its stem with {', '.join(o.name for o in same if o != video)}; rename one"
        for same in by_stem.values()
        if len(same) > 1
        for video in same
    }


def extract_video(
    video: Path, output_dir: Path, detector, overwrite: bool = False, progress: bool = True
) -> VideoResult:
    """One video's pose video and detection json (kept when complete, unless `overwrite`)."""
    from cnx.pose import extract_pose_video
    from cnx.video import VideoReadError

    pose_path, meta_path = output_paths(output_dir, video.stem)
    if not overwrite:
        entries = finished_entries(video, pose_path, meta_path)
        if entries is not None:
            result = count_detections(video, entries)
            result.status = "skipped"
            return result
    partial = output_dir / PARTIAL
    partial_pose, partial_meta = partial / pose_path.name, partial / meta_path.name
    if hasattr(detector, "reset"):
        detector.reset()  # a fresh tracker: the last video's person is not this one's
    try:
        entries = extract_pose_video(video, partial_pose, partial_meta, detector, progress=progress)
    except (VideoReadError, ValueError, OSError) as error:
        for path in (partial_pose, partial_meta):
            path.unlink(missing_ok=True)
        message = str(error).removeprefix(f"{video}: ").removeprefix(f"{video} ")
        return VideoResult(video=str(video), status="failed", error=message or type(error).__name__)
    if not entries:
        return VideoResult(video=str(video), status="failed", error="the video has no frames")
    pose_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # until both are in place the pair is incomplete
    partial_pose.replace(pose_path)
    partial_meta.replace(meta_path)
    return count_detections(video, entries)


def extract_poses(
    video_dir: str | Path,
    output_dir: str | Path,
    detector,
    overwrite: bool = False,
    min_detected: float = 0.5,
    progress: bool = True,
    echo=print,
) -> list[VideoResult]:
    """Every video of `video_dir` through `extract_video`; writes and returns the per-video report."""
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    videos = video_files(video_dir)
    duplicates = _duplicate_stems(videos)
    shutil.rmtree(output_dir / PARTIAL, ignore_errors=True)  # an interrupted run's unfinished files
    results = []
    for video in tqdm(videos, desc="videos", unit="video", disable=not progress):
        if video in duplicates:
            result = VideoResult(video=str(video), status="failed", error=duplicates[video])
        else:
            result = extract_video(video, output_dir, detector, overwrite, progress)
        result.flagged = result.status != "failed" and result.detected_fraction < min_detected
        line = result.line(min_detected)
        if line:
            echo(line)
        results.append(result)
    partial = output_dir / PARTIAL
    if partial.is_dir() and not any(partial.iterdir()):
        partial.rmdir()
    write_report(output_dir / REPORT_NAME, results, min_detected)
    return results


def summary(results: list[VideoResult]) -> dict:
    count = {status: sum(r.status == status for r in results) for status in ("done", "skipped", "failed")}
    return {
        "videos": len(results),
        **count,
        "flagged": sum(r.flagged for r in results),
        "frames": sum(r.frames for r in results),
        "frames_without_person": sum(len(r.missing_frames) for r in results),
    }


def write_report(path: Path, results: list[VideoResult], min_detected: float) -> Path:
    videos = [asdict(r) | {"detected_fraction": round(r.detected_fraction, 4)} for r in results]
    report = {"min_detected": min_detected, "summary": summary(results), "videos": videos}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def make_detector(args):
    """The detector the flags ask for: MediaPipe (default) or the user's DWPose onnx models."""
    if args.detector == "dwpose":
        from cnx.pose import load_dwpose_detector

        return load_dwpose_detector(args.dwpose_det, args.dwpose_pose, device=args.device)
    from cnx.mediapipe_pose import MediaPipePoseDetector

    return MediaPipePoseDetector(video=True, model_complexity=args.model_complexity)


def main(argv: list[str] | None = None) -> int:
    """`cnx extract-poses`: exit 1 when any video failed (flagged videos are written and reported)."""
    parser = argparse.ArgumentParser(prog="cnx extract-poses", description=__doc__.splitlines()[0])
    parser.add_argument("--video_dir", required=True, help="folder of RGB videos")
    parser.add_argument("--output_dir", required=True, help="writes poses/, meta/ and extract_report.json")
    parser.add_argument("--overwrite", action="store_true", help="redo videos whose outputs are complete")
    parser.add_argument(
        "--model_complexity",
        type=int,
        default=1,
        choices=(0, 1, 2),
        help="MediaPipe's body model (only 1 ships in the wheel)",
    )
    parser.add_argument(
        "--min_detected", type=float, default=0.5, help="flag a video with a person in fewer of its frames"
    )
    parser.add_argument(
        "--detector", choices=("mediapipe", "dwpose"), default="mediapipe", help="dwpose: your onnx models"
    )
    parser.add_argument("--dwpose_det", help="--detector dwpose: the person detector onnx (e.g. YOLOX)")
    parser.add_argument("--dwpose_pose", help="--detector dwpose: the whole-body pose onnx (DWPose)")
    parser.add_argument("--device", default="cpu", help="--detector dwpose: onnxruntime device")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not 0.0 <= args.min_detected <= 1.0:
        parser.error(f"--min_detected must be a fraction in [0, 1], got {args.min_detected}")
    if args.detector == "dwpose" and not (args.dwpose_det and args.dwpose_pose):
        parser.error("--detector dwpose needs --dwpose_det and --dwpose_pose (your two onnx files)")
    output_dir = Path(args.output_dir)
    try:
        video_files(args.video_dir)
        detector = make_detector(args)
    except (FileNotFoundError, ImportError) as error:
        print(f"cnx extract-poses: {error}", file=sys.stderr)
        return 1
    try:
        results = extract_poses(
            args.video_dir, output_dir, detector, args.overwrite, args.min_detected, not args.quiet
        )
    finally:
        if hasattr(detector, "close"):
            detector.close()
    totals = summary(results)
    print(
        f"{totals['videos']} videos: {totals['done']} done, {totals['skipped']} skipped (already done), "
        f"{totals['flagged']} flagged, {totals['failed']} failed; {totals['frames_without_person']} of "
        f"{totals['frames']} frames without a person (drawn black); report: {output_dir / REPORT_NAME}"
    )
    if totals["done"] + totals["skipped"]:
        print("next:")
        command = ["cnx", "build-meta", "--video_dir", args.video_dir, "--pose_dir", output_dir / "poses"]
        command += ["--meta_dir", output_dir / "meta", "--output", output_dir / "meta_info.json"]
        print("  " + shlex.join(map(str, command)))
    return 1 if totals["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
