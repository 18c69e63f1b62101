"""Clips per second: `cnx.data.ClipDataset` against a per-frame-read baseline, on one CPU core.

    .venv/bin/python benchmarks/bench_data.py [--clips N] [--threads 1]

Two settings:
- the original README's: 576x1024, 21 frames, interval 3, on a generated 1080x1920 portrait
  clip (72 frames at 24 fps: a synthetic dancer rendered at 270x480, upscaled,
  with a little sensor-like noise so the encoder does real work) and its pose video;
- a small one: 64x96, 8 frames, interval 3, on `data_samples/` (the label "tiny" in the table).

The baseline is the original training code's way of reading: one `vr[i]` call per frame (clip
frames in order, then the reference) for the RGB and the pose video, then a
float32 antialiased resize. It draws exactly the same frames, crop and mask as
cnx (same per-sample generator), so only reading and resizing differ. cnx reads
each video with one `get_batch` in increasing frame order, has the decoder scale
frames to about the output size, and resizes uint8.

"Fast enough" is measured against one SVD-xt training step (576x1024, batch 1 per GPU, bf16,
gradient checkpointing) on one H100: the s/step of `benchmarks/results/bench_train_svd_xt.json`,
rounded to GPU_STEP_SECONDS. The figures (clips/s) go to `benchmarks/results/bench_data.json`
(`--results` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from record import record, write

from cnx.data import (
    ClipDataset,
    cached_video_size,
    crop_window,
    decode_size,
    hand_weights,
    sample_clip,
    sample_generator,
)
from cnx.meta import read_detections
from cnx.profiles import DATA_SAMPLES
from cnx.video import open_video, read_frames, write_video

GPU_STEP_SECONDS = (1.0, 2.0)  # one SVD-xt training step on an H100, rounded (module docstring)


def make_portrait_clip(folder: Path, num_frames: int = 72, fps: int = 24, seed: int = 0) -> Path:
    """Write a 1080x1920 RGB clip, its pose video and detections; return the meta_info.json path."""
    from tqdm.auto import tqdm

    from cnx.pose import detection_entry
    from cnx.synth import dancer_keypoints, random_dancer, render_frame, render_pose_frame

    small = random_dancer(np.random.default_rng([seed, 1]), num_frames, 270, 480, fps)
    big = random_dancer(np.random.default_rng([seed, 1]), num_frames, 1080, 1920, fps)  # same dancer, 4x
    noise = np.random.default_rng(seed)

    def rgb_frames():
        for t in tqdm(range(num_frames), desc="1080p clip", unit="frame", leave=False, disable=None):
            image, _ = render_frame(small, t)
            x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()  # (1, 3, 480, 270)
            up = F.interpolate(x, size=(1920, 1080), mode="bicubic")[0].permute(1, 2, 0).numpy()
            up += noise.normal(0.0, 1.5, up.shape[:2])[..., None]
            yield np.clip(up, 0, 255).astype(np.uint8)

    # x264's usual settings, as most footage is encoded (cnx's deterministic mode spends more bits).
    write_video(folder / "videos" / "portrait.mp4", rgb_frames(), fps=fps, deterministic=False)
    poses = (render_pose_frame(big, t) for t in range(num_frames))
    write_video(folder / "poses" / "portrait.mp4", poses, fps=fps, deterministic=False)
    entries = []
    for t in range(num_frames):
        k = dancer_keypoints(big, t)
        entries.append(detection_entry([[0.2, 0.1], [0.8, 0.95]], k.hands, k.hand_scores))
    (folder / "meta").mkdir(exist_ok=True)
    (folder / "meta" / "portrait.json").write_text(json.dumps(entries))
    meta = [
        {
            "video_path": "videos/portrait.mp4",
            "guide_path": "poses/portrait.mp4",
            "meta_info": "meta/portrait.json",
        }
    ]
    path = folder / "meta_info.json"
    path.write_text(json.dumps(meta))
    return path


def baseline_sample(ds: ClipDataset, index: int, epoch: int, decode_only: bool = False) -> dict:
    """The same sample as `ds.sample(index, epoch)`, read frame by frame and resized in float32."""
    entry = ds.entries[index]
    generator = sample_generator(ds.seed, epoch, index)
    video, pose = open_video(entry.video_path), open_video(entry.guide_path)
    usable = min(len(video), len(pose))
    clip = sample_clip(usable, ds.sample_n_frames, ds.interval_frame, generator)
    offset = float(torch.rand((), generator=generator).item())  # the dataset's next draw: the crop offset
    reads = [*clip.frame_indices[1:].tolist(), clip.reference_index]  # clip in order, then the reference
    frames = [video[i].asnumpy() for i in reads]
    poses = [pose[i].asnumpy() for i in reads]
    frames, poses = [frames[-1], *frames[:-1]], [poses[-1], *poses[:-1]]
    if decode_only:
        return {}
    h, w = frames[0].shape[:2]
    box = crop_window(w, h, ds.width, ds.height, offset)

    def resize(images: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0  # (F, 3, h, w)
        left, top, right, bottom = box.pixels(x.shape[3], x.shape[2])
        return F.interpolate(
            x[:, :, top:bottom, left:right], size=(ds.height, ds.width), mode="bilinear", antialias=True
        )

    detections = read_detections(entry.meta_info)
    chosen = [None, *(detections[i] for i in clip.frame_indices[1:])]
    return {
        "pixel_values": resize(frames) * 2 - 1,
        "pose_frames": resize(poses),
        "hand_weights": hand_weights(chosen, box, (w, h), (ds.width, ds.height)),
        "frame_indices": torch.from_numpy(clip.frame_indices),
    }


def cnx_decode_only(ds: ClipDataset, index: int, epoch: int) -> None:
    """cnx's reading alone: one sorted get_batch per video at the decode size (no crop, mask or floats)."""
    entry = ds.entries[index]
    generator = sample_generator(ds.seed, epoch, index)
    readers = []
    for path in (entry.video_path, entry.guide_path):
        width, height = cached_video_size(path)
        box = crop_window(width, height, ds.width, ds.height)
        readers.append(open_video(path, decode_size(width, height, box, ds.width, ds.height)))
    video, pose = readers
    clip = sample_clip(min(len(video), len(pose)), ds.sample_n_frames, ds.interval_frame, generator)
    wanted = np.unique(clip.frame_indices).tolist()
    read_frames(video, wanted), read_frames(pose, wanted)


def clips_per_second(fn, num_clips: int, num_entries: int) -> float:
    start = time.perf_counter()
    for k in range(num_clips):
        fn(k % num_entries, k)  # (index, epoch): a different clip each time, same for cnx and baseline
    return num_clips / (time.perf_counter() - start)


def run_setting(name: str, ds: ClipDataset, num_clips: int) -> dict:
    """Measure cnx vs baseline on one setting; check both produce the same sample first (the warm-up)."""
    ours, theirs = ds.sample(0, 1000), baseline_sample(ds, 0, 1000)
    assert torch.equal(ours["frame_indices"], theirs["frame_indices"]), "baseline drew different frames"
    # cnx scales inside the decoder (swscale), the baseline resizes full frames (torch): other filters,
    # a few grey levels apart on average.
    assert (ours["pixel_values"] - theirs["pixel_values"]).abs().mean() < 4 / 127.5, (
        "baseline differs from cnx"
    )
    assert torch.equal(ours["hand_weights"], theirs["hand_weights"]), "baseline mask differs from cnx"
    n = len(ds)
    result = {
        "setting": name,
        "cnx": clips_per_second(lambda i, e: ds.sample(i, e), num_clips, n),
        "baseline": clips_per_second(lambda i, e: baseline_sample(ds, i, e), num_clips, n),
        "cnx_read": clips_per_second(lambda i, e: cnx_decode_only(ds, i, e), num_clips, n),
        "baseline_read": clips_per_second(
            lambda i, e: baseline_sample(ds, i, e, decode_only=True), num_clips, n
        ),
    }
    result["ratio"] = result["cnx"] / result["baseline"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=4, help="clips timed per method at the original setting")
    parser.add_argument(
        "--tiny_clips", type=int, default=40, help="clips timed per method at the tiny setting"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: one core)")
    parser.add_argument("--results", type=Path, default=None, help="write the record here, not in results/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # decord readers are opened with one thread already
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="cnx-bench-") as tmp:
        t0 = time.perf_counter()
        meta = make_portrait_clip(Path(tmp))
        print(f"generated a 1080x1920 72-frame clip and its pose video in {time.perf_counter() - t0:.1f} s")
        orig_ds = ClipDataset(meta, width=576, height=1024, sample_n_frames=21, interval_frame=3)
        results.append(
            run_setting("original 576x1024, 21 frames, interval 3 (1080x1920 source)", orig_ds, args.clips)
        )
    tiny_meta = DATA_SAMPLES / "meta_info.json"
    if tiny_meta.exists():
        tiny_ds = ClipDataset(tiny_meta, width=64, height=96, sample_n_frames=8, interval_frame=3)
        results.append(
            run_setting("tiny 64x96, 8 frames, interval 3 (data_samples)", tiny_ds, args.tiny_clips)
        )
    else:
        print(f"skipping the tiny setting: {tiny_meta} not found (run `cnx samples data_samples`)")

    print(f"\nclips/s with torch.set_num_threads({args.threads}), decord 1 thread")
    header = (
        f"{'setting':<58} {'cnx':>8} {'baseline':>9} {'ratio':>6}   {'read only: cnx':>14} {'baseline':>9}"
    )
    print(header)
    for r in results:
        print(
            f"{r['setting']:<58} {r['cnx']:>8.2f} {r['baseline']:>9.2f} {r['ratio']:>5.1f}x"
            f"   {r['cnx_read']:>14.2f} {r['baseline_read']:>9.2f}"
        )
    orig = results[0]
    low, high = GPU_STEP_SECONDS
    per_clip = 1 / orig["cnx"]
    workers = max(1, int(np.ceil(per_clip / low)))
    verdict = (
        "one core keeps one GPU fed" if workers == 1 else f"{workers} DataLoader workers per GPU keep it fed"
    )
    print(
        f"\noriginal setting: {per_clip:.2f} s per clip on one core (baseline {1 / orig['baseline']:.2f} s). "
        f"One SVD-xt training step (21x576x1024) takes roughly {low:g}-{high:g} s on an H100 "
        f"(benchmarks/results/bench_train_svd_xt.json): {verdict}."
    )
    for r in results:
        verdict = "met" if r["ratio"] >= 2 else "NOT met"
        print(f"target >= 2x the baseline, {r['setting'].split(',')[0]}: {verdict} ({r['ratio']:.1f}x)")
    print(
        "(where read-only speeds are close, H.264 decoding of the clip's span dominates: both ways\n"
        " decode the same frames; cnx saves the seek back for the reference, scales inside the decoder\n"
        " and resizes uint8 instead of float32)"
    )
    print(f"benchmark ran in {time.perf_counter() - started:.0f} s")
    settings = {"threads": args.threads, "clips": args.clips, "tiny_clips": args.tiny_clips}
    rounded = [{key: round(v, 3) if isinstance(v, float) else v for key, v in r.items()} for r in results]
    write(record("bench_data", settings=settings, rows=rounded), args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
