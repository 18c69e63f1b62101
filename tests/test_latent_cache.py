"""cnx.latent_cache and `cnx cache-latents`: built once, read back as what an uncached step computes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cnx import memory
from cnx.data import ClipDataset
from cnx.latent_cache import (
    CachedClipDataset,
    LatentCache,
    LatentCacheError,
    build_cache,
    cache_identity,
    load_encoders,
    open_cache,
    shard_paths,
)
from cnx.latents import embed_reference, video_posterior
from cnx.options import parse_options
from cnx.profiles import DATA_SAMPLES
from cnx.step import Objective, build_models, step_generator, training_step

WIDTH, HEIGHT, FRAMES = 64, 96, 4
CACHED = ("latent_parameters", "reference_embedding")  # what a cached batch holds instead of pixel_values


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """Two of data_samples' dancers in a folder of their own (the tests touch and edit its files)."""
    folder = tmp_path_factory.mktemp("dancers")
    entries = json.loads((DATA_SAMPLES / "meta_info.json").read_text())[:2]
    for entry in entries:
        for key in ("video_path", "guide_path", "meta_info"):
            (folder / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(DATA_SAMPLES / entry[key], folder / entry[key])
    (folder / "meta_info.json").write_text(json.dumps(entries, indent=2))
    return folder


@pytest.fixture(scope="module")
def cache_dir(dataset_dir, tiny_svd_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "latents"
    summary = build_cache(
        cache, dataset_dir / "meta_info.json", str(tiny_svd_dir), width=WIDTH, height=HEIGHT, progress=False
    )
    assert (summary.entries, summary.built, summary.frames) == (2, 2, 144)
    return cache


def options_for(tiny_svd_dir, dataset_dir, *extra):
    return [
        f"--pretrained_model_name_or_path={tiny_svd_dir}",
        f"--meta_info_path={dataset_dir / 'meta_info.json'}",
        f"--width={WIDTH}",
        f"--height={HEIGHT}",
        f"--sample_n_frames={FRAMES}",
        "--interval_frame=3",
        "--num_workers=0",
        *extra,
    ]


def test_a_cached_step_reads_what_an_uncached_one_encodes_and_has_its_loss(
    tiny_svd_dir, dataset_dir, cache_dir
):
    options = parse_options(options_for(tiny_svd_dir, dataset_dir, f"--latent_cache_dir={cache_dir}"))
    models, _ = build_models(options, torch.device("cpu"), torch.float32)
    args = (dataset_dir / "meta_info.json", WIDTH, HEIGHT, FRAMES, 3)
    plain, cached = ClipDataset(*args, seed=3), CachedClipDataset(open_cache(options), *args, seed=3)
    item, from_cache = plain.sample(1, epoch=2), cached.sample(1, epoch=2)
    assert "pixel_values" not in from_cache and from_cache["latent_parameters"].shape == (FRAMES, 8, 12, 8)
    for key in ("reference_image", "pose_frames", "hand_weights", "frame_indices", "crop_box"):
        assert torch.equal(item[key], from_cache[key]), key
    # The posteriors and the reference's embedding, bit for bit (a CPU step encodes a frame at a time).
    encoded = video_posterior(models.vae, item["pixel_values"][None], chunk_size=1)[0]
    assert torch.equal(from_cache["latent_parameters"], encoded)
    embedding = embed_reference(models.image_encoder, item["reference_image"][None], models.feature_extractor)
    assert torch.equal(from_cache["reference_embedding"], embedding[0])
    # The same generator draws the same posterior sample, noise and sigma: the same loss.
    objective = Objective.from_options(options)
    batches = [torch.utils.data.default_collate([x]) for x in (item, from_cache)]
    losses = [training_step(models, b, objective, step_generator(0, 0, 1, 0)).loss for b in batches]
    assert torch.equal(*losses)

    # `cnx plan-memory --latent_cache` counts the batch this step moves to the device.
    shared = ("pose_frames", "hand_weights", "reference_image")
    clip, latents = (1, FRAMES, HEIGHT, WIDTH), (4, embedding.shape[-1])
    for batch, keys, cache in ((batches[0], ("pixel_values",), None), (batches[1], CACHED, latents)):
        assert memory.batch_bytes(clip, cache) == sum(4 * batch[k].numel() for k in (*shared, *keys))

    # FLOPs: the VAE encoder runs on the reference alone (1 frame), not on F + 1.
    def encoder_flops(batch):
        with FlopCounterMode(display=False) as counter:
            training_step(models, batch, objective, step_generator(0, 0, 1, 0))
        return sum(counter.get_flop_counts().get("Encoder", {}).values())  # the VAE's encoder, by class

    with FlopCounterMode(display=False) as one:
        models.vae.encoder(item["reference_image"][None])
    per_frame = sum(one.get_flop_counts()["Global"].values())
    assert per_frame > 0
    assert encoder_flops(batches[1]) == per_frame and encoder_flops(batches[0]) == (FRAMES + 1) * per_frame


def test_random_crops_snap_to_the_cached_positions_and_read_back_their_own_windows(
    tiny_svd_dir, dataset_dir, tmp_path
):
    """Square crops of a portrait video: three cached offsets, each the posterior of its own window."""
    meta = tmp_path / "meta_info.json"
    entry = json.loads((dataset_dir / "meta_info.json").read_text())[0]
    meta.write_text(json.dumps([{key: str(dataset_dir / value) for key, value in entry.items()}]))
    summary = build_cache(
        tmp_path / "cache", meta, str(tiny_svd_dir), width=64, height=64, crop_positions=3, embeddings=False
    )
    assert summary.frames == 72 * 3
    identity = cache_identity(str(tiny_svd_dir), None, meta, 64, 64, embeddings=False)
    cache = LatentCache(tmp_path / "cache", identity, ClipDataset(meta, 64, 64, FRAMES, 3).entries)
    assert cache.crop_offsets == (0.0, 0.5, 1.0)
    cached = CachedClipDataset(cache, meta, 64, 64, FRAMES, 3)
    plain = ClipDataset(meta, 64, 64, FRAMES, 3, crop_offsets=cache.crop_offsets)  # the same snapping
    vae = load_encoders(str(tiny_svd_dir), None, torch.device("cpu"), embeddings=False)[0]
    offsets = set()
    for epoch in range(8):
        item, from_cache = plain.sample(0, epoch), cached.sample(0, epoch)
        assert item["crop_offset"] == from_cache["crop_offset"] in cache.crop_offsets
        assert "reference_embedding" not in from_cache
        encoded = video_posterior(vae, item["pixel_values"][None], chunk_size=1)[0]
        assert torch.equal(from_cache["latent_parameters"], encoded)
        offsets.add(item["crop_offset"])
    assert len(offsets) > 1


def test_a_killed_build_resumes_with_the_shard_it_did_not_finish(
    tiny_svd_dir, dataset_dir, cache_dir, tmp_path
):
    resumed = tmp_path / "latents"
    shutil.copytree(cache_dir, resumed)
    tensors, marker = shard_paths(resumed, 1)
    marker.unlink()  # killed after writing the tensors, before the marker: the shard is incomplete
    tensors.write_bytes(tensors.read_bytes()[:100])
    summary = build_cache(
        resumed, dataset_dir / "meta_info.json", str(tiny_svd_dir), width=WIDTH, height=HEIGHT, progress=False
    )
    assert (summary.built, summary.frames) == (1, 72)  # only that video again
    assert tensors.read_bytes() == shard_paths(cache_dir, 1)[0].read_bytes()
    assert shard_paths(resumed, 0)[1].stat().st_mtime_ns == shard_paths(cache_dir, 0)[1].stat().st_mtime_ns


def test_a_stale_or_mismatched_cache_is_refused_in_one_line(tiny_svd_dir, dataset_dir, cache_dir, tmp_path):
    meta = dataset_dir / "meta_info.json"
    entries = ClipDataset(meta, WIDTH, HEIGHT, FRAMES, 3).entries

    def refusal(expected, folder=cache_dir):
        with pytest.raises(LatentCacheError) as err:
            LatentCache(folder, expected, entries)
        assert "\n" not in str(err.value) and str(folder) in str(err.value)
        return str(err.value)

    identity = cache_identity(str(tiny_svd_dir), None, meta, WIDTH, HEIGHT, True)
    LatentCache(cache_dir, identity, entries)  # the cache is for exactly this
    assert "built at 64x96, this run trains at 64x104" in refusal({**identity, "height": 104})
    other_vae = tmp_path / "svd"
    shutil.copytree(tiny_svd_dir, other_vae)
    config = json.loads((other_vae / "vae" / "config.json").read_text())
    (other_vae / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 1.0}))
    other = cache_identity(str(other_vae), None, meta, WIDTH, HEIGHT, True)
    assert "built with another VAE" in refusal(other)
    # A video edited since it was cached: that shard is stale.
    video = entries[0].video_path
    os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 10**9))
    try:
        assert "stale: entry 0" in refusal(identity)
    finally:
        os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns - 10**9))
    # Building into a folder that holds another cache needs --overwrite.
    with pytest.raises(LatentCacheError, match="pass --overwrite"):
        build_cache(cache_dir, meta, str(tiny_svd_dir), width=WIDTH, height=104, progress=False)
    # `cnx train` says it in one line, before any model loads.
    argv = options_for(tiny_svd_dir, dataset_dir, f"--latent_cache_dir={cache_dir}", "--height=104")
    result = subprocess.run(
        [sys.executable, "-m", "cnx.train", *argv, f"--output_dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"cnx train: {cache_dir}: stale or mismatched")


def test_cnx_train_with_the_cache_logs_the_losses_of_the_same_run_without(
    tiny_svd_dir, dataset_dir, cache_dir, tmp_path
):
    def losses(*extra):
        output = tmp_path / f"run{len(extra)}"
        argv = options_for(tiny_svd_dir, dataset_dir, "--max_train_steps=3", f"--output_dir={output}", *extra)
        result = subprocess.run(
            [sys.executable, "-m", "cnx.cli", "train", *argv, "--report_to=none", "--checkpointing_steps=3"],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CNX_PROGRESS": "off"},
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        lines = (output / "logs" / "steps.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines], result.stdout

    plain, _ = losses()
    cached, stdout = losses(f"--latent_cache_dir={cache_dir}")
    assert len(plain) == 3 and cached == plain
    assert "latent cache" in stdout and "CLIP embeddings cached" in stdout
