"""`cnx cache-latents`: encode a dataset's frames once into a latent cache (`cnx.latent_cache`).

Then `cnx train --latent_cache_dir=DIR` with the same model, data list and resolution reads the
posteriors instead of encoding the clip's frames every step. Run it again after a kill, or after
adding or editing videos: complete, current shards are kept, the rest are encoded.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass

from cnx import flags
from cnx.flags import flag


@dataclass(frozen=True)
class CacheOptions:
    meta_info_path: str | None = flag(None, "required: the json list of videos, as `cnx train` reads it")
    pretrained_model_name_or_path: str = flag(
        "stabilityai/stable-video-diffusion-img2vid-xt-1-1",
        "SVD pipeline folder or hub id (its vae/, image_encoder/)",
    )
    revision: str | None = flag(None, "hub revision of the pipeline")
    width: int = flag(576, "training width in pixels, as `cnx train --width`")
    height: int = flag(1024, "training height in pixels, as `cnx train --height`")
    cache_dir: str | None = flag(None, "where the cache goes; default: latent_cache/ beside meta_info.json")
    crop_positions: int = flag(
        1,
        "crop offsets cached where a video is cropped: 1 = centred (random crops off), 3 = edges too",
    )
    dtype: str = flag(
        "float32",
        "stored dtype; float32 repeats uncached runs exactly, bfloat16 halves the size",
        ("float32", "bfloat16"),
    )
    embeddings: bool = flag(
        True, "also cache every frame's CLIP image embedding (used when --ref_augment is off)"
    )
    device: str | None = flag(None, "where to encode; default: cuda when there is one, else cpu")
    overwrite: bool = flag(False, "replace a cache built for something else in --cache_dir")
    progress: bool = flag(True, "show a progress bar")

    def problems(self) -> list[str]:
        found = []
        if not self.meta_info_path:
            found.append("--meta_info_path is required: the json list of training videos")
        for name in ("width", "height"):
            if getattr(self, name) < 8 or getattr(self, name) % 8:
                found.append(f"--{name} must be a positive multiple of 8, got {getattr(self, name)}")
        if self.crop_positions < 1:
            found.append(f"--crop_positions must be at least 1, got {self.crop_positions}")
        return found


def main(argv: list[str] | None = None) -> int:
    from cnx.latent_cache import LatentCacheError, build_cache, default_cache_dir

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = flags.build_parser(CacheOptions, "cnx cache-latents", __doc__.splitlines()[0])
    try:
        options = CacheOptions(**vars(parser.parse_args(argv)))
    except ValueError as err:
        print(f"cnx cache-latents: {err}", file=sys.stderr)
        return 2
    problems = options.problems()
    if problems:
        print(f"cnx cache-latents: {'; '.join(problems)}", file=sys.stderr)
        return 2
    from cnx.meta import MetaInfoError
    from cnx.profiles import quiet_known_warnings

    quiet_known_warnings()

    cache_dir = options.cache_dir or default_cache_dir(options.meta_info_path)
    started = time.perf_counter()
    settings = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    del settings["cache_dir"], settings["pretrained_model_name_or_path"]
    try:
        summary = build_cache(cache_dir, source=options.pretrained_model_name_or_path, **settings)
    except (LatentCacheError, MetaInfoError, OSError) as err:
        print(f"cnx cache-latents: {err}", file=sys.stderr)
        return 2
    print(
        f"latent cache {summary.cache_dir}: {summary.entries} videos, {summary.bytes / 2**20:.1f} MiB; "
        f"this run encoded {summary.built} videos ({summary.frames} frames) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
