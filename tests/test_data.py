"""Clip sampling, geometry, hand masks and the ClipDataset (pitfalls 15-19 in docs/pitfalls.md)."""

from __future__ import annotations

import ast
import gc
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from clip_fixtures import (
    corrupt_middle,
    decode_index,
    detections_json,
    index_frames,
    noise_frames,
    write_dataset,
    write_entry,
    write_meta_info,
)

import cnx.data
import cnx.video
from cnx.checks import DataCheckError
from cnx.data import (
    HAND_WEIGHT,
    ClipDataset,
    CropBox,
    FailureBudget,
    SampleError,
    TooManyFailures,
    augment_reference,
    crop_resize,
    crop_window,
    decode_size,
    hand_weights,
    iterate_with_budget,
    sample_clip,
    sample_frame_indices,
    sample_generator,
)
from cnx.meta import FrameDetections
from cnx.profiles import DATA_SAMPLES
from cnx.video import read_frames

CNX = Path(cnx.video.__file__).parent


def gen(i: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(i)


def hand(box, score: float) -> FrameDetections:
    return FrameDetections(
        boxes=np.zeros((0, 2, 2)), hands_boxes=np.array([box], float), hands_score=np.full((1, 21), score)
    )


def hands(*items) -> FrameDetections:
    boxes = np.array([b for b, _ in items], float)
    scores = np.array([[s] * 21 for _, s in items], float)
    return FrameDetections(boxes=np.zeros((0, 2, 2)), hands_boxes=boxes, hands_score=scores)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    write_dataset(folder, num_entries=3, num_frames=30)
    return folder


CODED = 8  # entries of coded_dir: a random order of 8 entries is the json order once in 40320


@pytest.fixture(scope="module")
def coded_dir(tmp_path_factory) -> Path:
    """Short clips with their own content: frame i of entry k is an index video's frame k + i."""
    folder = tmp_path_factory.mktemp("coded")
    entries = []
    for k in range(CODED):
        frames = index_frames(k + 12)[k:]  # 12 frames coded k .. k + 11
        entries.append(write_entry(folder, f"clip{k}", num_frames=12, video=frames, pose=frames))
    write_meta_info(folder, entries)
    return folder


def entry_of(sample: dict) -> set[int]:
    """The coded_dir entries a sample's RGB and pose frames came from (frame code minus frame index)."""
    indices = sample["frame_indices"].tolist()
    rgb = [decode_index((f + 1) / 2) - i for f, i in zip(sample["pixel_values"], indices, strict=True)]
    pose = [decode_index(f) - i for f, i in zip(sample["pose_frames"], indices, strict=True)]
    return set(rgb + pose)


# ---------------------------------------------------------------------------------------------
# Frame sampling


def test_fixed_interval_gives_evenly_spaced_frames():
    indices, interval = sample_frame_indices(100, 21, 3, gen())
    assert interval == 3
    assert np.all(np.diff(indices) == 3) and len(indices) == 21
    assert indices[0] >= 0 and indices[-1] < 100


def test_interval_shrinks_when_the_video_is_too_short():
    indices, interval = sample_frame_indices(30, 8, 5, gen())  # span 36 > 30
    assert interval == 4  # (30 - 1) // 7
    assert np.all(np.diff(indices) == 4) and indices[-1] < 30
    indices, interval = sample_frame_indices(8, 8, 3, gen())
    assert interval == 1 and indices.tolist() == list(range(8))


def test_too_short_video_is_an_error():
    with pytest.raises(ValueError, match="too short"):
        sample_frame_indices(7, 8, 1, gen())


def test_start_is_uniform_over_every_position_that_fits():
    starts = [sample_frame_indices(40, 8, 3, gen(i))[0][0] for i in range(400)]  # span 22: starts 0..18
    counts = np.bincount(starts, minlength=19)
    assert len(counts) == 19 and counts.min() > 5  # every start occurs, none outside


def test_non_positive_interval_draws_a_spacing_in_2_to_7():
    for interval_frame in (0, -1):
        drawn = {sample_frame_indices(200, 8, interval_frame, gen(i))[1] for i in range(200)}
        assert drawn == {2, 3, 4, 5, 6, 7}


def test_reference_replaces_frame_0_and_comes_from_the_whole_video():
    references = []
    for i in range(300):
        clip = sample_clip(50, 8, 2, gen(i))
        assert clip.frame_indices[0] == clip.reference_index
        assert np.array_equal(clip.frame_indices[1:], clip.clip_indices[1:])
        references.append(clip.reference_index)
    assert min(references) == 0 and max(references) == 49


def test_sample_generator_depends_on_seed_epoch_and_index_only():
    draws = {
        (s, e, i): torch.rand(3, generator=sample_generator(s, e, i))
        for s, e, i in [(0, 0, 1), (0, 1, 0), (1, 0, 0)]
    }
    assert not torch.equal(draws[0, 0, 1], draws[0, 1, 0]) and not torch.equal(draws[0, 1, 0], draws[1, 0, 0])
    a, b = sample_generator(3, 1, 4), sample_generator(3, 1, 4)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


# ---------------------------------------------------------------------------------------------
# Geometry


def test_decode_size_covers_the_crop_never_upscales_and_stays_readable():
    box = crop_window(1080, 1920, 576, 1024)  # same aspect: the whole frame
    assert decode_size(1080, 1920, box, 576, 1024) == (576, 1024)
    wide = crop_window(1920, 1080, 576, 1024)  # landscape source, portrait crop
    w, h = decode_size(1920, 1080, wide, 576, 1024)
    left, top, right, bottom = wide.pixels(w, h)
    assert right - left >= 576 and bottom - top >= 1024 and w % 2 == 0 and h % 2 == 0
    assert decode_size(256, 384, crop_window(256, 384, 512, 768), 512, 768) is None  # never upscale
    assert decode_size(256, 384, crop_window(256, 384, 32, 48), 32, 48) == (64, 96)  # decord's minimum width


def test_scaled_decoding_matches_full_resolution_decoding():
    """Downscaling inside the decoder gives what a full-size decode and resize gives, within filter noise."""
    meta = DATA_SAMPLES / "meta_info.json"
    ds = ClipDataset(meta, width=64, height=96, sample_n_frames=8, interval_frame=3, deterministic=True)
    sample = ds[0]
    full = read_frames(sample["video_path"], sample["frame_indices"].tolist())  # (F, 384, 256, 3)
    expected = crop_resize(full, CropBox(*sample["crop_box"].tolist()), 64, 96).float()
    got = (sample["pixel_values"] + 1) * 127.5  # back to grey levels
    assert (got - expected).abs().mean() < 3.0


def test_crop_window_keeps_the_output_aspect_ratio():
    box = crop_window(1080, 1920, 576, 1024)  # same aspect: whole frame
    assert np.allclose(box, (0, 0, 1, 1))
    box = crop_window(1920, 1080, 576, 1024, offset=0.5)  # landscape source, portrait output
    w = box.x1 - box.x0
    assert np.isclose(w * 1920 / 1080, 576 / 1024) and np.isclose(box.x0, (1 - w) / 2)
    assert crop_window(1920, 1080, 576, 1024, offset=0.0).x0 == 0.0
    assert np.isclose(crop_window(1920, 1080, 576, 1024, offset=1.0).x1, 1.0)
    box = crop_window(64, 96, 64, 64, offset=1.0)  # portrait source, square output: crop height
    assert np.isclose(box.y1, 1.0) and np.isclose(box.y1 - box.y0, 64 / 96)
    with pytest.raises(ValueError):
        crop_window(64, 96, 64, 64, offset=1.5)


def test_crop_resize_shapes_and_channel_order():
    frames = np.zeros((2, 96, 64, 3), np.uint8)
    frames[..., 0], frames[..., 2] = 200, 30  # red-ish: R and B must stay where they are
    out = crop_resize(frames, CropBox(0, 0, 1, 1), 32, 48)
    assert out.shape == (2, 3, 48, 32) and out.dtype == torch.uint8
    assert (out[:, 0] == 200).all() and (out[:, 1] == 0).all() and (out[:, 2] == 30).all()
    with pytest.raises(ValueError, match="uint8"):
        crop_resize(frames.astype(np.float32), CropBox(0, 0, 1, 1), 32, 48)


def test_crop_resize_is_antialiased():
    frames = np.zeros((1, 96, 64, 3), np.uint8)
    frames[:, :, ::2] = 255  # one-pixel stripes: a plain subsample would alias to all 0 or all 255
    out = crop_resize(frames, CropBox(0, 0, 1, 1), 16, 24).float()
    assert (out - 127.5).abs().max() < 10


# ---------------------------------------------------------------------------------------------
# Hand masks


def test_pitfall_17_low_confidence_box_never_lowers_an_overlapping_confident_one():
    """Pitfall 17: the original code assigned mask values, so the box drawn last won."""
    box = CropBox(0, 0, 1, 1)
    confident, weak = ([[0.2, 0.2], [0.6, 0.6]], 0.9), ([[0.4, 0.4], [0.8, 0.8]], 0.2)
    for order in ((confident, weak), (weak, confident)):
        mask = hand_weights([hands(*order)], box, (640, 640), (64, 64), margin_px=0)[0, 0]
        assert mask[32, 32] == HAND_WEIGHT  # about (0.51, 0.51): inside both boxes
        assert mask[19, 19] == HAND_WEIGHT  # about (0.30, 0.30): confident box only
        assert mask[45, 45] == 1.0  # about (0.71, 0.71): weak box only
    assert torch.equal(mask.unique(), torch.tensor([1.0, HAND_WEIGHT]))


def test_hand_weights_threshold_margin_and_none_frames():
    box = CropBox(0, 0, 1, 1)
    at_threshold = hand([[0.4, 0.4], [0.6, 0.6]], 0.5)  # mean score must *exceed* 0.5
    above = hand([[0.4, 0.4], [0.6, 0.6]], 0.51)
    mask = hand_weights([at_threshold, above, None], box, (100, 100), (100, 100))
    assert (mask[0] == 1).all() and (mask[2] == 1).all()
    assert mask[1, 0, 50, 50] == HAND_WEIGHT == 1 + 4 * 0.8
    row = mask[1, 0, 50]  # 10-pixel margin at source resolution (100 px): box spans x in [30, 70]
    inside = torch.nonzero(row > 1).flatten()
    assert inside.min().item() == 30 and inside.max().item() == 69
    # The margin is in *source* pixels: at 1000 px source width it is 1% of the frame.
    row = hand_weights([above], box, (1000, 1000), (100, 100))[0, 0, 50]
    inside = torch.nonzero(row > 1).flatten()
    assert inside.min().item() == 39 and inside.max().item() == 60


def test_hand_weights_follows_the_crop_window():
    detections = [hand([[0.0, 0.0], [0.25, 0.25]], 0.9)]
    full = hand_weights(detections, CropBox(0, 0, 1, 1), (400, 400), (40, 40), margin_px=0)[0, 0]
    right = hand_weights(detections, CropBox(0.5, 0, 1, 1), (400, 400), (40, 40), margin_px=0)[0, 0]
    assert full[:10, :10].eq(HAND_WEIGHT).all() and full[20:, 20:].eq(1).all()
    assert right.eq(1).all()  # the hand is outside the right half


# ---------------------------------------------------------------------------------------------
# Reference augmentation


def test_augment_reference_is_seeded_and_bounded():
    image = torch.rand(3, 48, 32, generator=gen(1))
    a, params = augment_reference(image, gen(7))
    b, _ = augment_reference(image, gen(7))
    c, _ = augment_reference(image, gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == image.shape and a.min() >= 0 and a.max() <= 1
    assert 0.9 <= params["zoom"] <= 1.1 and abs(params["shift_x"]) <= 0.05
    identity, _ = augment_reference(image, gen(7), scale=0, shift=0, brightness=0, contrast=0, saturation=0)
    assert torch.allclose(identity, image, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The dataset


def test_sample_shapes_ranges_and_metadata(dataset_dir):
    ds = ClipDataset(dataset_dir / "meta_info.json", width=64, height=96, sample_n_frames=8, interval_frame=3)
    assert len(ds) == 3
    s = ds[1]
    assert s["pixel_values"].shape == (8, 3, 96, 64) and s["pixel_values"].dtype == torch.float32
    assert s["pose_frames"].shape == (8, 3, 96, 64)
    assert s["reference_image"].shape == (3, 96, 64)
    assert s["hand_weights"].shape == (8, 1, 96, 64)
    assert -1 <= s["pixel_values"].min() and s["pixel_values"].max() <= 1
    assert 0 <= s["pose_frames"].min() and s["pose_frames"].max() <= 1
    assert s["video_path"].endswith("clip1.mp4") and s["index"] == 1
    assert s["frame_indices"][0] == s["reference_index"]
    assert torch.equal(s["reference_image"], s["pixel_values"][0])


def test_returned_frames_are_the_frames_named_by_frame_indices(dataset_dir):
    """The RGB and pose frames are the sampled source frames, reference first, in clip order."""
    ds = ClipDataset(dataset_dir / "meta_info.json", width=64, height=96, sample_n_frames=8, interval_frame=3)
    for index in range(3):
        s = ds[index]
        expected = s["frame_indices"].tolist()
        assert [decode_index((f + 1) / 2) for f in s["pixel_values"]] == expected
        assert [decode_index(f) for f in s["pose_frames"]] == expected
        assert np.all(np.diff(expected[1:]) == 3)


def test_one_get_batch_per_video_per_clip(dataset_dir, monkeypatch):
    calls = []

    class CountingReader:
        def __init__(self, reader):
            self.reader = reader

        def __len__(self):
            return len(self.reader)

        def get_batch(self, indices):
            calls.append(list(indices))
            return self.reader.get_batch(indices)

        def __getitem__(self, i):
            raise AssertionError("per-frame read")

    real_open = cnx.video.open_video
    monkeypatch.setattr(
        cnx.video, "open_video", lambda path, size=None: CountingReader(real_open(path, size))
    )
    ds = ClipDataset(dataset_dir / "meta_info.json", width=64, height=96, sample_n_frames=8, interval_frame=3)
    ds[0]
    assert len(calls) == 2  # RGB and pose, reference included in each
    assert calls[0] == sorted(calls[0])  # increasing order: decord never seeks back


def test_the_video_cache_decodes_each_video_once_and_changes_no_sample(dataset_dir, monkeypatch):
    opened = []
    real_open = cnx.video.open_video
    monkeypatch.setattr(
        cnx.video, "open_video", lambda path, size=None: opened.append(path) or real_open(path, size)
    )
    meta = dataset_dir / "meta_info.json"
    plain = ClipDataset(meta, width=64, height=96, sample_n_frames=8, interval_frame=3)
    cached = ClipDataset(meta, width=64, height=96, sample_n_frames=8, interval_frame=3, video_cache_mb=64)
    keys = ("pixel_values", "pose_frames", "reference_image", "hand_weights", "frame_indices")
    for epoch in range(3):
        for index in range(3):
            a, b = plain.sample(index, epoch), cached.sample(index, epoch)
            assert all(torch.equal(a[k], b[k]) for k in keys)
    assert len(opened) == 3 * 3 * 2 + 3 * 2  # plain: every sample opens both videos; cached: once each
    assert len(cached.videos.videos) == 6 and 0 < cached.videos.used <= 64 * 2**20
    # A budget too small for one video leaves the cache empty and the samples the same.
    small = ClipDataset(meta, width=64, height=96, sample_n_frames=8, interval_frame=3, video_cache_mb=0.1)
    assert torch.equal(small.sample(1, 2)["pixel_values"], plain.sample(1, 2)["pixel_values"])
    assert small.videos.used == 0


def test_deterministic_mode_returns_the_same_centred_clip_every_epoch(dataset_dir):
    ds = ClipDataset(
        dataset_dir / "meta_info.json",
        width=64,
        height=64,
        sample_n_frames=8,
        interval_frame=0,
        deterministic=True,
    )
    first = ds[2]
    ds.set_epoch(7)
    again = ds[2]
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    assert torch.equal(first["frame_indices"], again["frame_indices"])
    assert torch.allclose(first["crop_box"], torch.tensor(crop_window(64, 96, 64, 64, 0.5)))


def test_training_mode_draws_new_clips_and_crops_each_epoch(dataset_dir):
    ds = ClipDataset(dataset_dir / "meta_info.json", width=64, height=64, sample_n_frames=8, interval_frame=3)
    drawn = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(3):
            s = ds[i]
            drawn.add((i, tuple(s["frame_indices"].tolist()), round(float(s["crop_box"][1]), 4)))
    assert len(drawn) == 12
    assert len({y0 for _, _, y0 in drawn}) > 1  # random crop offsets in training


def test_pitfall_19_samples_do_not_depend_on_instance_order_or_global_rng(coded_dir):
    """Pitfall 19: the original code shuffled meta_info per rank with no seed. Here entries keep json
    order and a sample is a function of (seed, epoch, index) only: same on every rank and worker,
    any draw order."""
    path = coded_dir / "meta_info.json"
    a = ClipDataset(path, width=64, height=96, sample_n_frames=4, interval_frame=0, seed=5)
    b = ClipDataset(path, width=64, height=96, sample_n_frames=4, interval_frame=0, seed=5)
    assert [e.video_path.name for e in a.entries] == [f"clip{k}.mp4" for k in range(CODED)]
    forward = [a.sample(i, epoch=3) for i in range(CODED)]
    assert [entry_of(s) for s in forward] == [{k} for k in range(CODED)]  # each index reads its own entry
    torch.manual_seed(123)  # global RNG must not matter
    backward = [b.sample(i, epoch=3) for i in reversed(range(CODED))][::-1]
    for x, y in zip(forward, backward, strict=True):
        assert torch.equal(x["pixel_values"], y["pixel_values"])
        assert torch.equal(x["frame_indices"], y["frame_indices"])
    # ... and sampling leaves the global RNGs alone.
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    a.sample(0, epoch=3)
    assert torch.equal(before[0], torch.get_rng_state())
    assert np.array_equal(before[1], np.random.get_state()[1]) and before[2] == random.getstate()
    other = ClipDataset(path, width=64, height=96, sample_n_frames=4, interval_frame=0, seed=6)
    assert any(
        not torch.equal(other.sample(i, 3)["frame_indices"], forward[i]["frame_indices"])
        for i in range(CODED)
    )


def test_pitfall_19_dataloader_workers_give_the_same_samples(coded_dir):
    """Pitfall 19: with workers (as on several ranks) each index still maps to its own entry's sample."""
    ds = ClipDataset(coded_dir / "meta_info.json", width=64, height=96, sample_n_frames=4, interval_frame=0)
    ds.set_epoch(2)
    in_process = [ds[i]["frame_indices"] for i in range(CODED)]
    from_workers = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))  # uncollated
    assert [entry_of(s) for s in from_workers] == [{k} for k in range(CODED)]
    assert all(torch.equal(x, s["frame_indices"]) for x, s in zip(in_process, from_workers, strict=True))


def test_pitfall_19_ref_augment_changes_only_the_reference_and_only_when_on(dataset_dir):
    """Pitfall 19: the original code accepted --ref_augment and ignored it."""
    path = dataset_dir / "meta_info.json"
    off = ClipDataset(path, width=64, height=96, sample_n_frames=8, interval_frame=3, seed=1)
    on = ClipDataset(path, width=64, height=96, sample_n_frames=8, interval_frame=3, seed=1, ref_augment=True)
    for i in range(3):
        x, y = off[i], on[i]
        assert torch.equal(x["reference_image"], x["pixel_values"][0])
        assert not torch.equal(y["reference_image"], y["pixel_values"][0])
        assert y["reference_image"].min() >= -1 and y["reference_image"].max() <= 1
        for key in ("pixel_values", "pose_frames", "hand_weights", "frame_indices", "crop_box"):
            assert torch.equal(x[key], y[key]), key
        assert torch.equal(on[i]["reference_image"], y["reference_image"])  # seeded


def test_pitfall_19_ref_augment_draws_new_jitter_per_sample_and_epoch(coded_dir, monkeypatch):
    """Pitfalls 10 and 19: the reference jitter comes from the sample's own (seed, epoch, index) stream."""
    drawn = []

    def spy(image, generator, **kwargs):
        out, params = augment_reference(image, generator, **kwargs)
        drawn.append(tuple(params.values()))
        return out, params

    monkeypatch.setattr(cnx.data, "augment_reference", spy)
    keys = [(epoch, index) for epoch in range(2) for index in range(4)]
    images = []
    for _ in range(2):  # a fresh dataset each time: the same (seed, epoch, index) repeats exactly
        ds = ClipDataset(coded_dir / "meta_info.json", 64, 96, 4, interval_frame=3, seed=1, ref_augment=True)
        images.append([ds.sample(index, epoch)["reference_image"] for epoch, index in keys])
    first, again = drawn[: len(keys)], drawn[len(keys) :]
    assert len(set(first)) == len(keys), first  # a new jitter for every index and every epoch
    assert again == first and all(torch.equal(x, y) for x, y in zip(*images, strict=True))


def test_pitfall_15_pose_colours_survive_video_roundtrip(tmp_path):
    """Pitfall 15: the original code swapped channels after decord (which returns RGB): wrong pose colours."""
    colours = np.array([[255, 0, 0], [255, 170, 0], [0, 255, 85], [170, 0, 255]], np.uint8)
    frame = np.zeros((96, 64, 3), np.uint8)
    for k, colour in enumerate(colours):
        frame[24 * k : 24 * (k + 1)] = colour
    entry = write_entry(tmp_path, "colours", num_frames=10, pose=[frame] * 10, detections=False)
    path = write_meta_info(tmp_path, [entry])
    s = ClipDataset(path, width=64, height=96, sample_n_frames=4, interval_frame=1, deterministic=True)[0]
    for k, colour in enumerate(colours):
        got = s["pose_frames"][:, :, 24 * k + 12, 32] * 255  # (F, 3) at the band centre, every frame
        assert (got - torch.tensor(colour, dtype=torch.float32)).abs().max() <= 8, (colour, got[0])
        swapped = torch.tensor(colour[::-1].copy(), dtype=torch.float32)
        if colour[0] != colour[2]:
            assert (got - swapped).abs().max() > 60  # a swapped channel would be far off


def test_pitfall_18_crop_agrees_when_pose_resolution_differs(tmp_path):
    """Pitfall 18: the original code cropped the pose video with a pixel window computed from the RGB size."""

    def marked(width: int, height: int) -> np.ndarray:
        frame = np.full((height, width, 3), 40, np.uint8)
        frame[3 * height // 8 : 5 * height // 8, width // 2 : 3 * width // 4] = 255  # exact at both sizes
        return frame

    entry = write_entry(
        tmp_path,
        "marked",
        num_frames=8,
        size=(256, 384),
        video=[marked(256, 384)] * 8,
        pose=[marked(64, 96)] * 8,  # a quarter of the resolution, same field of view
        detections=detections_json(8, hands=[([[0.5, 0.375], [0.75, 0.625]], 0.9)]),
    )
    path = write_meta_info(tmp_path, [entry])
    # A square output crops the height. RGB decodes at about 130x194, the pose video stays 64x96, so
    # the RGB pixel window cut out of the pose video would miss the mark by about 30 output pixels.
    ds = ClipDataset(path, width=128, height=128, sample_n_frames=4, interval_frame=1)

    def centroid(region: torch.Tensor) -> np.ndarray:
        ys, xs = torch.nonzero(region, as_tuple=True)
        return np.array([ys.float().mean().item(), xs.float().mean().item()])

    offsets = set()
    for epoch in range(6):
        s = ds.sample(0, epoch)
        x0, y0, x1, y1 = s["crop_box"].tolist()
        offsets.add(round(y0, 3))
        # The mark's centre (x 0.625, y 0.5 of the source) in output pixel coordinates (row, column).
        expected = np.array([(0.5 - y0) / (y1 - y0), (0.625 - x0) / (x1 - x0)]) * 128 - 0.5
        regions = {
            "rgb": s["pixel_values"][1].mean(0) > 0.3,
            "pose": s["pose_frames"][1].mean(0) > 0.6,
            "hand mask": s["hand_weights"][1, 0] > 1,
        }
        for name, region in regions.items():  # within 2 px: the crop rounds to whole (2-px) pose pixels
            assert np.abs(centroid(region) - expected).max() <= 2.0, (name, centroid(region), expected)
    assert len(offsets) > 2  # the check ran at several crop positions


def test_hand_weights_in_a_sample_are_ones_on_frame_0(tmp_path):
    entry = write_entry(
        tmp_path, "h", num_frames=12, detections=detections_json(12, [([[0.1, 0.1], [0.5, 0.5]], 0.8)])
    )
    s = ClipDataset(write_meta_info(tmp_path, [entry]), 64, 96, 4, 2)[0]
    assert (s["hand_weights"][0] == 1).all()
    assert all((s["hand_weights"][t] == HAND_WEIGHT).any() for t in range(1, 4))
    no_meta = write_entry(tmp_path, "n", num_frames=12, detections=False)
    s = ClipDataset(write_meta_info(tmp_path, [no_meta]), 64, 96, 4, 2)[0]
    assert (s["hand_weights"] == 1).all()


def test_pose_shorter_by_under_25_frames_limits_the_clip(tmp_path):
    entry = write_entry(tmp_path, "gap", num_frames=34, pose_frames=12)  # 22 apart: allowed
    ds = ClipDataset(write_meta_info(tmp_path, [entry]), 64, 96, sample_n_frames=4, interval_frame=3)
    for epoch in range(10):
        assert ds.sample(0, epoch)["frame_indices"].max() < 12
    far = write_entry(tmp_path, "far", num_frames=37, pose_frames=12)  # 25 apart: an error
    pose = tmp_path / "poses" / "far.mp4"
    with pytest.raises(DataCheckError, match=rf"entry 0 \(.*far\.mp4\): pose video {pose} has 12 frames"):
        ClipDataset(write_meta_info(tmp_path, [far]), 64, 96, sample_n_frames=4, interval_frame=3)
    ds = ClipDataset(write_meta_info(tmp_path, [far]), 64, 96, 4, 3, check=False)
    with pytest.raises(SampleError, match=f"pose video {pose} has 12 frames, video has 37") as info:
        ds[0]
    assert info.value.path == str(pose)


# ---------------------------------------------------------------------------------------------
# Bad input and failures (pitfall 16)


def test_pitfall_16_no_bare_except_in_the_data_path():
    """Pitfall 16: a bare except around the sample silently resampled another video."""
    for name in ("data.py", "meta.py", "checks.py"):
        tree = ast.parse((CNX / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler):
                assert node.type is not None, f"bare except in cnx/{name}:{node.lineno}"
                caught = ast.unparse(node.type)
                assert "BaseException" not in caught and caught != "Exception", f"cnx/{name}:{node.lineno}"


def test_pitfall_16_construction_fails_fast_listing_every_bad_entry(tmp_path):
    """Pitfall 16: problems are reported up front with the entry and file, not hidden."""
    good = write_entry(tmp_path, "good", num_frames=20)
    short = write_entry(tmp_path, "short", num_frames=5)
    missing = {"video_path": "videos/nope.mp4", "guide_path": "poses/good.mp4"}
    path = write_meta_info(tmp_path, [good, short, missing, {"video_path": "videos/good.mp4"}])
    with pytest.raises(DataCheckError) as info:
        ClipDataset(path, 64, 96, sample_n_frames=8, interval_frame=2)
    lines = str(info.value).splitlines()
    assert any(line.startswith("entry 1 (") and "short.mp4: only 5 usable frames" in line for line in lines)
    assert any(line.startswith("entry 2 (") and "video does not exist" in line for line in lines)
    assert any(line.startswith("entry 3 (") and "missing key 'guide_path'" in line for line in lines)
    assert not any(line.startswith("entry 0 ") for line in lines)
    assert lines[-1] == f"{path}: checked 4 entries, 3 bad, 1 good"  # check-data's summary line


def test_pitfall_16_a_file_failing_during_training_raises_sample_error_naming_it(tmp_path):
    """Pitfall 16: a failed sample raises (SampleError) instead of quietly becoming another video."""
    path = write_dataset(tmp_path, num_entries=3, num_frames=20)
    ds = ClipDataset(path, 64, 96, sample_n_frames=4, interval_frame=2)
    (tmp_path / "videos" / "clip1.mp4").unlink()
    (tmp_path / "poses" / "clip2.mp4").write_bytes(b"not a video")
    ds[0]  # untouched entries still work
    with pytest.raises(
        SampleError, match=r"entry 1 \(.*clip1\.mp4\): video: .*clip1\.mp4: cannot open video"
    ) as info:
        ds[1]
    assert info.value.index == 1 and info.value.path == str(tmp_path / "videos" / "clip1.mp4")
    pose = tmp_path / "poses" / "clip2.mp4"
    with pytest.raises(SampleError, match=r"entry 2 \(.*videos/clip2\.mp4\): pose video: ") as info:
        ds[2]
    assert f"pose video: {pose}: cannot open video" in str(info.value) and info.value.path == str(pose)
    (tmp_path / "meta" / "clip0.json").write_text('[{"boxes": [')  # truncated json
    with pytest.raises(SampleError, match=r"clip0\.json: cannot read detection json") as info:
        ds[0]
    assert info.value.path == str(tmp_path / "meta" / "clip0.json")


def test_pitfall_16_corrupt_stream_raises_sample_error(tmp_path):
    """Pitfall 16: decord's DECORDError (not a RuntimeError) on a corrupt stream becomes a SampleError."""
    entry = write_entry(tmp_path, "noisy", num_frames=30, video=noise_frames(30), detections=False)
    ds = ClipDataset(write_meta_info(tmp_path, [entry]), 64, 96, sample_n_frames=8, interval_frame=3)
    corrupt_middle(tmp_path / "videos" / "noisy.mp4")
    with pytest.raises(
        SampleError, match=r"entry 0 \(.*noisy\.mp4\): video: .*noisy\.mp4: cannot decode frames"
    ):
        ds[0]


def test_pitfall_16_corrupt_pose_video_is_named_as_the_pose_video(tmp_path):
    """Pitfall 16: decord's errors do not name the file, so the sample's error must say which one failed."""
    entry = write_entry(tmp_path, "noisy", num_frames=30, pose=noise_frames(30), detections=False)
    ds = ClipDataset(write_meta_info(tmp_path, [entry]), 64, 96, sample_n_frames=8, interval_frame=3)
    pose = tmp_path / "poses" / "noisy.mp4"
    corrupt_middle(pose)
    with pytest.raises(SampleError) as info:
        ds[0]
    message = str(info.value)
    assert message.startswith(f"entry 0 ({tmp_path / 'videos' / 'noisy.mp4'}): pose video: {pose}: ")
    assert "cannot decode frames" in message
    assert info.value.path == str(pose) and info.value.index == 0


def test_pose_video_with_another_aspect_ratio_fails_fast(tmp_path):
    """The crop is shared in normalised coordinates: right only when both videos frame the same view."""
    entry = write_entry(tmp_path, "square", num_frames=12, size=(128, 192), pose_size=(128, 128))
    path = write_meta_info(tmp_path, [entry])
    expected = f"pose video {tmp_path / 'poses' / 'square.mp4'} is 128x128 (aspect 1.000), video is 128x192"
    with pytest.raises(
        DataCheckError, match=r"entry 0 \(.*square\.mp4\): pose video .*square\.mp4 is 128x128"
    ) as info:
        ClipDataset(path, 64, 96, sample_n_frames=4, interval_frame=1)
    assert expected in str(info.value)
    unchecked = ClipDataset(path, 64, 96, sample_n_frames=4, interval_frame=1, check=False)
    with pytest.raises(SampleError, match=r"aspect ratios differ by 50\.0%") as info:
        unchecked[0]  # caught when the frames are read too
    assert expected in str(info.value) and info.value.path == str(tmp_path / "poses" / "square.mp4")


def test_failure_budget_counts_and_stops_past_the_fraction():
    budget = FailureBudget(max_fraction=0.01, min_samples=100)
    budget.success(50)
    budget.failure(SampleError("entry 3 (a.mp4): cannot open video"))  # 1 <= 1% of max(51, 100)
    assert budget.seen == 51 and budget.failures == ["entry 3 (a.mp4): cannot open video"]
    budget.success(148)
    budget.failure(SampleError("entry 9 (b.mp4): cannot open video"))  # 2 <= 2.00
    with pytest.raises(TooManyFailures) as info:
        budget.failure(SampleError("entry 4 (c.mp4): cannot decode frames"))  # 3 > 2.01
    message = str(info.value)
    assert "3 of 201 samples failed" in message
    assert all(name in message for name in ("a.mp4", "b.mp4", "c.mp4"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pitfall_16_loader_wrapper_counts_failures_across_workers(tmp_path, num_workers):
    """Pitfall 16: failures reach the training loop with their type and path, also from worker processes."""
    path = write_dataset(tmp_path, num_entries=4, num_frames=12)
    ds = ClipDataset(path, 64, 96, sample_n_frames=4, interval_frame=1, max_failure_fraction=0.3)
    (tmp_path / "videos" / "clip2.mp4").unlink()
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=num_workers)
    budget = ds.failure_budget(min_samples=4)  # allows 0.3 * 4 = 1.2 failures
    batches = list(iterate_with_budget(loader, budget))
    assert [b["index"].item() for b in batches] == [0, 1, 3]
    assert budget.seen == 4 and len(budget.failures) == 1 and "clip2.mp4" in budget.failures[0]
    strict = FailureBudget(max_fraction=0.1, min_samples=1)
    with pytest.raises(TooManyFailures, match="clip2.mp4"):
        list(iterate_with_budget(loader, strict))
    start = time.perf_counter()
    gc.collect()  # no reference cycle left holding the stopped loader: nothing waits for workers here
    assert time.perf_counter() - start < 2.0


def test_loader_wrapper_counts_the_loaders_batch_size(tmp_path):
    """A failed batch of 2 loses 2 samples: the budget takes the batch size from the loader."""
    path = write_dataset(tmp_path, num_entries=4, num_frames=12)
    ds = ClipDataset(path, 64, 96, sample_n_frames=4, interval_frame=1, max_failure_fraction=0.3)
    (tmp_path / "videos" / "clip2.mp4").unlink()
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    budget = ds.failure_budget(min_samples=4)
    batches = list(iterate_with_budget(loader, budget))
    assert [b["index"].tolist() for b in batches] == [[0, 1]]
    assert budget.seen == 4 and len(budget.failures) == 1
    explicit = ds.failure_budget(min_samples=4)
    list(iterate_with_budget(loader, explicit, batch_size=3))  # an explicit size wins
    assert explicit.seen == 6


def test_loader_wrapper_lets_bugs_through():
    def broken():
        yield {"x": 1}
        raise TypeError("a bug, not bad data")

    budget = FailureBudget()
    with pytest.raises(TypeError):
        list(iterate_with_budget(broken(), budget))
    assert budget.seen == 1 and not budget.failures
