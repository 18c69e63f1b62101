"""cnx.metrics: ground-truth metrics against their formulas, and control fidelity's sensitivity to pose."""

import numpy as np
import PIL.Image
import pytest
import torch

from cnx import metrics
from cnx.data import crop_resize, crop_window
from cnx.pose import load_keypoints
from cnx.profiles import DATA_SAMPLES

VALIDATION = DATA_SAMPLES / "validation"


def noisy_pair(seed=0, shape=(4, 32, 24, 3), noise=0.05):
    rng = np.random.default_rng(seed)
    target = rng.uniform(0.2, 0.8, shape)
    return np.clip(target + rng.normal(0, noise, shape), 0, 1), target


def test_psnr_ssim_l1_match_their_definitions():
    pred, target = noisy_pair()
    mse = ((pred - target) ** 2).reshape(len(pred), -1).mean(1)
    np.testing.assert_allclose(metrics.psnr(pred, target), 10 * np.log10(1 / mse), rtol=1e-4)
    np.testing.assert_allclose(
        metrics.l1(pred, target), np.abs(pred - target).reshape(len(pred), -1).mean(1), rtol=1e-5
    )
    values = metrics.ssim(pred, target)
    assert values.shape == (4,) and (values < 1).all() and (values > 0).all()
    np.testing.assert_allclose(metrics.ssim(target, target), 1.0, atol=1e-6)
    # uint8 frames are read as value / 255, the same numbers as floats.
    as_uint8 = np.round(target * 255).astype(np.uint8)
    np.testing.assert_allclose(
        metrics.psnr(as_uint8, target), metrics.psnr(as_uint8 / 255.0, target), rtol=1e-6
    )


def test_metrics_refuse_mismatched_or_misshaped_videos():
    pred, target = noisy_pair()
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(pred[:3], target)
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        metrics.ssim(pred[..., 0], target[..., 0])


def test_temporal_error_sees_motion_not_a_constant_offset():
    _, target = noisy_pair(noise=0)
    assert metrics.temporal_error(np.clip(target + 0.1, 0, 1), target) < 1e-6  # same motion, brighter
    frozen = np.repeat(target[:1], len(target), axis=0)
    assert metrics.temporal_error(frozen, target) > 0.1  # the truth moves, the video does not


def test_person_box_metrics_ignore_the_background():
    _, target = noisy_pair(noise=0, shape=(3, 64, 48, 3))
    boxes = np.array([[[0.25, 0.25], [0.75, 0.75]]] * 3)
    pred = target.copy()
    pred[:, :8] = 0  # damage a band above the box only
    box_psnr, box_ssim = metrics.psnr_ssim_in_boxes(pred, target, boxes)
    assert np.isinf(box_psnr).all() and np.allclose(box_ssim, 1)
    assert np.isfinite(metrics.psnr(pred, target)).all()
    tiny = np.array([[[0.5, 0.5], [0.52, 0.51]]] * 3)  # grown to SSIM's 11-pixel window
    assert np.isfinite(metrics.psnr_ssim_in_boxes(pred * 0.9, target, tiny)[1]).all()


def validation_clip(width, height):
    frames = np.stack([np.array(PIL.Image.open(VALIDATION / "ground_truth" / f"{i}.png")) for i in range(14)])
    box = crop_window(frames.shape[2], frames.shape[1], width, height)
    poses = metrics.Poses.from_arrays(load_keypoints(DATA_SAMPLES / "keypoints" / "validation.npz"))
    return crop_resize(frames, box, width, height).permute(0, 2, 3, 1).numpy(), poses  # (F, H, W, 3)


@pytest.mark.parametrize("size", [(64, 96), (256, 384)])
def test_control_fidelity_ranks_truth_then_shuffled_poses_then_a_still_image(size):
    frames, poses = validation_clip(*size)
    scorer = metrics.AppearanceScorer(frames[0], poses.body[0], poses.body_scores[0])
    truth = metrics.control_fidelity(frames, poses, scorer)
    shuffled = [
        metrics.control_fidelity(frames, poses.take(np.random.default_rng(s).permutation(14)), scorer)
        for s in range(5)
    ]
    still = metrics.control_fidelity(np.repeat(frames[:1], 14, axis=0), poses, scorer)
    assert truth["score"] < 0.02
    assert min(s["score"] for s in shuffled) > 4 * truth["score"]  # right poses, wrong times
    assert still["score"] > 1.4 * max(s["score"] for s in shuffled)  # the poses ignored
    assert still["untimed"] > 5 * truth["untimed"] and all(s["untimed"] == truth["untimed"] for s in shuffled)
    # Only motion that follows the poses earns contrast; a still video has none, whatever it shows.
    assert truth["contrast"] > 0.05 > max(s["contrast"] for s in shuffled)
    assert still["contrast"] == pytest.approx(0, abs=1e-12)


def test_contrast_ignores_an_offset_common_to_a_frames_row():
    matrix = np.random.default_rng(0).random((6, 6))
    shifted = matrix + np.arange(6)[:, None] * 0.1  # frame t worse at every pose by 0.1 t
    scorer = lambda m: lambda frames, poses: m  # noqa: E731
    frames = np.zeros((6, 4, 4, 3), np.uint8)
    poses = metrics.Poses(np.zeros((6, 18, 2)), np.ones((6, 18)))
    plain = metrics.control_fidelity(frames, poses, scorer(matrix))
    assert metrics.control_fidelity(frames, poses, scorer(shifted))["contrast"] == pytest.approx(
        plain["contrast"]
    )
    one_pose = metrics.Poses(poses.body[:1], poses.body_scores[:1])
    assert metrics.control_fidelity(frames[:1], one_pose, scorer(matrix[:1, :1]))["contrast"] == 0
    others = [(matrix[t].sum() - matrix[t, t]) / 5 for t in range(6)]
    assert plain["contrast"] == pytest.approx(np.mean([others[t] - matrix[t, t] for t in range(6)]))


def test_detector_scorer_uses_any_keypoint_detector():
    frames, poses = validation_clip(64, 96)
    known = {frame.tobytes(): t for t, frame in enumerate(frames)}

    def detector(frame):  # a stand-in that knows the truth, with the PoseDetector signature
        t = known[frame.tobytes()]
        return poses.body[t], poses.body_scores[t], None, None, None

    scorer = metrics.DetectorScorer(detector)
    truth = metrics.control_fidelity(frames, poses, scorer)
    shuffled = metrics.control_fidelity(frames, poses.take(np.random.default_rng(0).permutation(14)), scorer)
    still = metrics.control_fidelity(np.repeat(frames[:1], 14, axis=0), poses, scorer)
    assert truth["score"] < 1e-6 < shuffled["score"] < still["score"]


def test_video_metrics_collects_what_the_inputs_allow():
    frames, poses = validation_clip(64, 96)
    scorer = metrics.AppearanceScorer(frames[0], poses.body[0], poses.body_scores[0])
    boxes = metrics.person_boxes_from_keypoints(poses.body, poses.body_scores)
    result = metrics.video_metrics(torch.from_numpy(frames), frames, boxes=boxes, poses=poses, scorer=scorer)
    assert set(result) == {
        "psnr",
        "ssim",
        "l1",
        "temporal_error",
        "psnr_person",
        "ssim_person",
        "control_timed",
        "control_untimed",
        "control_score",
        "control_contrast",
    }
    assert result["ssim"] == pytest.approx(1.0, abs=1e-4)
    assert result["l1"] == 0 and result["temporal_error"] == 0
    assert set(metrics.video_metrics(frames, frames)) == {"psnr", "ssim", "l1", "temporal_error"}
