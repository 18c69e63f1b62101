"""`cnx generate`: animate a reference image along poses with an SVD folder and a trained ControlNeXt.

Inputs are checked before any model loads (files exist, images decode, at
least one pose, sizes multiples of 8), each problem named with its file. The
output folder gets `video.mp4`, `video.gif` and `grid.png`: rows of ground
truth (when given), pose and generated frames at the video's own aspect ratio.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GRID_COLUMNS = 16  # at most this many frames per grid row, evenly spread over the video


class InputError(ValueError):
    """Bad command-line input, found before any model loads; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Reading inputs


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file; InputError naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image does not exist")
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"{path}: cannot read image: {err}") from err


def numbered_images(folder: str | Path) -> list[Path]:
    """A folder's images in numeric order (0.png, 1.png, ..., 10.png), as the original layout names them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: folder does not exist")
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]

    def key(path: Path):
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem)]

    return sorted(files, key=key)


def read_frames_input(path: str | Path, what: str, max_frames: int | None = None):
    """Frames from a video file, a folder of numbered images, or (for poses) a keypoint track `.npz`.

    Returns an (F, H, W, 3) uint8 array, or the track's dict for an `.npz`.
    """
    from cnx.video import VideoReadError, read_frames

    path = Path(path)
    if path.suffix.lower() == ".npz":
        from cnx.pose import load_keypoints

        if not path.is_file():
            raise InputError(f"{path}: {what} keypoints file does not exist")
        track = load_keypoints(path)
        if max_frames:
            track = {k: v[:max_frames] if k not in ("size", "fps") else v for k, v in track.items()}
        if len(track["body"]) == 0:
            raise InputError(f"{path}: no {what} frames")
        return track
    if path.is_dir():
        files = numbered_images(path)[:max_frames]
        if not files:
            raise InputError(f"{path}: no {what} images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        frames = [read_image(f) for f in files]
        sizes = {f.shape for f in frames}
        if len(sizes) > 1:
            raise InputError(f"{path}: {what} images differ in size: {sorted(sizes)}")
        return np.stack(frames)
    if not path.is_file():
        raise InputError(f"{path}: {what} video or folder does not exist")
    try:
        frames = read_frames(path)
    except VideoReadError as err:
        raise InputError(f"{what}: {err}") from err
    if len(frames) == 0:
        raise InputError(f"{path}: no {what} frames")
    return frames[:max_frames]


def output_size(reference: np.ndarray, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width): as given (multiples of 8 required), else the reference's size rounded down to 8."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value < 8 or value % 8):
            raise InputError(f"--{name} must be a positive multiple of 8, got {value}")
    return height or reference.shape[0] // 8 * 8, width or reference.shape[1] // 8 * 8


# ---------------------------------------------------------------------------------------------
# Trained weights and the pipeline


def find_trained_weights(path: str | Path) -> tuple[Path, Path | None]:
    """(ControlNeXt weights, UNet folder or None) from a file, an export, a checkpoint or an output_dir.

    - a weights file, or a ControlNeXt diffusers folder (config.json): the ControlNeXt alone;
    - a folder with `controlnext/` (and maybe `unet/`): an export or a checkpoint;
    - a training output_dir: its latest `checkpoint-<step>` that holds `controlnext/`
      (other folder names, such as `checkpoint-last`, are never parsed as numbers).
    """
    path = Path(path)
    if path.is_file() or (path / "config.json").is_file():
        return path, None
    if (path / "controlnext").is_dir():
        return path / "controlnext", (path / "unet") if (path / "unet").is_dir() else None
    steps = {}
    for child in path.glob("checkpoint-*") if path.is_dir() else []:
        suffix = child.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (child / "controlnext").is_dir():
            steps[int(suffix)] = child
    if steps:
        return find_trained_weights(steps[max(steps)])
    raise InputError(
        f"{path}: no ControlNeXt weights here (expected a weights file, a folder with config.json or "
        "controlnext/, or a training output_dir with checkpoint-<step>/controlnext)"
    )


def load_pipeline(
    pretrained_model_name_or_path: str,
    controlnext: str | Path | None = None,
    unet: str | Path | None = None,
    device: str | None = None,
    dtype: str = "float32",
):
    """A ControlNeXtSVDPipeline from an SVD folder or hub id, a ControlNeXt and optionally a trained UNet."""
    import torch

    from cnx.latents import channels_last_on_cpu
    from cnx.pipeline import ControlNeXtSVDPipeline
    from cnx.tiny import quiet_progress_bars
    from cnx.weights import load_controlnext, load_unet_state

    model = load_controlnext(controlnext) if controlnext is not None else None
    torch_dtype = getattr(torch, dtype)
    with quiet_progress_bars():
        pipe = ControlNeXtSVDPipeline.from_pretrained(
            pretrained_model_name_or_path, controlnext=model, dtype=torch_dtype
        )
    if unet is not None:
        load_unet_state(pipe.unet, unet)
    if pipe.controlnext is not None and pipe.controlnext.dtype != torch_dtype:
        pipe.controlnext.to(torch_dtype)
    pipe = pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    channels_last_on_cpu(pipe.vae)
    return pipe


def pipeline_from_args(args: argparse.Namespace, weights: tuple[Path, Path | None]):
    """`load_pipeline` for the shared flags and the (ControlNeXt, UNet) `find_trained_weights` found."""
    controlnext, unet = weights
    return load_pipeline(
        args.pretrained_model_name_or_path,
        controlnext,
        args.unet_model_name_or_path or unet,
        args.device,
        args.dtype,
    )


# ---------------------------------------------------------------------------------------------
# Writing outputs


def frame_grid(rows: list[np.ndarray], columns: int = GRID_COLUMNS, gap: int = 2) -> np.ndarray:
    """One image of rows of frames (each (F, H, W, 3) uint8, same size), `columns` frames spread evenly.

    Frames keep their size and so their aspect ratio (the original code squashed
    them into a square grid, pitfall 20 in docs/pitfalls.md).
    """
    num_frames, height, width = rows[0].shape[:3]
    picks = np.unique(np.linspace(0, num_frames - 1, min(columns, num_frames)).round().astype(int))
    grid = np.full(
        (len(rows) * (height + gap) - gap, len(picks) * (width + gap) - gap, 3), 255, dtype=np.uint8
    )
    for r, frames in enumerate(rows):
        if frames.shape[1:] != (height, width, 3):
            raise ValueError(
                f"grid row {r} has frames {frames.shape[1:]}, the first row {(height, width, 3)}"
            )
        for c, t in enumerate(picks):
            top, left = r * (height + gap), c * (width + gap)
            grid[top : top + height, left : left + width] = frames[t]
    return grid


def write_outputs(
    out_dir: str | Path, frames: np.ndarray, fps: float, rows: list[np.ndarray]
) -> dict[str, Path]:
    """video.mp4, video.gif and grid.png of (F, H, W, 3) uint8 generated frames; `rows` go above them."""
    from PIL import Image

    from cnx.video import write_video

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"mp4": out_dir / "video.mp4", "gif": out_dir / "video.gif", "grid": out_dir / "grid.png"}
    even = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]  # H.264 needs even sizes
    if even.shape[2] >= 64:
        write_video(paths["mp4"], even, fps=fps)
    else:  # decord cannot read back narrower videos; scale up for the mp4 only
        scale = -(-64 // even.shape[2])
        write_video(paths["mp4"], even.repeat(scale, axis=1).repeat(scale, axis=2), fps=fps)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(paths["gif"], save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    Image.fromarray(frame_grid([*rows, frames])).save(paths["grid"])
    return paths


def to_uint8(frames) -> np.ndarray:
    """(F, H, W, 3) float in [0, 1] (the pipeline's "np" output for one video) -> uint8."""
    return (np.clip(np.asarray(frames), 0.0, 1.0) * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The command


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `cnx generate` and `cnx validate`: the models and the sampler's settings."""
    from cnx import conditioning
    from cnx.pipeline import DEFAULT_OVERLAP

    parser.add_argument(
        "--pretrained_model_name_or_path", required=True, help="SVD pipeline folder or hub id"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnx generate", description=__doc__.splitlines()[0])
    add_sampling_arguments(parser)
    parser.add_argument(
        "--controlnext", required=True, help="ControlNeXt weights, export, checkpoint or output_dir"
    )
    parser.add_argument("--reference_image", required=True, help="the person to animate")
    parser.add_argument(
        "--pose", required=True, help="pose video, folder of pose images, or keypoint track .npz"
    )
    parser.add_argument("--ground_truth", default=None, help="video or image folder shown above the result")
    parser.add_argument(
        "--align_poses", action="store_true", help="move a .npz track onto the reference person"
    )
    parser.add_argument(
        "--reference_keypoints", default=None, help=".npz track whose frame 0 is the reference"
    )
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    try:
        reference = read_image(args.reference_image)
        height, width = output_size(reference, args.height, args.width)
        poses = read_frames_input(args.pose, "pose", args.max_frames)
        truth = (
            read_frames_input(args.ground_truth, "ground truth", args.max_frames)
            if args.ground_truth
            else None
        )
        poses = pose_images(poses, reference, height, width, args.align_poses, args.reference_keypoints)
        weights = find_trained_weights(args.controlnext)
    except InputError as err:
        print(f"cnx generate: {err}", file=sys.stderr)
        return 2
    pipe = pipeline_from_args(args, weights)
    options = sampling_options(args)
    generated = to_uint8(
        pipe(reference, poses, height=height, width=width, output_type="np", **options).frames[0]
    )
    rows = [] if truth is None else [fit(truth[: len(generated)], height, width)]
    paths = write_outputs(args.output_dir, generated, args.fps, [*rows, fit(poses, height, width)])
    print(f"{len(generated)} frames of {width}x{height}: " + ", ".join(str(p) for p in paths.values()))
    return 0


def pose_images(
    poses, reference: np.ndarray, height: int, width: int, align: bool, keypoints_path
) -> np.ndarray:
    """(F, h, w, 3) uint8 pose images; a keypoint track is drawn (aligned to the reference if `align`)."""
    from cnx.pipeline import crop_to_aspect, pose_track_frames, reference_tensor

    if not isinstance(poses, dict):
        if align:
            raise InputError("--align_poses needs a keypoint track (.npz) as --pose, not images")
        return poses
    reference_keypoints = None
    if align:
        if keypoints_path is None:
            raise InputError(
                "--align_poses needs --reference_keypoints (an .npz track whose frame 0 is the reference)"
            )
        track = read_frames_input(keypoints_path, "reference keypoints")
        reference_keypoints = {"body": track["body"][0], "body_scores": track["body_scores"][0]}
    cropped = crop_to_aspect(reference_tensor(reference), height, width)
    return pose_track_frames(poses, cropped, align, reference_keypoints)


def fit(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(F, h, w, 3) uint8 cropped and resized to (F, height, width, 3) as the pipeline does."""
    from cnx.pipeline import fit_frames

    return fit_frames(frames, height, width).permute(0, 2, 3, 1).numpy()


if __name__ == "__main__":
    sys.exit(main())
