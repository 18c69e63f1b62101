"""A latent cache on disk: each frame's VAE posterior and CLIP embedding, computed once per dataset.

A training step otherwise encodes every frame of every clip with the frozen VAE (at 576x1024
about 2.6 TFLOP a frame) and a small dataset shows the encoder the same frames again and again.
`build_cache` (the `cnx cache-latents` command) encodes each frame of each video once, at the
training resolution and crop, and `CachedClipDataset` hands a training step those posteriors
instead of the clip's pixels; `cnx.step` then samples them with the step's generator, the
draw an uncached step makes, so the latents are the same.

Layout of a cache folder:
    manifest.json          what the cache is for (`cache_identity`): the VAE's and the image
                           encoder's files, the resolution, the crop positions, the dtype, the data list
    shards/00003.safetensors   entry 3 of meta_info.json: parameters (N, S, 2C, h, w), the posterior's
                           mean and log-variance of each of the video's N frames at S crop positions;
                           embeddings (N, S, D), the CLIP image embedding of each frame (any frame can
                           be the reference)
    shards/00003.json      written last, atomically: the shard is complete and which video it holds
                           (name, size, mtime), so a killed build resumes and an edited video is stale.

What changes with the cache (docs/latent_cache.md): the random crop offset is drawn as before but
snapped to the nearest cached position (`--crop_positions`; 1 = centred, so random crops are off
where a video needs cropping); with `--ref_augment` the reference is augmented, so its CLIP
embedding is computed on the fly. The reference itself is still read, noise-augmented in pixel
space and encoded: one frame per clip through the VAE encoder instead of F + 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from cnx.data import ClipDataset, cached_video_size, crop_resize, crop_window, decode_size
from cnx.media import InputError
from cnx.meta import read_meta_info

FORMAT = 1  # bumped when the layout or what a shard holds changes
MANIFEST = "manifest.json"
SHARDS = "shards"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
READ_CHUNK_FRAMES = 16  # frames decoded at once while building (a 1080p video never whole in memory)


class LatentCacheError(InputError):
    """A cache that is missing, incomplete, stale or built for something else; one line naming it."""


# ---------------------------------------------------------------------------------------------
# Identity: what a cache was built from


def crop_offsets(positions: int) -> tuple[float, ...]:
    """`positions` crop offsets evenly spread over [0, 1]; one is the centre."""
    if positions < 1:
        raise ValueError(f"crop positions must be at least 1, got {positions}")
    return (0.5,) if positions == 1 else tuple(i / (positions - 1) for i in range(positions))


def _file_digest(path: Path) -> str:
    """sha256 of a file; a Hugging Face cache file is a link to a blob named by its hash: read for free."""
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs":
        return target.name
    digest = hashlib.sha256()
    with target.open("rb") as file:
        while block := file.read(2**24):
            digest.update(block)
    return digest.hexdigest()


def part_folder(source: str, subfolder: str, revision: str | None = None) -> Path:
    """The folder of one part of an SVD pipeline: a local folder's, or the hub snapshot's."""
    if Path(source).is_dir():
        folder = Path(source) / subfolder
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source, revision=revision, allow_patterns=[f"{subfolder}/*"]))
        except Exception as err:  # offline and not cached, no such repository: one line
            raise LatentCacheError(f"{source}: cannot find its {subfolder}/ ({type(err).__name__})") from None
        folder = folder / subfolder
    if not folder.is_dir():
        raise LatentCacheError(f"{source}: no {subfolder}/ folder")
    return folder


def folder_digest(folder: Path) -> str:
    """sha256 over the names and contents of a folder's files (config and weights): the part's identity."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.relative_to(folder)}\0{_file_digest(path)}\n".encode())
    return digest.hexdigest()


def cache_identity(
    source: str,
    revision: str | None,
    meta_info_path: str | Path,
    width: int,
    height: int,
    embeddings: bool,
) -> dict:
    """What a cache depends on: the VAE's (and image encoder's) files, the resolution, the data list."""
    identity = {
        "format": FORMAT,
        "vae": folder_digest(part_folder(source, "vae", revision)),
        "image_encoder": None,
        "width": int(width),
        "height": int(height),
        "meta_info": hashlib.sha256(Path(meta_info_path).read_bytes()).hexdigest(),
    }
    if embeddings:
        parts = [part_folder(source, name, revision) for name in ("image_encoder", "feature_extractor")]
        identity["image_encoder"] = hashlib.sha256("".join(map(folder_digest, parts)).encode()).hexdigest()
    return identity


def video_stamp(path: Path) -> dict:
    """A video's name, size and mtime: a shard is stale when its video's stamp changed."""
    stat = Path(path).stat()
    return {"name": Path(path).name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _differences(found: dict, expected: dict) -> list[str]:
    """What differs between a cache's identity and the one a run expects, in words."""
    words = []
    if found.get("format") != expected["format"]:
        return [f"its format is {found.get('format')}, this cnx reads {expected['format']}"]
    if (found.get("width"), found.get("height")) != (expected["width"], expected["height"]):
        words.append(
            f"it was built at {found['width']}x{found['height']}, "
            f"this run trains at {expected['width']}x{expected['height']}"
        )
    if found.get("vae") != expected["vae"]:
        words.append(
            f"it was built with another VAE (files {found['vae'][:12]}, this run's {expected['vae'][:12]})"
        )
    if expected["image_encoder"] and found.get("image_encoder") not in (None, expected["image_encoder"]):
        words.append("its CLIP embeddings come from another image encoder")
    if found.get("meta_info") != expected["meta_info"]:
        words.append("it was built for another meta_info.json (its list of videos differs)")
    return words


# ---------------------------------------------------------------------------------------------
# Writing


def read_manifest(cache_dir: Path) -> dict | None:
    """A cache folder's manifest, None when there is none; a damaged one is refused in one line."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LatentCacheError(
            f"{path}: not a latent cache manifest ({err}); rebuild with --overwrite"
        ) from None
    if not isinstance(manifest, dict):
        raise LatentCacheError(f"{path}: not a latent cache manifest; rebuild with --overwrite")
    return manifest


def _write_atomic(path: Path, write) -> None:
    """`write(temporary_path)`, then rename over `path`: a reader never sees half a file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    write(partial)
    os.replace(partial, path)


def _write_json(path: Path, value: dict) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n"))


def shard_paths(cache_dir: Path, index: int) -> tuple[Path, Path]:
    """(tensors, completion marker) of entry `index`."""
    stem = Path(cache_dir) / SHARDS / f"{index:05d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def read_marker(cache_dir: Path, index: int) -> dict | None:
    """The completion marker of a shard whose tensors are there, else None."""
    tensors, marker = shard_paths(cache_dir, index)
    try:
        record = json.loads(marker.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not tensors.is_file() or tensors.stat().st_size != record.get("bytes"):
        return None
    return record


@dataclass(frozen=True)
class BuildSummary:
    cache_dir: Path
    entries: int  # shards in the cache
    built: int  # shards encoded by this build (the rest were complete)
    frames: int  # frames encoded by this build, every crop position counted
    bytes: int  # size of the cache's shards


def load_encoders(source: str, revision: str | None, device, embeddings: bool):
    """The VAE (and image encoder, feature extractor) in float32 on `device`, as `cnx.step` runs them."""
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from cnx.latents import channels_last_on_cpu
    from cnx.tiny import quiet_progress_bars

    with quiet_progress_bars():
        vae = AutoencoderKLTemporalDecoder.from_pretrained(source, subfolder="vae", revision=revision)
        encoder = extractor = None
        if embeddings:
            encoder = CLIPVisionModelWithProjection.from_pretrained(
                source, subfolder="image_encoder", revision=revision
            )
            extractor = CLIPImageProcessor.from_pretrained(
                source, subfolder="feature_extractor", revision=revision
            )
    for frozen in (vae, encoder):
        if frozen is not None:
            frozen.requires_grad_(False).eval().to(device)
            if frozen.dtype != torch.float32:  # diffusers warns on every `to(dtype)`, even a no-op
                frozen.to(torch.float32)
    return channels_last_on_cpu(vae), encoder, extractor


@torch.no_grad()
def encode_shard(
    entry, vae, encoder, extractor, width: int, height: int, offsets, chunk: int, bar=None
) -> dict:
    """Entry's tensors: parameters (N, S, 2C, h, w) and embeddings (N, S, D), float32, and its slots.

    The frames are made exactly as `ClipDataset` makes them (same decode size, crop and scaling),
    and encoded `chunk` at a time (a CPU step encodes one at a time, `cnx.latents.encode_chunk_frames`).
    Offsets that give the same pixel window share a slot (an uncropped video holds one).
    """
    from cnx import video
    from cnx.latents import embed_reference

    src_width, src_height = cached_video_size(entry.video_path)
    centred = crop_window(src_width, src_height, width, height)
    size = decode_size(src_width, src_height, centred, width, height)
    reader = video.open_video(entry.video_path, size)
    decoded_width, decoded_height = size or (src_width, src_height)
    boxes, slots = [], []
    for offset in offsets:
        box = crop_window(src_width, src_height, width, height, offset)
        window = box.pixels(decoded_width, decoded_height)
        if window not in [b.pixels(decoded_width, decoded_height) for b in boxes]:
            boxes.append(box)
        slots.append([b.pixels(decoded_width, decoded_height) for b in boxes].index(window))
    parameters, embeddings = [], []
    for start in range(0, len(reader), READ_CHUNK_FRAMES):
        frames = video.read_frames(reader, list(range(start, min(start + READ_CHUNK_FRAMES, len(reader)))))
        per_box_parameters, per_box_embeddings = [], []
        for box in boxes:
            pixels = crop_resize(frames, box, width, height).to(torch.float32).div_(127.5).sub_(1.0)
            params, embeds = [], []
            for i in range(0, len(pixels), chunk):  # (n, 3, H, W) in [-1, 1], as ClipDataset's pixel_values
                part = pixels[i : i + chunk].to(vae.device)
                params.append(vae.encode(part).latent_dist.parameters.float().cpu())  # (n, 2C, h, w)
                if encoder is not None:
                    embeds.append(embed_reference(encoder, part, extractor)[:, 0].float().cpu())  # (n, D)
                if bar is not None:
                    bar.update(len(part))
            per_box_parameters.append(torch.cat(params))
            if encoder is not None:
                per_box_embeddings.append(torch.cat(embeds))
        parameters.append(torch.stack(per_box_parameters, dim=1))  # (n, S, 2C, h, w)
        if encoder is not None:
            embeddings.append(torch.stack(per_box_embeddings, dim=1))  # (n, S, D)
    tensors = {"parameters": torch.cat(parameters)}
    if encoder is not None:
        tensors["embeddings"] = torch.cat(embeddings)
    return {"tensors": tensors, "slots": slots, "frames": len(reader)}


def build_cache(
    cache_dir: str | Path,
    meta_info_path: str | Path,
    source: str,
    revision: str | None = None,
    width: int = 576,
    height: int = 1024,
    crop_positions: int = 1,
    dtype: str = "float32",
    embeddings: bool = True,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> BuildSummary:
    """Encode every entry of `meta_info_path` into `cache_dir`; complete, current shards are kept.

    A build killed at any moment continues where it stopped: a shard counts only once its marker
    is written (last, atomically). A folder holding a cache for something else is refused unless
    `overwrite`, which empties it first.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from cnx import video
    from cnx.latents import encode_chunk_frames

    if dtype not in DTYPES:
        raise LatentCacheError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cache_dir = Path(cache_dir)
    entries = read_meta_info(meta_info_path)
    offsets = crop_offsets(crop_positions)
    identity = cache_identity(source, revision, meta_info_path, width, height, embeddings)
    manifest = {
        **identity,
        "crop_offsets": list(offsets),
        "dtype": dtype,
        "encoded_in": "float32",
        "entries": len(entries),
    }
    manifest_path = cache_dir / MANIFEST
    found = read_manifest(cache_dir)
    if found is not None:
        if found != manifest:
            if not overwrite:
                differs = _differences(found, identity) or ["its crop positions, dtype or embeddings differ"]
                raise LatentCacheError(
                    f"{cache_dir}: holds a latent cache for something else ({'; '.join(differs)}); "
                    "pass --overwrite to replace it, or give another --cache_dir"
                )
            shutil.rmtree(cache_dir / SHARDS, ignore_errors=True)
    elif (
        cache_dir.exists() and any(not p.name.startswith(".") for p in cache_dir.iterdir()) and not overwrite
    ):
        raise LatentCacheError(
            f"{cache_dir}: not empty and not a latent cache; pass --overwrite or another folder"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_json(manifest_path, manifest)  # first: a build started beside this one finds a cache
    (cache_dir / SHARDS).mkdir(exist_ok=True)

    todo = []  # entries whose shard is missing, incomplete or stale
    for entry in entries:
        marker = read_marker(cache_dir, entry.index)
        if marker is None or marker["video"] != video_stamp(entry.video_path):
            todo.append(entry)
    summary = dict(built=len(todo), frames=0)
    if todo:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        vae, encoder, extractor = load_encoders(source, revision, device, embeddings)
        chunk = encode_chunk_frames(device, 8)
        total = sum(video.container_info(e.video_path).num_frames for e in todo) * len(offsets)
        with tqdm(
            total=total, desc="cache-latents", unit="frame", disable=not progress, dynamic_ncols=True
        ) as bar:
            for entry in todo:
                stamp = video_stamp(entry.video_path)
                shard = encode_shard(entry, vae, encoder, extractor, width, height, offsets, chunk, bar)
                tensors_path, marker_path = shard_paths(cache_dir, entry.index)
                stored = {k: v.to(DTYPES[dtype]).contiguous() for k, v in shard["tensors"].items()}
                _write_atomic(tensors_path, lambda p, t=stored: (save_file(t, str(p)), p.chmod(0o644)))
                record = {
                    "video": stamp,
                    "frames": shard["frames"],
                    "slots": shard["slots"],
                    "bytes": tensors_path.stat().st_size,
                }
                _write_json(marker_path, record)  # last: the shard is complete
                positions = stored["parameters"].shape[1]  # offsets with the same window share one
                bar.update(shard["frames"] * (len(offsets) - positions))
                summary["frames"] += shard["frames"] * positions
    size = sum(p.stat().st_size for p in (cache_dir / SHARDS).glob("*.safetensors"))
    return BuildSummary(cache_dir, len(entries), summary["built"], summary["frames"], size)


# ---------------------------------------------------------------------------------------------
# Reading


class LatentCache:
    """A complete cache, checked against what a run expects; reads one clip's posteriors.

    Picklable for DataLoader workers: each process opens the shards itself, lazily.
    """

    def __init__(self, cache_dir: str | Path, expected: dict, entries):
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(self.cache_dir)
        if self.manifest is None:
            raise LatentCacheError(
                f"{self.cache_dir}: no latent cache here (no {MANIFEST}); build it with cnx cache-latents"
            )
        differs = _differences(self.manifest, expected)
        if differs:
            raise LatentCacheError(
                f"{self.cache_dir}: stale or mismatched latent cache: {'; '.join(differs)}"
            )
        self.crop_offsets = tuple(self.manifest["crop_offsets"])
        self.has_embeddings = self.manifest["image_encoder"] is not None
        self.markers = []
        for entry in entries:
            marker = read_marker(self.cache_dir, entry.index)
            if marker is None:
                raise LatentCacheError(
                    f"{self.cache_dir}: incomplete: entry {entry.index} ({entry.video_path}) is not cached; "
                    "run cnx cache-latents again to finish it"
                )
            if marker["video"] != video_stamp(entry.video_path):
                raise LatentCacheError(
                    f"{self.cache_dir}: stale: entry {entry.index} ({entry.video_path}) changed since it was "
                    "cached; run cnx cache-latents again to re-encode it"
                )
            self.markers.append(marker)
        self._files = {}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_files"} | {"_files": {}}

    def _open(self, index: int):
        if index not in self._files:
            from safetensors import safe_open

            self._files[index] = safe_open(str(shard_paths(self.cache_dir, index)[0]), framework="pt")
        return self._files[index]

    def _slot(self, index: int, offset: float) -> int:
        return self.markers[index]["slots"][self.crop_offsets.index(offset)]

    def parameters(self, index: int, frames, offset: float) -> torch.Tensor:
        """(F, 2C, h, w) posterior parameters of entry `index`'s `frames` at crop `offset` (stored dtype)."""
        tensors, slot = self._open(index).get_slice("parameters"), self._slot(index, offset)
        return torch.cat([tensors[int(i) : int(i) + 1, slot] for i in frames])

    def embedding(self, index: int, frame: int, offset: float) -> torch.Tensor:
        """(1, D) CLIP embedding of one frame (the reference) at crop `offset`."""
        return self._open(index).get_slice("embeddings")[
            int(frame) : int(frame) + 1, self._slot(index, offset)
        ]


class CachedClipDataset(ClipDataset):
    """`ClipDataset` reading the clip's latents from a `LatentCache`: only the reference frame is decoded.

    Items carry latent_parameters (F, 2C, h, w) instead of pixel_values, and reference_embedding
    (1, D) when the cache holds embeddings and the reference is not augmented.
    """

    def __init__(self, cache: LatentCache, *args, **kwargs):
        super().__init__(*args, crop_offsets=cache.crop_offsets, pixel_frames=False, **kwargs)
        self.cache = cache

    def sample(self, index: int, epoch: int | None = None) -> dict:
        item = super().sample(index, epoch)
        offset = item["crop_offset"]
        item["latent_parameters"] = self.cache.parameters(index, item["frame_indices"].tolist(), offset)
        if self.cache.has_embeddings and not self.ref_augment:
            item["reference_embedding"] = self.cache.embedding(index, item["reference_index"], offset)
        return item


def open_cache(options) -> LatentCache:
    """The cache `cnx train --latent_cache_dir` names, checked against the run's options (one line if not)."""
    entries = read_meta_info(options.meta_info_path)
    manifest = read_manifest(Path(options.latent_cache_dir)) or {}
    embeddings = manifest.get("image_encoder") is not None  # checked only when the run reads them
    expected = cache_identity(
        options.pretrained_model_name_or_path,
        options.revision,
        options.meta_info_path,
        options.width,
        options.height,
        embeddings and not options.ref_augment,
    )
    return LatentCache(options.latent_cache_dir, expected, entries)


def describe(cache: LatentCache, ref_augment: bool) -> str:
    """One line for the start of a run: what the cache replaces and which augmentation it changes."""
    positions = len(cache.crop_offsets)
    crop = (
        "random crop offsets snapped to the centre (random crops off where a video is cropped)"
        if positions == 1
        else f"random crop offsets snapped to {positions} positions"
    )
    clip = (
        "CLIP embeddings on the fly (--ref_augment)"
        if ref_augment or not cache.has_embeddings
        else "CLIP embeddings cached"
    )
    return (
        f"latent cache {cache.cache_dir} ({cache.manifest['dtype']}): the clip's VAE posteriors from disk, "
        f"{clip}, {crop}"
    )


def default_cache_dir(meta_info_path: str | Path) -> Path:
    """Next to the dataset: `latent_cache/` beside its meta_info.json."""
    return Path(meta_info_path).resolve().parent / "latent_cache"


__all__ = [
    "BuildSummary",
    "CachedClipDataset",
    "LatentCache",
    "LatentCacheError",
    "build_cache",
    "cache_identity",
    "crop_offsets",
    "default_cache_dir",
    "describe",
    "open_cache",
]
