"""Run profiles: `tiny` (laptop CPU, bundled samples, pretrained tiny SVD) and `full` (the original setting).

One variable switches a notebook between them: `CNX_PROFILE=full` in the
environment, or `setup_notebook("full")`.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_SAMPLES = REPO_ROOT / "data_samples"
CACHE_DIR = REPO_ROOT / ".cache"


@dataclass(frozen=True)
class Profile:
    name: str
    pretrained_model_name_or_path: str  # diffusers SVD pipeline folder or hub id
    meta_info_path: str  # json list of {video_path, guide_path, meta_info}
    validation_image_folder: str  # ground-truth frames 0.png..N.png
    validation_control_folder: str  # pose frames 0.png..N.png
    validation_image: str  # the reference image
    width: int  # training width in pixels (original README: 576)
    height: int  # training height in pixels (original README: 1024)
    sample_n_frames: int  # frames per training clip (original README: 21)
    interval_frame: int  # spacing between sampled frames; <= 0 draws one in [2, 7]
    mixed_precision: str  # "no" on CPU, "bf16" on GPUs
    unet_width: int  # first UNet block width: 320 for SVD, small for the stand-in
    unet_inner_width: int  # second UNet block width: 640 for SVD


_VALIDATION = DATA_SAMPLES / "validation"
# The pretrained tiny SVD (`cnx pretrain-tiny`, trained on synthetic dancers at 128x192).
TINY_SVD = DATA_SAMPLES / "tiny_svd"

TINY = Profile(
    name="tiny",
    pretrained_model_name_or_path=str(TINY_SVD),
    meta_info_path=str(DATA_SAMPLES / "meta_info.json"),
    validation_image_folder=str(_VALIDATION / "ground_truth"),
    validation_control_folder=str(_VALIDATION / "pose"),
    validation_image=str(_VALIDATION / "reference_image.png"),
    width=128,  # the pretrained tiny SVD's resolution: limbs a few pixels wide
    height=192,
    sample_n_frames=4,  # short clips: twice the optimizer steps per minute of 8, and faster learning
    interval_frame=3,
    mixed_precision="no",
    unet_width=64,
    unet_inner_width=64,
)
PROFILES = {
    "tiny": TINY,
    # The original setting, on the bundled data until CNX_META_INFO points it at a real dataset.
    "full": replace(
        TINY,
        name="full",
        pretrained_model_name_or_path="stabilityai/stable-video-diffusion-img2vid-xt-1-1",
        width=576,
        height=1024,
        sample_n_frames=21,
        mixed_precision="bf16",
        unet_width=320,
        unet_inner_width=640,
    ),
}


def get_profile(name: str | None = None) -> Profile:
    """The named profile, else `$CNX_PROFILE`, else `tiny`; `$CNX_META_INFO` points it at your own data."""
    name = name or os.environ.get("CNX_PROFILE", "tiny")
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    profile = PROFILES[name]
    if os.environ.get("CNX_META_INFO"):
        profile = replace(profile, meta_info_path=os.environ["CNX_META_INFO"])
    return profile


def ensure_model(profile: Profile) -> Profile:
    """Stop, naming the command that makes it, when a local pipeline folder is missing (hub ids: later)."""
    path = Path(profile.pretrained_model_name_or_path)
    if path.is_absolute() and not (path / "model_index.json").is_file():
        hint = f"cnx pretrain-tiny {path}" if path == TINY_SVD else f"cnx tiny-model {path}"
        raise FileNotFoundError(f"{path}: no SVD pipeline folder (model_index.json); make it with `{hint}`")
    return profile


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (`avx512_bf16`, `amx_bf16`, ...); none elsewhere."""
    try:
        return frozenset(Path(cpuinfo).read_text().split())
    except OSError:  # not Linux: assume none
        return frozenset()


def cpu_has_bfloat16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively: x86 AVX512-BF16 or AMX (Linux's flags).

    The evidence for turning bf16 autocast on there, with AMX or without: on 2 cores it trains the
    tiny model faster than float32 on both (a `cnx train` run with AMX; a `cnx pretrain-tiny` UNet
    step about twice as fast on an AMD EPYC with avx512_bf16 and no AMX), and its steps are finite
    and repeat exactly on both once `cnx.cpu_kernels` computes the Conv3d weight gradients that
    oneDNN gets wrong without AMX. Elsewhere the same autocast is emulated and slower, so the tiny
    profile stays float32 and only a caller that checks asks for it (notebook 05, the convergence
    test). `cnx pretrain-tiny` asks by default and says so where this is False.
    """
    flags = cpu_flags(cpuinfo)
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _DropMessages(logging.Filter):
    """Drops the log records whose message contains one of `parts`; every other record passes."""

    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


# Two messages a learner cannot act on, each matched exactly on its own logger:
# transformers says it swapped in its PIL image processor because torchvision is missing (cnx
# never uses torchvision), and DeepSpeed, which accelerate imports, says it fell back to the CPU.
_NO_TORCHVISION = _DropMessages("requires torchvision (not installed); falling back to `")
_DEEPSPEED_ON_CPU = _DropMessages("Setting accelerator to CPU. If you have GPU or other accelerator")


def quiet_known_warnings(cpu: bool = True) -> None:
    """Silence those two messages (the DeepSpeed one only when `cpu`, where it is expected)."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_NO_TORCHVISION)
    if cpu:
        logging.getLogger("DeepSpeed").addFilter(_DEEPSPEED_ON_CPU)  # addFilter skips a repeat


def setup_notebook(name: str | None = None, seed: int = 0) -> Profile:
    """First cell of every notebook: pick the profile, seed, make sure the model exists."""
    profile = get_profile(name)
    quiet_known_warnings(cpu=profile.mixed_precision == "no")
    profile = ensure_model(profile)
    seed_everything(seed)
    return profile
