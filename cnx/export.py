"""`cnx export CHECKPOINT OUT`: a training checkpoint as the diffusers folders a finished run writes.

It writes from a `checkpoint-<step>/` folder exactly what the end of training
writes into `output_dir/final` (`cnx.trainable.export_folders`): `controlnext/`,
`unet/` when the UNet trained (for lora also `unet_lora/adapter_model.safetensors`,
`unet/` being the merged UNet), and with `--use_ema` the same again as `*_ema`.
The checkpoint is read by `cnx.checkpoints` (plain, DDP and DeepSpeed ZeRO
runs, strict loads). Input is checked before any model is built; each problem
is one line, `cnx export: <problem>`, exit status 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from cnx.checkpoints import CheckpointError, inspect_checkpoint, load_checkpoint, unet_config


def check_output(out_dir: str | Path, overwrite: bool) -> Path:
    """OUT must be new or empty; with `overwrite` a non-empty folder is written into."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir}: exists and is not empty (pass --overwrite to write into it)")
    return out_dir


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    pretrained_model_name_or_path: str | None = None,
) -> list[Path]:
    """Write the checkpoint's diffusers folders into `out_dir`; return them.

    With `overwrite`, export folders already in `out_dir` (controlnext, unet,
    unet_lora and their `_ema`) are removed first, so none is left from another
    run; nothing else there is touched.
    """
    from cnx.trainable import EXPORT_FOLDERS, export_folders

    found = inspect_checkpoint(checkpoint)
    out_dir = check_output(out_dir, overwrite)
    config = unet_config(found.options, pretrained_model_name_or_path)
    model, trainable, ema = load_checkpoint(found, config)
    for name in EXPORT_FOLDERS:
        for suffix in ("", "_ema"):
            if (out_dir / f"{name}{suffix}").is_dir():
                shutil.rmtree(out_dir / f"{name}{suffix}")
    export_folders(model, out_dir, found.options.trainable, ema, trainable)
    names = [f"{name}{suffix}" for suffix in ("", "_ema") for name in EXPORT_FOLDERS]
    return [out_dir / name for name in names if (out_dir / name).is_dir()]


def describe(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    return f"  {folder}  ({', '.join(p.name for p in files)}; {size / 2**20:.1f} MiB)"


# ---------------------------------------------------------------------------------------------
# The command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnx export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint-<step> folder written by cnx train")
    parser.add_argument("out", help="folder to write the diffusers folders into (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="the SVD folder or hub id whose unet/config.json the run used, if it has moved "
        "(default: the run's own)",
    )
    args = parser.parse_args(argv)
    try:
        found = inspect_checkpoint(args.checkpoint)
        check_output(args.out, args.overwrite)
        unet_config(found.options, args.pretrained_model_name_or_path)  # a config file, not a model
    except CheckpointError as err:
        print(f"cnx export: {err}", file=sys.stderr)
        return 2
    from cnx.weights import WeightLoadError

    try:
        written = export_checkpoint(
            args.checkpoint, args.out, args.overwrite, args.pretrained_model_name_or_path
        )
    except (WeightLoadError, CheckpointError) as err:
        print(f"cnx export: {err}", file=sys.stderr)
        return 1
    options = found.options
    ema = ", with EMA" if options.use_ema else ""
    print(f"exported {found.path} (step {found.step}, --trainable {options.trainable}{ema}) to {args.out}:")
    print("\n".join(describe(folder) for folder in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
