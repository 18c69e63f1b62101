"""The sampler a command asks for: trained weights found wherever `cnx train` put them, in a pipeline.

`find_trained_weights` accepts everything a user may point `--controlnext` at:
- a weights file, or a ControlNeXt diffusers folder (config.json): the ControlNeXt alone;
- an export (`final/`, `cnx export`'s OUT): `controlnext/` and, when the UNet trained, `unet/`;
- a `checkpoint-<step>/` of any run (plain, DDP, LoRA, controlnext-only,
  DeepSpeed ZeRO): read through `cnx.checkpoints`, as `cnx export` reads it;
- a training output_dir: its latest complete checkpoint, or `final/` when it has none.
With `ema`, the EMA weights of a run trained with `--use_ema` are used instead.
`add_sampling_arguments` / `sampling_options` are the flags `cnx generate` and
`cnx validate` share.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cnx.media import InputError
from cnx.runs import final_dir, is_checkpoint, latest_checkpoint


@dataclass(frozen=True)
class TrainedWeights:
    """Where the weights to sample with are: an export or file, or a training checkpoint."""

    controlnext: Path | None  # a ControlNeXt file or diffusers folder (None for a checkpoint)
    unet: Path | None = None  # a trained UNet folder, when the export has one
    checkpoint: Path | None = None  # a complete `checkpoint-<step>` folder
    ema: bool = False

    def describe(self) -> str:
        which = " (EMA)" if self.ema else ""
        if self.checkpoint is not None:
            return f"checkpoint {self.checkpoint}{which}"
        return f"ControlNeXt {self.controlnext}" + (f", UNet {self.unet}" if self.unet else "") + which


def find_trained_weights(path: str | Path, ema: bool = False) -> TrainedWeights:
    """The weights at `path` (module docstring); InputError naming the path when there are none."""
    path = Path(path)
    suffix = "_ema" if ema else ""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder of ControlNeXt weights")
    if path.is_file() or (path / "config.json").is_file():
        if ema:
            raise InputError(f"{path}: a single ControlNeXt, no EMA weights beside it (drop --ema)")
        return TrainedWeights(path)
    if (path / "controlnext").is_dir():
        if not (path / f"controlnext{suffix}").is_dir():
            raise InputError(f"{path}: no controlnext{suffix}/ (was the run trained with --use_ema?)")
        unet = path / f"unet{suffix}"
        return TrainedWeights(path / f"controlnext{suffix}", unet if unet.is_dir() else None, ema=ema)
    checkpoint = path if is_checkpoint(path) else latest_checkpoint(path)
    if checkpoint is not None:
        _checked_checkpoint(checkpoint, ema)
        return TrainedWeights(None, checkpoint=checkpoint, ema=ema)
    if final_dir(path) is not None:
        return find_trained_weights(final_dir(path), ema)
    raise InputError(
        f"{path}: no ControlNeXt weights here (expected a weights file, a folder with config.json or "
        "controlnext/, a checkpoint-<step> folder, or a training output_dir with checkpoints or final/)"
    )


def _checked_checkpoint(path: Path, ema: bool):
    """The `cnx.checkpoints.Checkpoint` at `path`, checked without reading weights; InputError naming it."""
    from cnx.checkpoints import CheckpointError, inspect_checkpoint

    try:
        checkpoint = inspect_checkpoint(path)
    except CheckpointError as err:
        raise InputError(str(err)) from None
    if ema and not checkpoint.options.use_ema:
        raise InputError(f"{path}: the run did not use --use_ema, so there are no EMA weights (drop --ema)")
    return checkpoint


def load_pipeline(
    pretrained_model_name_or_path: str,
    weights: TrainedWeights | None = None,
    unet: str | Path | None = None,
    device: str | None = None,
    dtype: str = "float32",
):
    """A ControlNeXtSVDPipeline from an SVD folder or hub id, trained weights, and optionally a UNet."""
    import torch

    from cnx.latents import channels_last_on_cpu
    from cnx.pipeline import ControlNeXtSVDPipeline
    from cnx.tiny import quiet_progress_bars
    from cnx.weights import load_controlnext, load_unet_state

    controlnext = None
    if weights is not None and weights.controlnext is not None:
        controlnext = load_controlnext(weights.controlnext)
    torch_dtype = getattr(torch, dtype)
    with quiet_progress_bars():
        pipe = ControlNeXtSVDPipeline.from_pretrained(
            pretrained_model_name_or_path, controlnext=controlnext, dtype=torch_dtype
        )
    if weights is not None and weights.checkpoint is not None:
        _load_checkpoint_into(pipe, weights.checkpoint, weights.ema)
    unet = unet or (weights.unet if weights is not None else None)
    if unet is not None:
        load_unet_state(pipe.unet, unet)
    for module in (pipe.unet, pipe.controlnext):
        if module is not None and module.dtype != torch_dtype:
            module.to(torch_dtype)
    pipe = pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    channels_last_on_cpu(pipe.vae)
    return pipe


def _load_checkpoint_into(pipe, path: Path, ema: bool) -> None:
    """Put a training checkpoint's ControlNeXt (and its UNet, when trained) into `pipe`.

    The model is rebuilt with the pipeline's own UNet config, so the strict load also
    checks that the checkpoint was trained on this SVD's architecture.
    """
    from cnx.checkpoints import load_checkpoint
    from cnx.trainable import merged_unet

    checkpoint = _checked_checkpoint(path, ema)
    model, trainable, ema_model = load_checkpoint(checkpoint, dict(pipe.unet.config))
    if ema:
        ema_model.copy_to(trainable)
    pipe.register_modules(controlnext=model.controlnext.to(pipe.unet.dtype))
    if checkpoint.options.trainable == "lora":
        pipe.unet.load_state_dict(merged_unet(model.unet).state_dict(), strict=True)
    elif checkpoint.options.trainable != "controlnext":  # controlnext-only runs leave the UNet as it was
        pipe.unet.load_state_dict(model.unet.state_dict(), strict=True)


# ---------------------------------------------------------------------------------------------
# Flags shared by `cnx generate` and `cnx validate`


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The models and the sampler's settings."""
    from cnx import conditioning
    from cnx.pipeline import DEFAULT_OVERLAP

    parser.add_argument(
        "--pretrained_model_name_or_path", required=True, help="SVD pipeline folder or hub id"
    )
    parser.add_argument(
        "--controlnext",
        required=True,
        help="ControlNeXt weights: a file, an export (final/), a checkpoint-<step> folder or an output_dir",
    )
    parser.add_argument(
        "--ema", action="store_true", help="sample with the EMA weights of a run trained with --use_ema"
    )
    parser.add_argument("--unet_model_name_or_path", default=None, help="trained UNet (folder or file)")
    parser.add_argument("--height", type=int, default=None, help="output height, a multiple of 8")
    parser.add_argument("--width", type=int, default=None, help="output width, a multiple of 8")
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--min_guidance_scale", type=float, default=1.0, help="guidance on the first frame")
    parser.add_argument(
        "--max_guidance_scale", type=float, default=3.0, help="on the last; <= 1: no guidance"
    )
    parser.add_argument(
        "--fps", type=float, default=conditioning.DEFAULT_FPS, help="also the videos' frame rate"
    )
    parser.add_argument("--motion_bucket_id", type=float, default=conditioning.DEFAULT_MOTION_BUCKET_ID)
    parser.add_argument("--noise_aug_strength", type=float, default=conditioning.DEFAULT_NOISE_AUG_STRENGTH)
    parser.add_argument("--control_scale", type=float, default=conditioning.DEFAULT_CONTROL_SCALE)
    parser.add_argument(
        "--frames_per_batch", type=int, default=None, help="window length (UNet's num_frames)"
    )
    parser.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help="frames shared by windows")
    parser.add_argument("--decode_chunk_size", type=int, default=None, help="frames decoded at once")
    parser.add_argument("--max_frames", type=int, default=None, help="use only the first N poses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))


def sampling_options(args: argparse.Namespace) -> dict:
    """The pipeline's keyword arguments from the shared flags (all but the size and output type)."""
    import torch

    return dict(
        num_inference_steps=args.num_inference_steps,
        min_guidance_scale=args.min_guidance_scale,
        max_guidance_scale=args.max_guidance_scale,
        fps=args.fps,
        motion_bucket_id=args.motion_bucket_id,
        noise_aug_strength=args.noise_aug_strength,
        control_scale=args.control_scale,
        frames_per_batch=args.frames_per_batch,
        overlap=args.overlap,
        decode_chunk_size=args.decode_chunk_size,
        generator=torch.Generator().manual_seed(args.seed),
    )


def pipeline_from_args(args: argparse.Namespace, weights: TrainedWeights):
    """`load_pipeline` for the shared flags and the weights `find_trained_weights` found."""
    print(f"sampling with {weights.describe()}")
    return load_pipeline(
        args.pretrained_model_name_or_path, weights, args.unet_model_name_or_path, args.device, args.dtype
    )
