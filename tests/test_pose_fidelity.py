"""Pose error of a video against its driving poses: the scoring maths on made-up poses, then MediaPipe
on a synthetic dancer whose poses are known, and `cnx validate --pose_detector`."""

import numpy as np
import pytest

from cnx import metrics
from cnx.cli import main as cnx
from cnx.media import fit
from cnx.pose import load_keypoints
from cnx.profiles import DATA_SAMPLES
from cnx.validation import ValidationSet, crop_keypoints, read_validation_set, score, scoring_detector
from cnx.video import read_frames

HEIGHT, WIDTH = 200, 100  # a non-square frame: distances are measured in pixels


def standing(frames=1):
    """Poses (F, 18, 2) of a person 100 pixels tall (y from 0.25 to 0.75 of 200), all confident."""
    body = np.stack([np.linspace(0.3, 0.7, 18), np.linspace(0.25, 0.75, 18)], axis=1)
    return metrics.Poses(np.repeat(body[None], frames, 0), np.ones((frames, 18)))


def error_of(found, driving, alpha=0.1):
    return metrics.pose_error_of(found, driving, HEIGHT, WIDTH, alpha)


def test_perfect_poses_score_pck_1_and_no_error():
    poses = standing(3)
    assert error_of(poses, poses) == {"pck": 1.0, "joint_error": 0.0, "detected": 1.0}


def test_distances_are_in_person_heights_and_pixels():
    driving = standing()
    assert metrics.person_heights(driving.body, driving.body_scores, HEIGHT) == pytest.approx([100])
    moved = metrics.Poses(driving.body + [0.12, 0.0], driving.body_scores)  # 12 pixels right: 0.12 heights
    assert error_of(moved, driving) == pytest.approx({"pck": 0.0, "joint_error": 0.12, "detected": 1.0})
    assert error_of(moved, driving, alpha=0.13)["pck"] == 1.0
    down = metrics.Poses(driving.body + [0.0, 0.04], driving.body_scores)  # 8 pixels down: 0.08 heights
    assert error_of(down, driving) == pytest.approx({"pck": 1.0, "joint_error": 0.08, "detected": 1.0})
    half = driving.body.copy()
    half[:, :9] += [0.2, 0.0]  # 20 pixels: half the joints beyond alpha
    assert error_of(metrics.Poses(half, driving.body_scores), driving)["pck"] == 0.5


def test_a_missed_joint_is_wrong_and_an_unsure_driving_joint_is_not_scored():
    driving = standing()
    missed = driving.body_scores.copy()
    missed[:, :6] = 0.1  # the detector is unsure of 6 joints: wrong for PCK, left out of the error
    result = error_of(metrics.Poses(driving.body, missed), driving)
    assert result == pytest.approx({"pck": 12 / 18, "joint_error": 0.0, "detected": 1.0})
    unsure = driving.body_scores.copy()
    unsure[:, :6] = 0.1  # the driving pose is unsure of them: not scored, whatever the detector says
    assert error_of(metrics.Poses(driving.body + [0.5, 0], missed), metrics.Poses(driving.body, unsure))[
        "pck"
    ] == pytest.approx(0.0)
    assert error_of(metrics.Poses(driving.body, missed), metrics.Poses(driving.body, unsure))["pck"] == 1.0


def test_a_frame_without_a_person_scores_0_and_is_counted():
    driving = standing(4)
    found = metrics.Poses(driving.body.copy(), driving.body_scores.copy())
    found.body_scores[1] = 0  # frame 1: nobody found
    found.body[2] += [0.05, 0]  # frame 2: 5 pixels off, 0.05 heights
    result = error_of(found, driving)
    assert result["pck"] == pytest.approx(3 / 4) and result["detected"] == pytest.approx(3 / 4)
    assert result["joint_error"] == pytest.approx(0.05 / 3)  # the mean over the three frames with a person
    nobody = metrics.Poses(driving.body, np.zeros((4, 18)))
    result = error_of(nobody, driving)
    assert result["pck"] == 0 and result["detected"] == 0 and np.isnan(result["joint_error"])


def test_pose_error_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="3 frames of detected poses for 2 driving poses"):
        error_of(standing(3), standing(2))
    empty = metrics.Poses(standing().body, np.zeros((1, 18)))
    with pytest.raises(ValueError, match="no driving pose has a confident keypoint"):
        error_of(standing(), empty)
    # A driving pose with nothing confident (the person out of view) leaves its frame out.
    driving = standing(2)
    driving.body_scores[1] = 0
    found = metrics.Poses(driving.body + [[[0.0, 0.0]], [[0.5, 0.0]]], np.ones((2, 18)))
    assert error_of(found, driving) == {"pck": 1.0, "joint_error": 0.0, "detected": 1.0}


def test_detector_scorer_detects_each_video_once_from_a_fresh_state():
    base = standing()
    driving = metrics.Poses(
        base.body + np.arange(5)[:, None, None] * [0.05, 0], np.ones((5, 18))
    )  # 5 px apart
    frames = np.zeros((5, HEIGHT, WIDTH, 3), np.uint8)
    frames[:, 0, 0, 0] = np.arange(5)  # tells the frames apart

    class Detector:
        calls, resets = 0, 0

        def reset(self):
            self.resets += 1

        def __call__(self, frame):  # finds frame t's pose 1 pixel to the right
            self.calls += 1
            t = int(frame[0, 0, 0])
            return driving.body[t] + [0.01, 0], driving.body_scores[t], None, None, None

    detector = Detector()
    figures = metrics.pose_metrics(frames, driving, detector)
    assert (detector.calls, detector.resets) == (5, 1)  # PCK and contrast share one detection
    assert figures == pytest.approx(
        {
            "pose_pck": 1.0,
            "pose_joint_error": 0.01,
            "pose_detected": 1.0,
            "pose_contrast": figures["pose_contrast"],
        }
    )
    # Frame t against pose u: 5 (t - u) + 1 pixels apart, in heights of 100 pixels.
    gaps = np.abs(0.05 * (np.arange(5)[:, None] - np.arange(5)[None]) + 0.01)
    others = (gaps.sum(1) - 0.01) / 4
    assert figures["pose_contrast"] == pytest.approx(np.mean(others - 0.01))
    metrics.pose_metrics(frames[::-1].copy(), driving, detector)
    assert (detector.calls, detector.resets) == (10, 2)
    alone = metrics.pose_error(frames, driving, detector)  # the three figures without the contrast
    assert alone == pytest.approx({k[len("pose_") :]: v for k, v in figures.items() if k != "pose_contrast"})


@pytest.fixture(scope="module")
def detector():
    with scoring_detector("mediapipe") as mediapipe:
        yield mediapipe


@pytest.fixture(scope="module")
def dancer():
    """Nine frames of a data_samples dancer, a second apart, at the tiny profile's 128x192."""
    indices = list(range(0, 72, 8))
    frames = fit(read_frames(DATA_SAMPLES / "videos" / "dancer_001.mp4", indices), 192, 128)
    track = load_keypoints(DATA_SAMPLES / "keypoints" / "dancer_001.npz")
    body = crop_keypoints(track["body"][indices], (384, 256), 192, 128)
    return frames, metrics.Poses(body, track["body_scores"][indices])


def test_mediapipe_scores_truth_above_shuffled_poses_and_a_still_video(detector, dancer):
    """Thresholds: these nine frames' figures with a margin (all 72 frames of every dancer, at two
    sizes: benchmarks/results/bench_pose_fidelity.json)."""
    frames, poses = dancer
    truth = metrics.pose_metrics(frames, poses, detector)
    shuffled = metrics.pose_metrics(frames, poses.take(np.random.default_rng(0).permutation(9)), detector)
    still = metrics.pose_metrics(np.repeat(frames[:1], 9, axis=0), poses, detector)
    assert truth["pose_detected"] == 1 and truth["pose_pck"] > 0.95 and truth["pose_joint_error"] < 0.03
    assert shuffled["pose_pck"] < 0.9 and shuffled["pose_joint_error"] > 2.5 * truth["pose_joint_error"]
    assert still["pose_pck"] < 0.8 and still["pose_joint_error"] > 3 * truth["pose_joint_error"]
    # Only a video that moves with its poses earns contrast; a still one has none.
    assert truth["pose_contrast"] > 0.04 > 0.02 > shuffled["pose_contrast"]
    assert still["pose_contrast"] == pytest.approx(0, abs=1e-12)


def test_validation_scores_the_detected_pose_against_keypoints_or_the_ground_truth(detector):
    folder = DATA_SAMPLES / "validation"
    parts = (folder / "ground_truth", folder / "pose", folder / "reference_image.png")
    known = read_validation_set(*parts, DATA_SAMPLES / "keypoints" / "validation.npz", max_frames=4)
    truth = fit(known.ground_truth, 192, 128)
    with_keypoints = score(truth, known, 192, 128, detector)
    assert with_keypoints["pose_detected"] == 1 and with_keypoints["pose_pck"] > 0.9
    assert with_keypoints["pose_joint_error"] < 0.05
    # Without keypoints, the poses detected in the ground truth drive: the truth matches them exactly.
    unknown = ValidationSet(known.reference, known.poses, known.ground_truth)
    result = score(truth, unknown, 192, 128, detector)
    assert (result["pose_pck"], result["pose_joint_error"], result["pose_detected"]) == (1, 0, 1)
    assert result["pose_contrast"] > 0
    assert set(result) - set(score(truth, unknown, 192, 128)) == {
        "pose_pck",
        "pose_joint_error",
        "pose_detected",
        "pose_contrast",
    }


def test_validate_says_when_the_pose_detector_is_missing(tmp_path, monkeypatch, capsys):
    def missing(name):
        raise ImportError("the pose detector needs MediaPipe")

    monkeypatch.setattr("cnx.validate.scoring_detector", missing)
    argv = ["validate", "--pretrained_model_name_or_path", "/nonexistent/svd", "--controlnext", str(tmp_path)]
    argv += ["--validation_dir", str(DATA_SAMPLES / "validation"), "--output_dir", str(tmp_path / "out")]
    (tmp_path / "controlnext").mkdir()
    (tmp_path / "controlnext" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert cnx([*argv, "--pose_detector", "mediapipe"]) == 2
    error = capsys.readouterr().err
    assert "cnx validate: --pose_detector mediapipe: the pose detector needs MediaPipe" in error
