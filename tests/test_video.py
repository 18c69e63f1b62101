import hashlib

import numpy as np
import pytest

from cnx.video import read_frames, write_video


def frames(n=6, height=96, width=64, seed=0):
    return [
        np.random.default_rng([seed, t]).integers(0, 256, (height, width, 3), dtype=np.uint8)
        for t in range(n)
    ]


def test_same_frames_give_the_same_bytes_at_the_tiny_size(tmp_path):
    digests = set()
    for k in range(6):
        path = write_video(tmp_path / f"{k}.mp4", frames(), fps=8.0)  # a float rate is accepted
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1


@pytest.mark.parametrize("deterministic", [True, False])
def test_roundtrip_keeps_frame_count_size_and_flat_colours(tmp_path, deterministic):
    flat = [np.full((96, 64, 3), (200, 30, 90), np.uint8)] * 5
    decoded = read_frames(write_video(tmp_path / "flat.mp4", flat, deterministic=deterministic), [0, 4])
    assert decoded.shape == (2, 96, 64, 3)
    assert np.abs(decoded.astype(int) - (200, 30, 90)).max() <= 3  # RGB order kept, within codec tolerance


@pytest.mark.parametrize("height, width", [(96, 48), (95, 64)])
def test_sizes_decord_or_yuv420p_cannot_take_are_refused(tmp_path, height, width):
    with pytest.raises(ValueError, match="even sizes and width >= 64"):
        write_video(tmp_path / "bad.mp4", frames(height=height, width=width))


def test_no_frames_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "empty.mp4", [])


def test_only_cnx_video_loads_the_decoders():
    """Importing the dataset and its checks loads neither decord nor PyAV: cnx.video imports them on use."""
    import subprocess
    import sys

    code = "import sys, cnx.data, cnx.checks; print(sorted({'decord', 'av'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
