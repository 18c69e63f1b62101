import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnx import cli
from cnx.meta import HAND_THRESHOLD
from cnx.pose import draw_pose, load_keypoints
from cnx.profiles import DATA_SAMPLES
from cnx.synth import (
    VALIDATION_FRAMES,
    dancer_keypoints,
    random_dancer,
    write_samples,
)
from cnx.video import read_frames

SHIPPED = Path(DATA_SAMPLES)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    """The shipped set's exact command, run again: `cnx samples OUT_DIR` with the defaults."""
    out = tmp_path_factory.mktemp("samples")
    assert cli.main(["samples", str(out)]) == 0
    return out


def _entries(root: Path) -> list[dict]:
    return json.loads((root / "meta_info.json").read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shipped_meta_info_lists_existing_files():
    entries = _entries(SHIPPED)
    assert len(entries) == 8
    for entry in entries:
        assert set(entry) == {"video_path", "guide_path", "meta_info"}
        for key in entry.values():
            assert not Path(key).is_absolute()  # relative to the json's folder
            assert (SHIPPED / key).is_file(), key


def test_shipped_samples_are_reproducible(regenerated):
    """Regenerating with the README's command gives the same videos (within codec tolerance)."""
    assert _entries(regenerated) == _entries(SHIPPED)
    for entry in _entries(SHIPPED):
        for key in ("video_path", "guide_path"):
            shipped = read_frames(SHIPPED / entry[key])  # (F, H, W, 3)
            again = read_frames(regenerated / entry[key])
            assert shipped.shape == again.shape and shipped.shape[0] >= 64, entry[key]
            assert shipped.shape[1:] == (384, 256, 3)
            assert np.abs(shipped.astype(float) - again).mean() < 1.0, entry[key]
        shipped_meta = json.loads((SHIPPED / entry["meta_info"]).read_text())
        again_meta = json.loads((regenerated / entry["meta_info"]).read_text())
        for a, b in zip(shipped_meta, again_meta, strict=True):
            np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)
            np.testing.assert_allclose(a["hands_boxes"], b["hands_boxes"], atol=1e-4)
            np.testing.assert_allclose(a["hands_score"], b["hands_score"], atol=1e-4)
    for name in sorted(p.name for p in (SHIPPED / "keypoints").glob("*.npz")):
        shipped, again = (
            load_keypoints(SHIPPED / "keypoints" / name),
            load_keypoints(regenerated / "keypoints" / name),
        )
        for key in shipped:
            np.testing.assert_allclose(shipped[key], again[key], atol=1e-5, err_msg=f"{name}:{key}")
    for j in range(VALIDATION_FRAMES):
        for folder in ("ground_truth", "pose"):
            a = np.asarray(Image.open(SHIPPED / "validation" / folder / f"{j}.png"), dtype=float)
            b = np.asarray(Image.open(regenerated / "validation" / folder / f"{j}.png"), dtype=float)
            assert np.abs(a - b).mean() < 1.0


def test_detection_json_follows_the_seed_schema():
    hand_means = []
    for entry in _entries(SHIPPED):
        frames = json.loads((SHIPPED / entry["meta_info"]).read_text())
        assert len(frames) == len(read_frames(SHIPPED / entry["video_path"]))  # one entry per frame
        for frame in frames:
            assert set(frame) == {"boxes", "hands_boxes", "hands_score"}
            assert len(frame["boxes"]) == 1 and len(frame["hands_boxes"]) == 2
            for (x0, y0), (x1, y1) in frame["boxes"] + frame["hands_boxes"]:
                assert 0.0 <= x0 <= x1 <= 1.0 and 0.0 <= y0 <= y1 <= 1.0
            assert [len(scores) for scores in frame["hands_score"]] == [21, 21]
            assert all(0.0 <= s <= 1.0 for scores in frame["hands_score"] for s in scores)
            hand_means += [np.mean(scores) for scores in frame["hands_score"]]
    below = np.mean(np.array(hand_means) < HAND_THRESHOLD)
    assert 0.05 < below < 0.6  # some hands are unsure (turned away), most are not


def test_person_box_holds_the_body_and_hand_boxes_hold_the_hands():
    entry = _entries(SHIPPED)[0]
    frames = json.loads((SHIPPED / entry["meta_info"]).read_text())
    known = load_keypoints(SHIPPED / "keypoints" / (Path(entry["video_path"]).stem + ".npz"))
    for t, frame in enumerate(frames):
        (x0, y0), (x1, y1) = frame["boxes"][0]
        body = known["body"][t]
        assert (body >= [x0 - 1e-3, y0 - 1e-3]).all() and (body <= [x1 + 1e-3, y1 + 1e-3]).all()
        for ((hx0, hy0), (hx1, hy1)), hand in zip(frame["hands_boxes"], known["hands"][t], strict=True):
            assert (hand >= [hx0 - 1e-4, hy0 - 1e-4]).all() and (hand <= [hx1 + 1e-4, hy1 + 1e-4]).all()


def test_pitfall_15_pose_video_colours_match_draw_pose():
    """Decoded pose videos (decord, RGB) show draw_pose's colours for the known keypoints, not BGR."""
    for entry in _entries(SHIPPED)[:3]:
        known = load_keypoints(SHIPPED / "keypoints" / (Path(entry["video_path"]).stem + ".npz"))
        decoded = read_frames(SHIPPED / entry["guide_path"]).astype(float)  # (F, H, W, 3)
        height, width = known["size"]
        drawn = np.stack(
            [
                draw_pose(
                    known["body"][t],
                    known["body_scores"][t],
                    known["hands"][t],
                    known["hand_scores"][t],
                    height,
                    width,
                )
                for t in range(len(decoded))
            ]
        ).astype(float)
        error = np.abs(decoded - drawn).mean()
        assert error < 1.5 and error < 0.3 * np.abs(decoded - drawn[..., ::-1]).mean()


def test_keypoints_are_recomputable_from_the_seed():
    known = load_keypoints(SHIPPED / "keypoints" / "dancer_003.npz")
    assert known["body"].shape == (72, 18, 2) and known["hands"].shape == (72, 2, 21, 2)
    assert tuple(known["size"]) == (384, 256) and known["fps"] == 8
    dancer = random_dancer(np.random.default_rng([0, 3]), 72, 256, 384, 8)
    for t in (0, 31, 71):
        k = dancer_keypoints(dancer, t)
        np.testing.assert_array_equal(k.body, known["body"][t])
        np.testing.assert_array_equal(k.hand_scores, known["hand_scores"][t])
    for name in ("body", "hands"):
        assert known[name].min() >= 0.0 and known[name].max() <= 1.0  # the whole dancer is in frame


@pytest.mark.parametrize("clip", range(8))
def test_dancers_move_smoothly_but_really_dance(clip):
    known = load_keypoints(SHIPPED / "keypoints" / f"dancer_{clip:03d}.npz")
    body = known["body"] * [256, 384]  # (F, 18, 2) pixels
    height = body[:, [10, 13], 1].mean() - body[:, 0, 1].mean()  # nose to ankles
    step = np.linalg.norm(np.diff(body, axis=0), axis=-1)  # (F-1, 18) pixels per frame
    assert step[:, 1].max() < 0.05 * height  # the trunk sways gently
    assert step.max() < 0.2 * height  # even waving hands do not jump
    assert np.ptp(body[:, [4, 7]], axis=0).max() > 0.15 * height  # but the arms do travel
    hand_means = known["hand_scores"].mean(axis=-1)  # (F, 2)
    assert hand_means.std(axis=0).min() > 0.01  # hand confidence changes over the clip


def test_validation_folder_has_the_seed_layout():
    folder = SHIPPED / "validation"
    known = load_keypoints(SHIPPED / "keypoints" / "validation.npz")
    assert known["body"].shape[0] == VALIDATION_FRAMES
    for j in range(VALIDATION_FRAMES):
        truth = np.asarray(Image.open(folder / "ground_truth" / f"{j}.png"))
        pose_image = np.asarray(Image.open(folder / "pose" / f"{j}.png"))
        assert truth.shape == pose_image.shape == (384, 256, 3)
        drawn = draw_pose(
            known["body"][j], known["body_scores"][j], known["hands"][j], known["hand_scores"][j], 384, 256
        )
        np.testing.assert_array_equal(pose_image, drawn)  # PNG is lossless
    reference = np.asarray(Image.open(folder / "reference_image.png"))
    np.testing.assert_array_equal(reference, np.asarray(Image.open(folder / "ground_truth" / "0.png")))
    # The validation dancer is nobody from the training clips.
    first = read_frames(SHIPPED / _entries(SHIPPED)[0]["video_path"], [0])[0]
    assert np.abs(first.astype(float) - reference).mean() > 10


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    small = dict(num_clips=2, num_frames=4, width=64, height=96)  # the tiny profile's size
    write_samples(tmp_path / "a", seed=7, **small)
    write_samples(tmp_path / "b", seed=7, **small)
    write_samples(tmp_path / "c", seed=8, **small)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b and len(a) == 2 * 4 + 2 * VALIDATION_FRAMES + 2 + 1  # clips x 4 files, validation, json
    assert a.keys() == c.keys()
    for name in ("videos/dancer_000.mp4", "poses/dancer_001.mp4", "validation/reference_image.png"):
        assert a[name] != c[name]


def test_cli_writes_and_says_where(tmp_path, capsys):
    out = tmp_path / "mine"
    args = ["samples", str(out), "--seed", "3", "--num_clips", "1", "--num_frames", "3"]
    assert cli.main(args + ["--width", "64", "--height", "96"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "meta_info.json") in printed and str(out / "validation") in printed
    assert read_frames(out / "poses" / "dancer_000.mp4").shape == (3, 96, 64, 3)
    with pytest.raises(SystemExit) as error:
        cli.main(["samples", str(out), "--width", "63"])
    assert error.value.code == 2
