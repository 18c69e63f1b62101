"""Reading meta_info.json and detection json, and `cnx build-meta`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cnx.cli import main as cnx_main
from cnx.meta import MetaInfoError, build_meta, parse_meta_info, read_detections, read_meta_info


def test_relative_paths_resolve_against_the_json_folder(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "meta_info.json"
    entries = [
        {"video_path": "v/a.mp4", "guide_path": "p/a.mp4", "meta_info": "m/a.json"},
        {"video_path": "/abs/b.mp4", "guide_path": "p/b.mp4"},
    ]
    path.write_text(json.dumps(entries))
    monkeypatch.chdir(tmp_path)  # not the json's folder
    a, b = read_meta_info("data/meta_info.json")
    assert a.index == 0 and a.video_path == folder.resolve() / "v/a.mp4"
    assert a.guide_path == folder.resolve() / "p/a.mp4" and a.meta_info == folder.resolve() / "m/a.json"
    assert str(b.video_path) == "/abs/b.mp4" and b.meta_info is None


def test_shape_and_key_problems_are_listed_per_entry(tmp_path):
    path = tmp_path / "meta_info.json"
    entries = [
        {"video_path": "a.mp4", "guide_path": "pa.mp4"},
        {"video_path": "b.mp4"},
        "c.mp4",
        {"video_path": "d.mp4", "guide_path": 3},
        {"video_path": "e.mp4", "guide_path": "pe.mp4", "meta": "e.json"},
    ]
    path.write_text(json.dumps(entries))
    good, problems = parse_meta_info(path)
    assert [e.index for e in good] == [0, 4]  # entry 4 only has a warning
    text = [str(p) for p in problems]
    assert text[0] == f"entry 1 ({tmp_path / 'b.mp4'}): missing key 'guide_path'"
    assert text[1].startswith("entry 2 (") and "must be a json object" in text[1]
    assert text[2].startswith(f"entry 3 ({tmp_path / 'd.mp4'}): 'guide_path' must be a non-empty string")
    assert problems[3].warning and "unknown keys ['meta']" in text[3]
    with pytest.raises(MetaInfoError) as info:
        read_meta_info(path)
    assert len(str(info.value).splitlines()) == 3  # errors only, not the warning


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "does not exist"), ("{", "cannot read meta_info json"), ('{"a": 1}', "must be a json list")],
)
def test_unusable_meta_info_file_raises_naming_it(tmp_path, content, expected):
    path = tmp_path / "meta_info.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(MetaInfoError, match=expected) as info:
        parse_meta_info(path)
    assert str(path) in str(info.value)


def test_read_detections_in_the_seed_schema(tmp_path):
    frames = [
        {
            "boxes": [[[0.2, 0.26], [0.66, 1.098]]],
            "hands_boxes": [[[0.28, 0.27], [0.38, 0.34]], [[0.31, 0.29], [0.37, 0.35]]],
            "hands_score": [[0.8] * 21, [0.4] * 20 + [0.6]],
        },
        {"boxes": [], "hands_boxes": [], "hands_score": []},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(frames))
    first, empty = read_detections(path)
    assert first.boxes.shape == (1, 2, 2) and first.hands_boxes.shape == (2, 2, 2)
    assert first.hands_score.shape == (2, 21)
    assert np.allclose(first.hands_confidence, [0.8, (0.4 * 20 + 0.6) / 21])
    assert empty.hands_boxes.shape == (0, 2, 2) and empty.hands_confidence.shape == (0,)


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"boxes": [], "hands_boxes": []}, r"frame 1: missing keys \['hands_score'\]"),
        ({"boxes": [[0.1, 0.2]], "hands_boxes": [], "hands_score": []}, r"frame 1: 'boxes' must be"),
        (
            {"boxes": [], "hands_boxes": [[[0, 0], [1, 1]]], "hands_score": []},
            "1 hands_boxes but 0 hands_score",
        ),
        ({"boxes": [], "hands_boxes": [], "hands_score": "x"}, "'hands_score' must be"),
        ([1, 2], "frame 1: must be a json object"),
    ],
)
def test_bad_detections_raise_naming_file_and_frame(tmp_path, frame, expected):
    good = {"boxes": [], "hands_boxes": [], "hands_score": []}
    path = tmp_path / "d.json"
    path.write_text(json.dumps([good, frame]))
    with pytest.raises(MetaInfoError, match=expected) as info:
        read_detections(path)
    assert str(path) in str(info.value)


def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_build_meta_matches_by_stem_and_reports_unmatched(tmp_path):
    _touch(tmp_path / "train", "A.mp4", "B.mp4", "C.mp4", "notes.txt")
    _touch(tmp_path / "train_pose", "A.mp4", "B.mp4", "D.mp4")
    _touch(tmp_path / "train_meta", "A.json", "E.json")
    out = tmp_path / "meta_info.json"
    report = build_meta(tmp_path / "train", tmp_path / "train_pose", out, meta_dir=tmp_path / "train_meta")
    written = json.loads(out.read_text())
    assert written == [
        {"video_path": "train/A.mp4", "guide_path": "train_pose/A.mp4", "meta_info": "train_meta/A.json"},
        {"video_path": "train/B.mp4", "guide_path": "train_pose/B.mp4"},
    ]
    assert [p.name for p in report.videos_without_pose] == ["C.mp4"]
    assert [p.name for p in report.poses_without_video] == ["D.mp4"]
    assert [p.name for p in report.videos_without_meta] == ["B.mp4", "C.mp4"]
    assert [p.name for p in report.metas_without_video] == ["E.json"]
    entries = read_meta_info(out)  # what build-meta writes, the reader reads
    assert entries[0].video_path == (tmp_path / "train/A.mp4").resolve()


def test_build_meta_command(tmp_path, capsys):
    _touch(tmp_path / "v", "a.mp4", "b.mp4")
    _touch(tmp_path / "p", "a.mp4")
    out = tmp_path / "sub" / "meta_info.json"
    args = ["build-meta", "--video_dir", str(tmp_path / "v"), "--pose_dir", str(tmp_path / "p")]
    assert cnx_main([*args, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"unmatched video without pose video: {tmp_path / 'v' / 'b.mp4'}" in printed
    assert "wrote 1 entries" in printed
    assert json.loads(out.read_text())[0]["video_path"] == "../v/a.mp4"
    _touch(tmp_path / "q", "z.mp4")
    nothing = ["build-meta", "--video_dir", str(tmp_path / "v"), "--pose_dir", str(tmp_path / "q")]
    assert cnx_main([*nothing, "--output", str(tmp_path / "none.json")]) == 1
    assert not (tmp_path / "none.json").exists()


def test_build_meta_refuses_ambiguous_stems(tmp_path):
    _touch(tmp_path / "v", "a.mp4", "a.mov")
    _touch(tmp_path / "p", "a.mp4")
    with pytest.raises(MetaInfoError, match="two files share the stem 'a'"):
        build_meta(tmp_path / "v", tmp_path / "p", tmp_path / "m.json")
