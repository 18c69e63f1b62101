"""`cnx generate` and `cnx validate`: bad input refused before any model loads, outputs, weight lookup."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from cnx.cli import main as cnx
from cnx.controlnext import ControlNeXt, controlnext_config_for
from cnx.media import InputError, frame_grid
from cnx.profiles import DATA_SAMPLES
from cnx.sampler import TrainedWeights, find_trained_weights

VALIDATION = DATA_SAMPLES / "validation"
NO_MODEL = "/nonexistent/svd"  # a model path that cannot load: bad input must be refused before it is tried


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A trained-looking export folder: controlnext/ (diffusers layout)."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    ControlNeXt(**controlnext_config_for(32)).save_pretrained(folder / "controlnext")
    return folder


def generate_args(tmp_path, export, **changes):
    args = {
        "--pretrained_model_name_or_path": NO_MODEL,
        "--controlnext": str(export),
        "--reference_image": str(VALIDATION / "reference_image.png"),
        "--pose": str(VALIDATION / "pose"),
        "--output_dir": str(tmp_path / "out"),
        "--height": "96",
        "--width": "64",
        "--num_inference_steps": "2",
        "--max_frames": "4",
    } | changes
    return ["generate"] + [str(x) for kv in args.items() for x in kv if x is not None]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--reference_image": "missing.png"}, "missing.png: image does not exist"),
        ({"--reference_image": "NOT_AN_IMAGE"}, "cannot read image"),
        ({"--pose": "EMPTY_DIR"}, "no pose images"),
        ({"--pose": "missing.mp4"}, "missing.mp4: pose video or folder does not exist"),
        ({"--height": "100"}, "--height must be a positive multiple of 8, got 100"),
        ({"--controlnext": "EMPTY_DIR"}, "no ControlNeXt weights here"),
        ({"--align_poses": None}, "--align_poses needs a keypoint track"),
    ],
)
def test_generate_refuses_bad_input_in_one_line_before_loading_a_model(
    tmp_path, export, capsys, change, message
):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_text("not an image")
    substitutes = {"EMPTY_DIR": str(tmp_path / "empty"), "NOT_AN_IMAGE": str(tmp_path / "bad.png")}
    change = {k: substitutes.get(v, v) for k, v in change.items()}
    assert cnx(generate_args(tmp_path, export, **change)) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error


def test_validate_refuses_mismatched_folders_naming_both(tmp_path, export, capsys):
    copy = tmp_path / "validation"
    shutil.copytree(VALIDATION, copy)
    (copy / "pose" / "13.png").unlink()
    argv = ["validate", "--pretrained_model_name_or_path", NO_MODEL, "--controlnext", str(export)]
    assert cnx([*argv, "--validation_dir", str(copy), "--output_dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert (
        f"{copy / 'ground_truth'} has 14 ground-truth images but {copy / 'pose'} has 13 pose images" in error
    )


def test_trained_weights_are_found_in_files_and_exports(tmp_path, export):
    """Checkpoints and output_dirs of real runs: tests/test_export.py."""
    assert find_trained_weights(export) == TrainedWeights(export / "controlnext")
    assert find_trained_weights(export / "controlnext") == TrainedWeights(export / "controlnext")
    with pytest.raises(InputError, match="no controlnext_ema/"):
        find_trained_weights(export, ema=True)
    with pytest.raises(InputError, match="nothing: no such file or folder"):
        find_trained_weights(tmp_path / "nothing")
    with pytest.raises(InputError, match="no ControlNeXt weights here"):
        find_trained_weights(tmp_path)


def test_frame_grid_keeps_each_frames_aspect_ratio():
    """Pitfall 20: frames were squashed into a square grid; here they keep their size."""
    rows = [np.full((20, 96, 64, 3), v, np.uint8) for v in (0, 100, 200)]
    grid = frame_grid(rows, columns=16, gap=2)
    assert grid.shape == (3 * 96 + 2 * 2, 16 * 64 + 15 * 2, 3)
    assert (grid[:96, :64] == 0).all() and (grid[98:194, :64] == 100).all()


def test_generate_and_validate_on_the_tiny_model(tmp_path, export, tiny_svd_dir):
    argv = generate_args(tmp_path, export, **{"--pretrained_model_name_or_path": str(tiny_svd_dir)})
    argv += ["--ground_truth", str(VALIDATION / "ground_truth")]
    assert cnx(argv) == 0
    out = tmp_path / "out"
    grid = np.asarray(PIL.Image.open(out / "grid.png"))
    assert grid.shape == (3 * 96 + 4, 4 * 64 + 6, 3)  # ground truth, pose, generated; 4 frames
    gif = PIL.Image.open(out / "video.gif")
    assert gif.n_frames == 4 and gif.size == (64, 96)
    assert (out / "video.mp4").stat().st_size > 0

    argv = ["validate", "--pretrained_model_name_or_path", str(tiny_svd_dir), "--controlnext", str(export)]
    argv += [
        "--validation_dir",
        str(VALIDATION),
        "--keypoints",
        str(DATA_SAMPLES / "keypoints" / "validation.npz"),
    ]
    argv += [
        "--output_dir",
        str(tmp_path / "val"),
        "--height",
        "96",
        "--width",
        "64",
        "--num_inference_steps",
        "2",
        "--pose_detector",
        "mediapipe",
    ]
    assert cnx(argv) == 0
    record = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert record["frames"] == 14 and (record["width"], record["height"]) == (64, 96)
    expected = {"psnr", "ssim", "l1", "temporal_error", "psnr_person", "ssim_person"}
    expected |= {"control_timed", "control_untimed", "control_score", "control_contrast"}
    detected = {
        "pose_pck",
        "pose_joint_error",
        "pose_detected",
        "pose_contrast",
    }  # tests/test_pose_fidelity.py
    assert expected | detected == set(record["metrics"])
    assert all(np.isfinite(record["metrics"][k]) for k in expected)
    # An untrained model's frames: the detector may find nobody (no joint error), never more than all.
    assert 0 <= record["metrics"]["pose_pck"] <= record["metrics"]["pose_detected"] <= 1
