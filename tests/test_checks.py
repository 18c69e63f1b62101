"""`cnx check-data`: one line per problem, a summary, exit 1 when any entry is bad."""

from __future__ import annotations

import json

import numpy as np
import pytest
from clip_fixtures import (
    corrupt_middle,
    detections_json,
    noise_frames,
    write_dataset,
    write_entry,
    write_meta_info,
)

from cnx import checks, data
from cnx.checks import aspect_problem, check_meta_info, container_info, detection_problems
from cnx.cli import main as cnx_main
from cnx.meta import FrameDetections


def frame(boxes=(), hands=(), scores=()) -> FrameDetections:
    return FrameDetections(
        boxes=np.array(boxes, float).reshape(-1, 2, 2),
        hands_boxes=np.array(hands, float).reshape(-1, 2, 2),
        hands_score=np.array(scores, float).reshape(len(hands), 21),
    )


def test_good_dataset_passes(tmp_path, capsys):
    path = write_dataset(tmp_path, num_entries=2, num_frames=20)
    args = ["check-data", "--meta_info_path", str(path), "--sample_n_frames", "8", "--interval_frame", "2"]
    assert cnx_main([*args, "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{path}: checked 2 entries, 0 bad, 2 good"]


def test_broken_dataset_prints_one_line_per_problem_and_exits_1(tmp_path, capsys):
    entries = [write_entry(tmp_path, f"clip{i}", num_frames=20) for i in range(7)]
    entries[5] = write_entry(tmp_path, "clip5", num_frames=20, pose_frames=45)  # 25 frames apart
    entries[6] = write_entry(tmp_path, "clip6", num_frames=6)  # too short for 8 frames
    path = write_meta_info(tmp_path, entries)
    (tmp_path / "videos" / "clip1.mp4").unlink()  # missing video
    (tmp_path / "meta" / "clip2.json").write_text('[{"boxes": []')  # truncated json
    (tmp_path / "poses" / "clip3.mp4").write_bytes(b"\x00" * 100)  # undecodable
    bad_boxes = detections_json(20, hands=[([[0.5, 0.5], [0.4, 1.2]], 0.9)])  # unordered, off frame
    (tmp_path / "meta" / "clip4.json").write_text(json.dumps(bad_boxes[:18]))  # and 2 frames short
    code = cnx_main(["check-data", "--meta_info_path", str(path), "--sample_n_frames", "8", "--quiet"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1

    def line(i: int, text: str) -> None:
        prefix = f"entry {i} ({tmp_path / 'videos' / f'clip{i}.mp4'}): "
        assert any(x.startswith(prefix) and text in x for x in lines), (i, text, lines)

    line(1, f"video does not exist: {tmp_path / 'videos' / 'clip1.mp4'}")
    line(2, "cannot read detection json")
    line(3, f"pose video: {tmp_path / 'poses' / 'clip3.mp4'}: cannot open video")
    line(4, "detections cover 18 frames but the video has 20")
    line(4, "hands_boxes outside [0, 1] (normalised coordinates expected) in 18 frames (first: frame 0)")
    line(4, "hands_boxes not ordered")
    # The culprit file is named: the pose video whose length is wrong, the video that is too short.
    pose5 = tmp_path / "poses" / "clip5.mp4"
    line(5, f"pose video {pose5} has 45 frames, video has 20: they differ by 25 (must be under 25)")
    line(6, f"{tmp_path / 'videos' / 'clip6.mp4'}: only 6 usable frames, fewer than sample_n_frames=8")
    assert not any(x.startswith("entry 0 ") for x in lines)
    assert lines[-1] == f"{path}: checked 7 entries, 6 bad, 1 good"


def test_corrupt_stream_is_reported_by_the_full_check_only(tmp_path):
    entry = write_entry(tmp_path, "noisy", num_frames=30, video=noise_frames(30), detections=False)
    path = write_meta_info(tmp_path, [entry])
    corrupt_middle(tmp_path / "videos" / "noisy.mp4")
    assert check_meta_info(path, sample_n_frames=8, decode=False).ok  # the container still opens
    report = check_meta_info(path, sample_n_frames=8, decode=True)
    assert [p.index for p in report.errors] == [0]
    assert "video: " in report.errors[0].message and "cannot decode video" in report.errors[0].message


def test_cheap_checks_skip_decoding_and_detections(tmp_path):
    path = write_dataset(tmp_path, num_entries=1, num_frames=12)
    (tmp_path / "meta" / "clip0.json").write_text("[")
    assert check_meta_info(path, sample_n_frames=4, decode=False).ok
    report = check_meta_info(path, sample_n_frames=4, decode=True)
    assert not report.ok and report.bad_entries == [0]


def test_warnings_are_reported_but_do_not_fail(tmp_path, capsys):
    path = write_dataset(tmp_path, num_entries=1, num_frames=12)
    args = ["check-data", "--meta_info_path", str(path), "--sample_n_frames", "8", "--interval_frame", "3"]
    assert cnx_main([*args, "--width", "576", "--height", "1024", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    video = tmp_path / "videos" / "clip0.mp4"
    assert any(f"warning: {video}: 12 usable frames are too few" in x and "shrinks to 1" in x for x in lines)
    assert any(f"warning: {video}: frames (64x96) are smaller than the 576x1024 output" in x for x in lines)
    assert lines[-1].endswith("0 bad, 1 good (2 warnings)")


def test_unreadable_meta_info_is_a_file_level_error(tmp_path, capsys):
    path = tmp_path / "meta_info.json"
    path.write_text('{"video_path": "a.mp4"}')
    assert cnx_main(["check-data", "--meta_info_path", str(path), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"{path}: meta_info must be a json list of entries, got dict" in out


def test_detection_problems_rules():
    ok = frame(boxes=[[[0.2, 0.26], [0.66, 1.098]]], hands=[[[0.1, 0.1], [0.2, 0.2]]], scores=[[0.7] * 21])
    assert detection_problems([ok, ok], num_frames=2) == []  # the original example's overhanging box is fine
    assert detection_problems([ok], num_frames=2) == ["detections cover 1 frames but the video has 2"]
    pixels = frame(boxes=[[[120, 80], [400, 900]]])
    assert detection_problems([pixels], 1) == [
        "boxes outside [-0.25, 1.25] (normalised coordinates expected) in 1 frames (first: frame 0)"
    ]
    nan = frame(hands=[[[0.1, 0.1], [0.2, 0.2]]], scores=[[np.nan] * 21])
    assert detection_problems([ok, nan, nan], 3) == [
        "hands_score with non-finite values in 2 frames (first: frame 1)"
    ]
    swapped = frame(hands=[[[0.3, 0.1], [0.2, 0.2]]], scores=[[0.9] * 21])
    assert detection_problems([swapped], 1) == [
        "hands_boxes not ordered as [[x0, y0], [x1, y1]] with x0 <= x1, y0 <= y1 in 1 frames (first: frame 0)"
    ]


def test_container_info_reads_metadata(tmp_path):
    write_dataset(tmp_path, num_entries=1, num_frames=13)
    info = container_info(tmp_path / "videos" / "clip0.mp4")
    assert (info.num_frames, info.width, info.height) == (13, 64, 96)


@pytest.mark.parametrize("decode", [False, True])
def test_dataset_and_check_data_report_the_same_messages(tmp_path, decode):
    """The Dataset's construction-time errors are check-data's cheap messages, word for word."""
    from cnx.checks import DataCheckError
    from cnx.data import ClipDataset

    entries = [
        write_entry(tmp_path, "a", num_frames=5),
        {"video_path": "videos/x.mp4", "guide_path": "y.mp4"},
    ]
    path = write_meta_info(tmp_path, entries)
    report = check_meta_info(path, sample_n_frames=8, interval_frame=1, decode=decode)
    with pytest.raises(DataCheckError) as info:
        ClipDataset(path, 64, 96, sample_n_frames=8, interval_frame=1)
    assert str(info.value).splitlines() == [str(p) for p in report.errors] + [report.summary()]


def test_pose_video_of_another_aspect_ratio_is_an_error(tmp_path, capsys):
    """One crop window in normalised coordinates fits both videos only when they frame the same view."""
    entries = [
        write_entry(tmp_path, "same", num_frames=12, size=(128, 192), pose_size=(64, 96)),  # resolution only
        write_entry(tmp_path, "square", num_frames=12, size=(128, 192), pose_size=(128, 128)),
    ]
    path = write_meta_info(tmp_path, entries)
    pose = tmp_path / "poses" / "square.mp4"
    for decode in (False, True):
        report = check_meta_info(path, sample_n_frames=4, decode=decode)
        assert report.bad_entries == [1]
        assert report.errors[0].message.startswith(
            f"pose video {pose} is 128x128 (aspect 1.000), video is 128x192 (aspect 0.667): "
            "aspect ratios differ by 50.0%"
        )
    assert cnx_main(["check-data", "--meta_info_path", str(path), "--quiet"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(
        x.startswith(f"entry 1 ({tmp_path / 'videos' / 'square.mp4'}): pose video {pose} is 128x128")
        for x in lines
    )


def test_aspect_problem_allows_under_1_percent():
    assert aspect_problem((1080, 1920), (512, 910)) is None  # even-size rounding: 0.02%
    assert aspect_problem((128, 192), (130, 194)) is None  # 0.5%
    assert aspect_problem((128, 192), (132, 194)) is not None  # 2.1%
    assert "differ by 25.0%" in aspect_problem((1920, 1080), (1080, 810))  # 4:3 pose for a 16:9 video


@pytest.mark.parametrize(("given", "missing"), [("--width", "--height"), ("--height", "--width")])
def test_width_and_height_go_together(tmp_path, capsys, given, missing):
    path = write_dataset(tmp_path, num_entries=1, num_frames=12)
    with pytest.raises(SystemExit) as info:
        checks.main(["--meta_info_path", str(path), given, "64", "--quiet"])
    assert info.value.code == 2
    assert f"{given} needs {missing} too" in capsys.readouterr().err


def test_spacing_warning_uses_the_datasets_rule(tmp_path):
    """check-data warns about a shrinking spacing exactly when the dataset would shrink it."""
    assert data.fitted_interval is checks.fitted_interval and data.clip_span is checks.clip_span
    path = write_dataset(tmp_path, num_entries=1, num_frames=12)
    assert check_meta_info(path, sample_n_frames=1, interval_frame=50, decode=False).problems == []
    assert data.fitted_interval(12, 1, 50) == 50  # a one-frame clip never shrinks its spacing
    (warning,) = check_meta_info(path, sample_n_frames=4, interval_frame=5, decode=False).problems
    assert warning.warning and f"spacing shrinks to {data.fitted_interval(12, 4, 5)}" in warning.message
