import json
import sys

import numpy as np
import pytest

from cnx import pose
from cnx.pose import (
    BODY_COLORS,
    BODY_LIMBS,
    HAND_EDGE_COLORS,
    HAND_EDGES,
    HAND_POINT_COLOR,
    LIMB_BRIGHTNESS,
    align_pose,
    box_from_points,
    detection_entry,
    draw_pose,
    extract_pose_video,
    hand_boxes,
    wholebody_to_openpose,
)

H, W = 200, 160


def _only(points: dict[int, tuple[float, float]]):
    """A body where only the given keypoints are confident."""
    body = np.zeros((18, 2))
    scores = np.zeros(18)
    for i, xy in points.items():
        body[i], scores[i] = xy, 0.9
    return body, scores


def _pixel(image, xy):
    return tuple(int(v) for v in image[int(round(xy[1] * H)), int(round(xy[0] * W))])


def test_constants_follow_the_openpose_convention():
    assert len(BODY_LIMBS) == 17 and len(BODY_COLORS) == 18
    assert BODY_LIMBS[0] == (1, 2) and BODY_COLORS[0] == (255, 0, 0)  # neck-right shoulder is red
    assert BODY_LIMBS[12] == (1, 0) and BODY_COLORS[12] == (0, 0, 255)  # neck-nose is blue
    assert len(HAND_EDGES) == 20 and HAND_EDGES[:5] == ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5))
    assert sorted({p for edge in HAND_EDGES for p in edge}) == list(range(21))
    assert HAND_EDGE_COLORS[0] == (255, 0, 0) and HAND_EDGE_COLORS[10] == (0, 255, 255)


@pytest.mark.parametrize("limb", range(17))
def test_each_limb_is_drawn_in_its_dimmed_standard_colour(limb):
    a, b = BODY_LIMBS[limb]
    body, scores = _only({a: (0.2, 0.25), b: (0.8, 0.75)})
    image = draw_pose(body, scores, None, None, H, W)
    expected = tuple(int(c * LIMB_BRIGHTNESS) for c in BODY_COLORS[limb])
    assert _pixel(image, (0.5, 0.5)) == expected  # the middle of the stick
    assert _pixel(image, (0.2, 0.25)) == BODY_COLORS[a]  # joints on top at full colour
    assert _pixel(image, (0.8, 0.75)) == BODY_COLORS[b]
    assert image.shape == (H, W, 3) and image.dtype == np.uint8


def test_points_below_threshold_and_their_limbs_are_not_drawn():
    body, scores = _only({1: (0.5, 0.3), 2: (0.3, 0.3), 3: (0.3, 0.6), 4: (0.3, 0.9)})
    scores[4] = 0.2  # right wrist unsure
    image = draw_pose(body, scores, None, None, H, W)
    forearm = tuple(int(c * LIMB_BRIGHTNESS) for c in BODY_COLORS[3])
    assert _pixel(image, (0.3, 0.45)) == tuple(int(c * LIMB_BRIGHTNESS) for c in BODY_COLORS[2])
    assert not np.all(image == forearm, axis=-1).any()
    assert not np.all(image == BODY_COLORS[4], axis=-1).any()
    assert image[int(0.75 * H) :, :].max() == 0  # nothing below the elbow
    # The threshold is a parameter: lower it and the forearm appears.
    lower = draw_pose(body, scores, None, None, H, W, threshold=0.1)
    assert _pixel(lower, (0.3, 0.75)) == forearm


def test_hand_edges_are_rainbow_coloured_and_points_blue():
    hands = np.zeros((2, 21, 2))
    hand_scores = np.zeros((2, 21))
    # Left hand: the thumb chain 0-1-2-3-4 along a horizontal line, far apart.
    hands[0, :5] = [(0.1 + 0.2 * i, 0.5) for i in range(5)]
    hand_scores[0, :5] = 0.9
    body, scores = _only({})
    image = draw_pose(body, scores, hands, hand_scores, H, W)
    for edge in range(4):
        assert _pixel(image, (0.2 + 0.2 * edge, 0.5)) == HAND_EDGE_COLORS[edge]
    assert _pixel(image, (0.1, 0.5)) == HAND_POINT_COLOR
    assert image[: H // 3].max() == 0 and image[2 * H // 3 :].max() == 0
    hand_scores[0, 2] = 0.1  # an unsure point drops its dot and both of its edges
    image = draw_pose(body, scores, hands, hand_scores, H, W)
    assert _pixel(image, (0.5, 0.5)) == (0, 0, 0)
    assert _pixel(image, (0.4, 0.5)) == (0, 0, 0) and _pixel(image, (0.6, 0.5)) == (0, 0, 0)
    assert _pixel(image, (0.2, 0.5)) == HAND_EDGE_COLORS[0]


def test_draw_pose_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"body must have shape \(18, 2\)"):
        draw_pose(np.zeros((17, 2)), np.zeros(17), None, None, H, W)
    with pytest.raises(ValueError, match="hand_scores"):
        draw_pose(np.zeros((18, 2)), np.zeros(18), np.zeros((2, 21, 2)), np.zeros((21,)), H, W)


def _reference(rng):
    body = rng.uniform(0.3, 0.7, size=(18, 2))
    return body, np.full(18, 0.9)


def test_align_maps_a_scaled_shifted_copy_back_onto_the_reference():
    rng = np.random.default_rng(0)
    ref_body, ref_scores = _reference(rng)
    ref_size, drv_size = (400, 300), (720, 1280)  # (H, W): different sizes and aspect ratios
    ref_px = ref_body * [ref_size[1], ref_size[0]]
    scale, shift = 1.7, np.array([250.0, -40.0])
    drv_px = scale * ref_px + shift
    driving = np.repeat((drv_px / [drv_size[1], drv_size[0]])[None], 5, axis=0)  # (F, 18, 2)
    hands = np.repeat(driving[:, None, :1].repeat(21, axis=2), 2, axis=1)  # (F, 2, 21, 2) at the nose
    aligned = align_pose(
        driving,
        np.full((5, 18), 0.9),
        ref_body,
        ref_scores,
        hands,
        driving_size=drv_size,
        reference_size=ref_size,
    )
    np.testing.assert_allclose(aligned.body, np.repeat(ref_body[None], 5, axis=0), atol=1e-9)
    np.testing.assert_allclose(aligned.hands, np.broadcast_to(ref_body[0], (5, 2, 21, 2)), atol=1e-9)
    assert aligned.scale == pytest.approx(1 / scale)


def test_align_scale_ignores_sway_and_missing_keypoints():
    """Each frame is centred on itself, so a swaying dancer is not judged smaller than it is."""
    rng = np.random.default_rng(1)
    ref_body, ref_scores = _reference(rng)
    ref_scores[16] = 0.0  # the reference shows no right ear
    sway = np.stack([np.array([0.1 * np.sin(f), 0.05 * np.cos(f)]) for f in range(8)])  # (F, 2)
    driving = 0.5 * ref_body[None] + 0.2 + sway[:, None, :]
    driving_scores = np.full((8, 18), 0.9)
    driving_scores[0, [0, 14]] = 0.1  # nose and right eye missing in the first frame
    driving_scores[3, :] = 0.0  # a frame with no person
    aligned = align_pose(driving, driving_scores, ref_body, ref_scores)
    assert aligned.scale == pytest.approx(2.0)
    np.testing.assert_allclose(aligned.body[0], ref_body, atol=1e-9)  # anchor: the first frame
    # anchor="mean": the average usable frame lands on the reference; each frame keeps its sway.
    mean = align_pose(driving, driving_scores, ref_body, ref_scores, anchor="mean")
    usable_sway = sway[[0, 1, 2, 4, 5, 6, 7]].mean(axis=0)
    np.testing.assert_allclose(mean.body, ref_body[None] + 2 * (sway - usable_sway)[:, None, :], atol=1e-9)


def test_align_explains_when_nothing_matches():
    rng = np.random.default_rng(2)
    ref_body, ref_scores = _reference(rng)
    with pytest.raises(ValueError, match="no frame shares two confident keypoints"):
        align_pose(ref_body[None], np.zeros((1, 18)), ref_body, ref_scores)
    with pytest.raises(ValueError, match=r"\(F, 18, 2\)"):
        align_pose(ref_body, ref_scores, ref_body, ref_scores)


def test_box_from_points_pads_clips_and_orders():
    points = np.array([[0.5, 0.4], [0.6, 0.2], [0.55, 0.3]])
    (x0, y0), (x1, y1) = box_from_points(points, margin=0.1)
    assert (x0, y0, x1, y1) == pytest.approx((0.48, 0.18, 0.62, 0.42))
    (x0, y0), (x1, y1) = box_from_points([[0.95, -0.1], [1.2, 0.05]], margin=0.0)
    assert (x0, y0, x1, y1) == pytest.approx((0.95, 0.0, 1.0, 0.05))
    (x0, y0), (x1, y1) = box_from_points([[1.3, 0.5], [1.4, 0.6]])  # hand outside the frame
    assert x0 <= x1 and y0 <= y1 and x0 == 1.0
    with pytest.raises(ValueError, match="N >= 1"):
        box_from_points(np.zeros((0, 2)))


def test_hand_boxes_and_detection_entry_follow_the_seed_schema():
    hands = np.zeros((2, 21, 2))
    hands[0] = np.linspace([0.1, 0.2], [0.2, 0.3], 21)
    hands[1] = np.linspace([0.7, 0.6], [0.8, 0.8], 21)
    boxes = hand_boxes(hands, margin=0.0)
    assert boxes[0] == [[pytest.approx(0.1), pytest.approx(0.2)], [pytest.approx(0.2), pytest.approx(0.3)]]
    assert boxes[1] == [[pytest.approx(0.7), pytest.approx(0.6)], [pytest.approx(0.8), pytest.approx(0.8)]]
    scores = np.linspace(0.1, 0.9, 42).reshape(2, 21)
    entry = detection_entry([[0.2, 0.1], [0.9, 0.95]], hands, scores)
    assert set(entry) == {"boxes", "hands_boxes", "hands_score"}
    assert entry["boxes"] == [[[0.2, 0.1], [0.9, 0.95]]]
    assert len(entry["hands_boxes"]) == 2 and [len(s) for s in entry["hands_score"]] == [21, 21]
    assert entry["hands_score"][1][-1] == pytest.approx(0.9)
    json.dumps(entry)  # plain json types only
    assert detection_entry(None, hands, scores)["boxes"] == []
    with pytest.raises(ValueError, match="not ordered"):
        detection_entry([[0.9, 0.1], [0.2, 0.95]], hands, scores)


def test_wholebody_to_openpose_reorders_and_builds_the_neck():
    keypoints = np.stack([np.arange(133) * 2.0, np.arange(133) * 1.0], axis=1)  # (133, 2) pixels
    scores = np.linspace(0.0, 1.0, 133)
    body, body_scores, hands, hand_scores = wholebody_to_openpose(keypoints, scores, height=200, width=400)
    assert body[2] == pytest.approx(keypoints[6] / [400, 200])  # right shoulder is COCO 6
    assert body[14] == pytest.approx(keypoints[2] / [400, 200])  # right eye is COCO 2
    assert body[1] == pytest.approx((keypoints[5] + keypoints[6]) / 2 / [400, 200])  # neck
    assert body_scores[1] == pytest.approx(scores[5])  # the weaker shoulder
    assert hands[0, 0] == pytest.approx(keypoints[91] / [400, 200])  # left hand first
    assert hand_scores[1, -1] == pytest.approx(scores[132])


def test_load_dwpose_detector_explains_the_optional_extra(tmp_path, monkeypatch):
    det, pose_model = tmp_path / "det.onnx", tmp_path / "pose.onnx"
    with pytest.raises(FileNotFoundError, match="det.onnx"):
        pose.load_dwpose_detector(det, pose_model)
    det.write_bytes(b"x")
    pose_model.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "rtmlib", None)  # as on a machine without the extra
    with pytest.raises(ImportError, match="pip install rtmlib onnxruntime"):
        pose.load_dwpose_detector(det, pose_model)


def test_extract_pose_video_with_a_stand_in_detector(tmp_path):
    from cnx.synth import dancer_keypoints, random_dancer, render_frame
    from cnx.video import read_frames, write_video

    dancer = random_dancer(np.random.default_rng(5), num_frames=6, width=96, height=128)
    frames, boxes = zip(*(render_frame(dancer, t) for t in range(6)), strict=True)
    video = write_video(tmp_path / "clip.mp4", frames, fps=8)
    known = [dancer_keypoints(dancer, t) for t in range(6)]
    seen = []

    def detector(frame):  # stands in for DWPose: knows the true pose of each frame it is shown
        t = len(seen)
        seen.append(frame.shape)
        k = known[t]
        return k.body, k.body_scores, k.hands, k.hand_scores, boxes[t]

    entries = extract_pose_video(
        video, tmp_path / "out" / "pose.mp4", tmp_path / "out" / "meta.json", detector
    )
    assert seen == [(128, 96, 3)] * 6
    written = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert written == entries and len(written) == 6
    for t, entry in enumerate(written):
        assert entry == detection_entry(boxes[t], known[t].hands, known[t].hand_scores)
    pose_frames = read_frames(tmp_path / "out" / "pose.mp4")  # (F, H, W, 3)
    drawn = np.stack([draw_pose(k.body, k.body_scores, k.hands, k.hand_scores, 128, 96) for k in known])
    assert pose_frames.shape == drawn.shape
    error = np.abs(pose_frames.astype(float) - drawn).mean()
    swapped = np.abs(pose_frames.astype(float) - drawn[..., ::-1]).mean()  # BGR by mistake
    assert error < 3.0 and error < 0.3 * swapped

    def broken(frame):
        return known[0].body, known[0].body_scores

    with pytest.raises(ValueError, match=r"clip.mp4 frame 0: the detector must return"):
        extract_pose_video(video, tmp_path / "bad.mp4", tmp_path / "bad.json", broken)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        extract_pose_video(tmp_path / "missing.mp4", tmp_path / "x.mp4", tmp_path / "x.json", detector)
