"""`cnx plan-memory`: what one training step holds in each GPU's memory, before any GPU is rented.

Everything is computed from the model configs on the meta device (shapes, no
storage, nothing downloaded): the tiny profile is `cnx.tiny`'s stand-in, the
full profile SVD-xt (diffusers' default `UNetSpatioTemporalConditionModel`,
`AutoencoderKLTemporalDecoder`, CLIP ViT-H/14) with the published ControlNeXt.

Exact (tests compare them with the real tensors of a tiny training step):
- weights: the UNet + ControlNeXt parameters as the trainer holds them, float32
  (accelerate's autocast computes in half precision but keeps float32 weights), or bf16
  with `weights_dtype` bf16 (`cnx.bf16_adamw`: float32 moments, a float32 master copy of
  the trained weights unless `stochastic_rounding`, no autocast copies);
- gradients: one per trainable parameter, in its dtype;
- optimizer: AdamW's two float32 moments per trainable parameter. Its per-tensor
  `step` counters live on the CPU (torch's non-fused AdamW), so they are CPU bytes;
- frozen: the VAE and the CLIP image encoder in the weight dtype;
- batch: pixel_values, pose_frames, hand_weights and reference_image in float32. With
  `latent_cache` (`cnx train --latent_cache_dir`) the clip's posterior parameters (B, F, 2C, h, w)
  and the reference's CLIP embedding replace pixel_values: 1/24 of its bytes. The frozen weights
  stay: the VAE encoder still encodes the noise-augmented reference, the image encoder serves
  validation (and the reference under --ref_augment), the decoder validation.
Measured:
- activations: the bytes autograd saves for backward (unique storages, weights
  excluded) in one training forward of UNet + ControlNeXt, counted with
  `saved_tensors_hooks` on the meta device, so SVD-xt at 21 x 576x1024 costs a
  second and the count is the real model's, not a scaling guess (tests: the
  tiny model counts the same on meta as with real tensors, and within 10% of
  what glibc's malloc holds after a real forward). Attention is counted as the
  fused kernel SDPA runs on GPUs (and CPUs): q, k, v, output and logsumexp,
  never the L x L matrix. With gradient checkpointing the count is what
  non-reentrant checkpointing keeps (the inputs of each checkpointed block and
  what runs outside them) plus the largest block's own saved tensors, recomputed
  in backward: an upper bound on the backward peak. `--checkpointing` picks
  what is checkpointed (`cnx.checkpointing`): diffusers' own leaves SVD's
  temporal transformer layers outside, and they hold most of SVD-xt's
  checkpointed activations; `blocks` recomputes each transformer whole.
  Mixed precision is counted as the forward of a half-precision module, which is
  what DeepSpeed runs; under autocast the weights' half copies are a part of
  their own (on CPU the tiny model's autocast forward saved within 1% of
  activations + half_copies; CUDA's autocast keeps a few more ops in float32).
  Activations are affine in B*F*H*W: `max_frames` fits a line through two
  measurements and checks its answer.
Modelled (not tested here: no DeepSpeed run on GPUs):
- DeepSpeed (zero_stage >= 1), as the ZeRO paper counts it: the module in the
  weight dtype (half under mixed precision; ZeRO-3 partitions it), a float32
  master copy and the AdamW moments of the trainable parameters partitioned over
  the GPUs, half gradients (ZeRO-2/3 partitioned, plus two 5e8-element reduce
  buckets: DeepSpeed's default size, doubled by the overlap_comm that
  `cnx.launch` writes) and the float32 gradient partition of the step;
  `offload_optimizer` moves master, moments and fp32 gradients to the CPU.
  ZeRO-3's gathered layers (prefetch, live parameters) are not counted.
- Plain DDP over several GPUs keeps its flat all-reduce buckets beside `.grad`
  (accelerate's default `gradient_as_bucket_view=False`): twice the gradients.
- Autocast's half copies of the weights, held from the forward to the backward.
- 8-bit AdamW from bitsandbytes' state layout: one byte per moment for tensors
  of 4096 or more elements plus a float32 absmax per 256, float32 moments below
  (tested against bitsandbytes' own state on a CPU).
- EMA: a copy of the trainable parameters in the module's dtype (under DeepSpeed
  mixed precision the engine has made them half, so the copy is half too); float32
  for bf16 weights, whose EMA the trainer keeps in float32.
Not counted: the CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation,
the gradients of activations alive during backward and the VAE's chunked
no-grad encoding before the forward (freed before the UNet's forward, so off the peak; a latent
cache leaves one frame of it): `reserve_gb` (default 2) stands for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from dataclasses import dataclass

import torch

from cnx import flags
from cnx.flags import flag
from cnx.options import CHECKPOINTING, DEFAULT_CHECKPOINTING, TRAINABLE, WEIGHTS_DTYPES, weights_problems
from cnx.profiles import PROFILES, get_profile

GiB = 2**30
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
MIXED_PRECISION = ("no", "fp16", "bf16")
ZERO_STAGES = (0, 1, 2, 3)  # 0: no DeepSpeed (accelerate's DDP)
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's default reduce_bucket_size
DEEPSPEED_REDUCE_BUCKETS = 2  # cnx.launch's deepspeed.json sets overlap_comm: a double buffer
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps smaller tensors' moments in float32
BNB_BLOCK = 256  # bitsandbytes' blockwise quantisation: one float32 absmax per block
BNB_QMAPS = 2 * 256 * 4  # its two shared 256-entry float32 quantisation maps
DEFAULT_RESERVE_GB = 2.0  # CUDA context, workspaces, fragmentation (see the module docstring)
PARTS = ("weights", "half_copies", "master_weights", "gradients", "optimizer", "ema", "frozen", "batch",
         "activations")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Options and the plan


@dataclass(frozen=True)
class MemoryOptions:
    profile: str = flag("full", "model sizes and default clip shape", tuple(PROFILES))
    trainable: str = flag("full", "what trains, as `cnx train --trainable`", TRAINABLE)
    num_gpus: int = flag(1, "data-parallel GPUs (ZeRO partitions over them)")
    mixed_precision: str | None = flag(None, "no, fp16 or bf16; default: the profile's", MIXED_PRECISION)
    zero_stage: int = flag(0, "DeepSpeed ZeRO stage; 0 = no DeepSpeed (DDP)", ZERO_STAGES)
    offload_optimizer: bool = flag(False, "DeepSpeed: optimizer states (and fp32 master) on the CPU")
    use_8bit_adam: bool = flag(False, "bitsandbytes' 8-bit AdamW")
    weights_dtype: str = flag(
        "fp32", "the UNet and ControlNeXt weights' dtype, as `cnx train`", WEIGHTS_DTYPES
    )
    stochastic_rounding: bool = flag(False, "bf16 weights updated by stochastic rounding: no float32 master")
    use_ema: bool = flag(False, "keep an EMA copy of the trainable parameters")
    gradient_checkpointing: bool = flag(True, "recompute activations in backward")
    checkpointing: str = flag(
        DEFAULT_CHECKPOINTING, "what checkpointing recomputes, as `cnx train --checkpointing`", CHECKPOINTING
    )
    latent_cache: bool = flag(False, "train from a latent cache: the batch holds posteriors, not pixels")
    single_token_cross_attention: bool = flag(
        True, "the cross-attention to one token as to_out(to_v(token)), as `cnx train`'s default"
    )
    per_gpu_batch_size: int = flag(1, "clips per GPU per micro-batch")
    sample_n_frames: int | None = flag(None, "frames per clip; default: the profile's")
    width: int | None = flag(None, "pixels, a multiple of 8; default: the profile's")
    height: int | None = flag(None, "pixels, a multiple of 8; default: the profile's")
    rank: int = flag(128, "LoRA rank, with trainable=lora")
    gpu_memory_gb: float | None = flag(None, "GPU memory in GiB (an 80 GB card holds 80): find max_frames")
    reserve_gb: float = flag(DEFAULT_RESERVE_GB, "GiB kept free for what the plan does not count")

    def resolved(self) -> MemoryOptions:
        """These options with the profile's defaults filled in."""
        profile = get_profile(self.profile)
        return dataclasses.replace(
            self,
            mixed_precision=self.mixed_precision or profile.mixed_precision,
            sample_n_frames=self.sample_n_frames or profile.sample_n_frames,
            width=self.width or profile.width,
            height=self.height or profile.height,
        )

    def problems(self) -> list[str]:
        found = []
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata["choices"]
            if choices and value not in (*choices, None):
                found.append(f"--{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        for name in ("num_gpus", "per_gpu_batch_size", "sample_n_frames", "rank"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                found.append(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                found.append(f"--{name} must be a positive multiple of 8, got {value}")
        if self.offload_optimizer and self.zero_stage == 0:
            found.append("--offload_optimizer is DeepSpeed's: give --zero_stage 1, 2 or 3")
        mixed_precision = self.mixed_precision or get_profile(self.profile).mixed_precision
        found += weights_problems(
            self.weights_dtype, self.stochastic_rounding, mixed_precision, self.use_8bit_adam
        )
        if self.weights_dtype == "bf16" and self.zero_stage:
            found.append(
                "--weights_dtype=bf16 is for runs without DeepSpeed (ZeRO keeps bf16 weights itself)"
            )
        if self.gpu_memory_gb is not None and not self.gpu_memory_gb > 0:
            found.append(f"--gpu_memory_gb must be greater than 0, got {self.gpu_memory_gb}")
        if not self.reserve_gb >= 0:
            found.append(f"--reserve_gb must be 0 or more, got {self.reserve_gb}")
        return found


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU of each part of one training step; `cpu_bytes` is what sits in host memory."""

    options: MemoryOptions  # resolved
    weights: int
    half_copies: int
    master_weights: int
    gradients: int
    optimizer: int
    ema: int
    frozen: int
    batch: int
    activations: int
    cpu_bytes: int
    trainable_parameters: int
    max_frames: int | None = None  # the most frames per clip that fit options.gpu_memory_gb, else None

    @property
    def parts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in PARTS}

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    def as_dict(self) -> dict:
        return {
            **self.parts,
            "total_bytes": self.total_bytes,
            "cpu_bytes": self.cpu_bytes,
            "trainable_parameters": self.trainable_parameters,
            "max_frames": self.max_frames,
            "options": dataclasses.asdict(self.options),
        }

    def table(self) -> str:
        o = self.options
        engine = "DDP" if o.num_gpus > 1 else "1 process"
        if o.zero_stage:
            engine = f"DeepSpeed ZeRO-{o.zero_stage}"
        bf16_update = "stochastic rounding" if o.stochastic_rounding else "float32 master"
        extras = [
            f"gradient checkpointing ({o.checkpointing})"
            if o.gradient_checkpointing
            else "no gradient checkpointing",
            *(["optimizer offload"] if o.offload_optimizer else []),
            *(["8-bit Adam"] if o.use_8bit_adam else []),
            *([f"bf16 weights ({bf16_update})"] if o.weights_dtype == "bf16" else []),
            *(["EMA"] if o.use_ema else []),
            *(["latent cache"] if o.latent_cache else []),
        ]
        lines = [
            f"{o.profile} profile, trainable {o.trainable} ({self.trainable_parameters:,} parameters), "
            f"{o.num_gpus} GPU{'s' if o.num_gpus > 1 else ''}, {engine}, "
            f"mixed precision {o.mixed_precision}, {', '.join(extras)}",
            f"{o.per_gpu_batch_size} x {o.sample_n_frames} frames of {o.width}x{o.height} per GPU",
            "",
            f"{'part':<16}{'GiB per GPU':>12}",
            *(f"{name:<16}{value / GiB:>12.3f}" for name, value in self.parts.items()),
            f"{'total':<16}{self.total_bytes / GiB:>12.3f}",
            f"{'CPU (host)':<16}{self.cpu_bytes / GiB:>12.3f}",
        ]
        if self.max_frames is not None:
            lines.append(
                f"\nlargest frame count that fits {o.gpu_memory_gb:g} GiB ({o.reserve_gb:g} GiB kept free): "
                f"{self.max_frames}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Models on the meta device


def full_components_on_meta():
    """SVD-xt's UNet, VAE and CLIP ViT-H/14 image encoder and the published ControlNeXt, on meta."""
    from cnx.tiny import build_svd_xt_components

    unet, vae, image_encoder, _, controlnext = build_svd_xt_components("meta")
    return unet, vae, image_encoder, controlnext


def tiny_components():
    """The stand-in's UNet, VAE, image encoder and ControlNeXt (built for real: they are small).

    The widths are those of the pretrained tiny SVD the tiny profile trains from (`cnx.pretrain`).
    """
    from cnx.controlnext import ControlNeXt, controlnext_config_for
    from cnx.pretrain_recipe import PretrainConfig
    from cnx.tiny import build_tiny_components

    tiny = PROFILES["tiny"]
    unet, vae, image_encoder, _ = build_tiny_components(
        unet_width=tiny.unet_width, unet_inner_width=tiny.unet_inner_width, vae_width=PretrainConfig.vae_width
    )
    return unet, vae, image_encoder, ControlNeXt(**controlnext_config_for(tiny.unet_width))


def meta_models(profile: str, trainable: str, rank: int, single_token: bool = True):
    """(ControlNeXtSVD with `trainable` selected, [vae, image_encoder]), all on the meta device.

    `single_token`: the UNet's cross-attention as `cnx train --single_token_cross_attention` (the
    default) runs it, its unread query path frozen (`cnx.attention`). One build per setting and
    process, however the arguments are spelled.
    """
    return _meta_models(profile, trainable, rank, single_token)


@functools.lru_cache(maxsize=8)
def _meta_models(profile: str, trainable: str, rank: int, single_token: bool):
    from cnx.attention import use_single_token_cross_attention
    from cnx.controlnext import ControlNeXtSVD
    from cnx.trainable import select_trainable

    build = full_components_on_meta if profile == "full" else tiny_components
    unet, vae, image_encoder, controlnext = build()
    # .to("meta"): a few diffusers parameters are made with torch.Tensor([...]), which ignores the device.
    model = ControlNeXtSVD(unet, controlnext).to("meta")
    if single_token:
        use_single_token_cross_attention(model.unet)
    select_trainable(model, trainable, rank)
    return model, [vae.to("meta"), image_encoder.to("meta")]


def state_bytes(modules, dtype: torch.dtype | None = None) -> int:
    """Bytes of the modules' parameters and buffers; floating parameters counted in `dtype` if given."""
    total = 0
    for module in modules:
        for p in module.parameters():
            size = dtype.itemsize if dtype is not None and p.is_floating_point() else p.element_size()
            total += p.numel() * size
        total += sum(b.numel() * b.element_size() for b in module.buffers())
    return total


def adam8bit_bytes(numels: list[int]) -> int:
    """bitsandbytes AdamW8bit's state for tensors of these sizes (its layout, not run here)."""
    total = BNB_QMAPS
    for n in numels:
        total += 2 * n + 2 * 4 * -(-n // BNB_BLOCK) if n >= BNB_MIN_8BIT_SIZE else 2 * 4 * n
    return total


# ---------------------------------------------------------------------------------------------
# Activations


class SavedBytes:
    """Unique storages autograd saves for backward, per level of (simulated) checkpointed blocks.

    `pack` is a saved_tensors_hooks pack hook; `checkpoint` stands in for diffusers'
    `_gradient_checkpointing_func`: it runs the block under its own level and keeps,
    as non-reentrant torch.utils.checkpoint does, only the block's inputs (when the
    block saved anything), remembering the block's own saved bytes for its recompute.
    """

    def __init__(self, exclude: set[int]):
        self.exclude = exclude  # storages not to count: the weights, the batch
        self.levels: list[dict[int, int]] = [{}]  # storage id -> bytes, outermost first
        self.recompute = [0]  # per level: the largest recompute peak of its blocks
        # Every storage seen, held until the count is done: a freed one's id could be reused by a
        # later tensor, which would then go uncounted (the count varied from run to run).
        self.seen: list = []

    def _add(self, tensor: torch.Tensor, level: dict[int, int]) -> None:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.exclude:
            level[storage._cdata] = storage.nbytes()
            self.seen.append(storage)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._add(tensor, self.levels[-1])
        return tensor

    def checkpoint(self, module, *args):
        self.levels.append({})
        self.recompute.append(0)
        try:
            out = module(*args)
        finally:
            saved, inner = self.levels.pop(), self.recompute.pop()
        if saved:
            inputs: dict[int, int] = {}
            for arg in args:
                if torch.is_tensor(arg):
                    self._add(arg, inputs)
            self.levels[-1].update(inputs)
            own = sum(size for key, size in saved.items() if key not in inputs)
            self.recompute[-1] = max(self.recompute[-1], own + inner)
        return out

    @property
    def held(self) -> int:
        """Bytes held from the end of the forward into the backward."""
        return sum(self.levels[0].values())

    @property
    def total(self) -> int:
        """Held bytes plus the largest checkpointed block's, recomputed in backward."""
        return self.held + self.recompute[0]


class FusedAttention(torch.overrides.TorchFunctionMode):
    """SDPA on meta tensors as the fused (flash) kernel GPUs and CPUs run, not the L x L math path."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and args[0].device.type == "meta":
            names = ("attn_mask", "dropout_p", "is_causal", "scale")
            options = dict(zip(names, args[3:], strict=False)) | kwargs
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                *args[:3],
                options.get("dropout_p", 0.0),
                options.get("is_causal", False),
                attn_mask=options.get("attn_mask"),
                scale=options.get("scale"),
            )[0]
        return func(*args, **kwargs)


def measure_saved(
    model,
    clip: tuple[int, int, int, int],
    dtype: torch.dtype,
    checkpointing: bool,
    granularity: str = DEFAULT_CHECKPOINTING,
) -> SavedBytes:
    """What autograd keeps for backward after one training forward of `model` (a ControlNeXtSVD).

    clip: (B, F, H, W). Runs on the model's device (meta: shapes only) in `dtype`,
    with the inputs `cnx.step.training_step` gives it; sets the model's dtype and
    checkpointing at `granularity` (with `SavedBytes.checkpoint` standing in for torch's).
    """
    batch_size, num_frames, height, width = clip
    device = next(model.parameters()).device
    config = model.unet.config
    num_ids = config.projection_class_embeddings_input_dim // config.addition_time_embed_dim
    model.to(dtype)
    saved = SavedBytes({p.untyped_storage()._cdata for p in model.parameters()})
    if checkpointing:
        model.enable_gradient_checkpointing(granularity, saved.checkpoint)
    else:
        model.disable_gradient_checkpointing()
    with torch.device(device):
        latent_shape = (batch_size, num_frames, config.in_channels, height // 8, width // 8)
        sample = torch.randn(latent_shape).to(dtype)  # (B, F, 8, h, w): noisy + reference latents
        c_noise = torch.randn(batch_size)  # (B,) float32
        embeddings = torch.randn(batch_size, 1, config.cross_attention_dim).to(dtype)  # (B, 1, D)
        time_ids = torch.randn(batch_size, num_ids).to(dtype)  # (B, 3)
        pose_frames = torch.rand(batch_size, num_frames, 3, height, width)  # (B, F, 3, H, W)
        control_scale = torch.full((batch_size,), 0.2)  # (B,)
    saved.exclude.add(pose_frames.untyped_storage()._cdata)  # the batch's own tensor: counted there
    hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor)
    with torch.enable_grad(), FusedAttention(), hooks:
        pose = pose_frames.to(dtype)
        model(sample, c_noise, embeddings, time_ids, pose_frames=pose, control_scale=control_scale)
    return saved


@functools.lru_cache(maxsize=512)  # --fit plans many settings that share a model, a clip and a mode
def measure_activations(
    model,
    clip: tuple[int, int, int, int],
    dtype: torch.dtype,
    checkpointing: bool,
    granularity: str = DEFAULT_CHECKPOINTING,
) -> int:
    """Activation bytes of one training step at clip (B, F, H, W): held plus the largest recompute."""
    return measure_saved(model, clip, dtype, checkpointing, granularity).total


@dataclass(frozen=True)
class AffineFit:
    """y = slope * x + intercept through two points (activations are affine in B*F*H*W, and in F)."""

    slope: float
    intercept: float

    @classmethod
    def through(cls, x0: float, y0: float, x1: float, y1: float) -> AffineFit:
        slope = (y1 - y0) / (x1 - x0)
        return cls(slope, y0 - slope * x0)

    def __call__(self, x: float) -> float:
        return self.slope * x + self.intercept


# ---------------------------------------------------------------------------------------------
# The plan


def batch_bytes(clip: tuple[int, int, int, int], latents: tuple[int, int] | None = None) -> int:
    """The collated batch on the GPU in float32: pixel_values and pose_frames (B, F, 3, H, W),
    hand_weights (B, F, 1, H, W), reference_image (B, 3, H, W).

    `latents` (C, D) for a latent cache's batch: latent_parameters (B, F, 2C, H/8, W/8) and
    reference_embedding (B, 1, D) instead of pixel_values.
    """
    batch_size, num_frames, height, width = clip
    if latents is None:
        return 4 * batch_size * height * width * (7 * num_frames + 3)
    channels, embedding_dim = latents
    parameters = num_frames * 2 * channels * (height // 8) * (width // 8)
    return 4 * batch_size * (height * width * (4 * num_frames + 3) + parameters + embedding_dim)


def cached_latents(options: MemoryOptions, frozen) -> tuple[int, int] | None:
    """(latent channels, CLIP embedding size) when the options train from a latent cache, else None."""
    if not options.latent_cache:
        return None
    vae, image_encoder = frozen
    return vae.config.latent_channels, image_encoder.config.projection_dim


def state_parts(o: MemoryOptions, model) -> dict[str, int]:
    """Bytes per GPU of what does not depend on the clip, and `cpu_bytes`, for resolved options."""
    half = HALF.get(o.mixed_precision)
    deepspeed = o.zero_stage > 0
    if o.weights_dtype == "bf16":  # cnx.bf16_adamw: no autocast copies, fp32 state beside the weights
        return bf16_weights_parts(o, model)
    # DeepSpeed casts the module to the half dtype; accelerate's autocast keeps it float32.
    module_size = half.itemsize if deepspeed and half is not None else 4
    trainable = [p.numel() for p in model.parameters() if p.requires_grad]
    num_all, num_trainable = sum(p.numel() for p in model.parameters()), sum(trainable)
    part = -(-num_trainable // o.num_gpus)  # this GPU's share of a partitioned trainable tensor
    parts = dict(
        weights=module_size * (-(-num_all // o.num_gpus) if o.zero_stage == 3 else num_all),
        half_copies=half.itemsize * num_all if half is not None and not deepspeed else 0,
        ema=module_size * num_trainable if o.use_ema else 0,
        cpu_bytes=0,
    )
    if not deepspeed:  # the module is the master copy; AdamW's `step` counters sit on the CPU
        ddp_buckets = 4 * num_trainable if o.num_gpus > 1 else 0
        parts.update(
            master_weights=0,
            gradients=4 * num_trainable + ddp_buckets,
            optimizer=adam8bit_bytes(trainable) if o.use_8bit_adam else 8 * num_trainable,
            cpu_bytes=0 if o.use_8bit_adam else 4 * len(trainable),
        )
        return parts
    grads = module_size * (num_trainable if o.zero_stage == 1 else part)
    if o.zero_stage >= 2:
        grads += DEEPSPEED_REDUCE_BUCKETS * module_size * min(DEEPSPEED_REDUCE_BUCKET, num_trainable)
    fp32_grads = 4 * part if half is not None else 0  # the step's upcast gradient partition
    master, optimizer = 4 * part, adam8bit_bytes([part]) if o.use_8bit_adam else 8 * part
    if o.offload_optimizer:
        return parts | dict(
            master_weights=0, gradients=grads, optimizer=0, cpu_bytes=master + fp32_grads + optimizer
        )
    return parts | dict(master_weights=master, gradients=grads + fp32_grads, optimizer=optimizer)


def bf16_weights_parts(o: MemoryOptions, model) -> dict[str, int]:
    """`cnx train --weights_dtype=bf16` without DeepSpeed: the module and gradients in bf16 (DDP's
    buckets too), float32 moments, a float32 master unless stochastic rounding, a float32 EMA."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ddp_buckets = 2 * trainable if o.num_gpus > 1 else 0
    return dict(
        weights=state_bytes([model], torch.bfloat16),
        half_copies=0,  # autocast has nothing to cast: the weights are bf16 already
        master_weights=0 if o.stochastic_rounding else 4 * trainable,
        gradients=2 * trainable + ddp_buckets,
        optimizer=8 * trainable,
        ema=4 * trainable if o.use_ema else 0,
        cpu_bytes=0,  # its step counters are Python ints
    )


def plan_memory(options: MemoryOptions) -> MemoryPlan:
    """The plan for `options` (see the module docstring for what is exact, measured and modelled)."""
    problems = options.problems()
    if problems:
        raise ValueError("; ".join(problems))
    o = options.resolved()
    model, frozen = meta_models(o.profile, o.trainable, o.rank, o.single_token_cross_attention)
    dtype = HALF.get(o.mixed_precision, torch.float32)
    clip = (o.per_gpu_batch_size, o.sample_n_frames, o.height, o.width)
    plan = MemoryPlan(
        options=o,
        **state_parts(o, model),
        frozen=state_bytes(frozen, dtype),
        batch=batch_bytes(clip, cached_latents(o, frozen)),
        activations=measure_activations(model, clip, dtype, o.gradient_checkpointing, o.checkpointing),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    if o.gpu_memory_gb is None:
        return plan
    return dataclasses.replace(plan, max_frames=max_frames(plan, model, dtype))


def max_frames(plan: MemoryPlan, model, dtype: torch.dtype) -> int:
    """The most frames per clip whose plan fits the GPU memory less the reserve (0 when none does).

    Only the batch and the activations grow with the frames, both affinely: a line
    through two measurements predicts the answer, which is then checked (and walked
    one frame at a time should the line be off).
    """
    o = plan.options
    budget = (o.gpu_memory_gb - o.reserve_gb) * GiB
    fixed = plan.total_bytes - plan.batch - plan.activations
    latents = cached_latents(
        o, meta_models(o.profile, o.trainable, o.rank, o.single_token_cross_attention)[1]
    )

    @functools.cache
    def total(frames: int) -> int:
        if frames == o.sample_n_frames:
            return plan.total_bytes
        clip = (o.per_gpu_batch_size, frames, o.height, o.width)
        activations = measure_activations(model, clip, dtype, o.gradient_checkpointing, o.checkpointing)
        return fixed + batch_bytes(clip, latents) + activations

    f0, f1 = o.sample_n_frames, 2 * o.sample_n_frames
    line = AffineFit.through(f0, total(f0), f1, total(f1))
    frames = max(1, math.floor((budget - line.intercept) / line.slope))
    while frames > 1 and total(frames) > budget:
        frames -= 1
    if total(frames) > budget:
        return 0
    while total(frames + 1) <= budget:
        frames += 1
    return frames


# ---------------------------------------------------------------------------------------------
# What fits a GPU

CHECKPOINTING_SETTINGS = {  # --fit's label -> MemoryOptions fields
    "none": {"gradient_checkpointing": False},
    **{mode: {"gradient_checkpointing": True, "checkpointing": mode} for mode in CHECKPOINTING},
}
OPTIMIZER_SETTINGS = {  # --fit's label -> MemoryOptions fields: the optimizer and weight states
    "AdamW": {},
    "8-bit AdamW": {"use_8bit_adam": True},
    "bf16 weights + fp32 master": {"weights_dtype": "bf16"},
    "bf16 weights, stochastic rounding": {"weights_dtype": "bf16", "stochastic_rounding": True},
}


def fit(options: MemoryOptions, gpu_memory_gb: float, progress: bool = False) -> list[dict]:
    """Every trainable set x checkpointing x latent cache x optimizer state that trains on a GPU of
    `gpu_memory_gb` at the resolution of `options`: its most frames and its plan at the profile's
    frames, most frames first. The rest of `options` (GPUs, ZeRO, EMA, batch) holds for all;
    combinations `options.problems()` refuses (bf16 weights under ZeRO) are left out."""
    from tqdm.auto import tqdm

    settings = [
        (trainable, checkpointing, cache, optimizer)
        for trainable in TRAINABLE
        for checkpointing in CHECKPOINTING_SETTINGS
        for cache in (False, True)
        for optimizer in OPTIMIZER_SETTINGS
    ]
    rows = []
    for trainable, checkpointing, cache, optimizer in tqdm(
        settings, desc=f"plans for {gpu_memory_gb:g} GB", unit="plan", disable=not progress, file=sys.stderr
    ):
        fields = CHECKPOINTING_SETTINGS[checkpointing] | OPTIMIZER_SETTINGS[optimizer]
        o = dataclasses.replace(
            options, trainable=trainable, latent_cache=cache, gpu_memory_gb=gpu_memory_gb, **fields
        )
        if o.problems():
            continue
        plan = plan_memory(o)
        if plan.max_frames:
            rows.append(
                {
                    "trainable": trainable,
                    "checkpointing": checkpointing,
                    "latent_cache": cache,
                    "optimizer": optimizer,
                    "max_frames": plan.max_frames,
                    "frames": plan.options.sample_n_frames,
                    "total_gib": round(plan.total_bytes / GiB, 1),
                }
            )
    return sorted(rows, key=lambda row: -row["max_frames"])


def fit_table(rows: list[dict], gpu_memory_gb: float) -> str:
    if not rows:
        return f"nothing fits {gpu_memory_gb:g} GB at this resolution"
    header = (
        f"settings that fit {gpu_memory_gb:g} GB, most frames first (GiB: the plan at the profile's frames)"
    )
    lines = [
        header,
        f"{'trainable':12}{'checkpointing':15}{'cache':7}{'optimizer':35}{'frames':>8}{'GiB':>8}",
    ]
    for row in rows:
        lines.append(
            f"{row['trainable']:12}{row['checkpointing']:15}{'yes' if row['latent_cache'] else 'no':7}"
            f"{row['optimizer']:35}{row['max_frames']:>8}{row['total_gib']:>8}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """One flag per MemoryOptions field (`--no_gradient_checkpointing` keeps activations), plus --json."""
    parser = flags.build_parser(
        MemoryOptions,
        "cnx plan-memory",
        "Bytes per GPU of a ControlNeXt-SVD training step, from the model configs alone.",
        defaults={"gpu_memory_gb": 80.0},
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--fit",
        type=float,
        metavar="GPU_GB",
        help="list every trainable set x checkpointing x latent cache x optimizer state that fits this GPU",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = vars(build_parser().parse_args(argv))
        as_json, gpu_memory_gb = args.pop("json"), args.pop("fit")
        if gpu_memory_gb is not None:
            if not gpu_memory_gb > 0:
                raise ValueError(f"--fit must be greater than 0, got {gpu_memory_gb}")
            rows = fit(MemoryOptions(**args), gpu_memory_gb, progress=not as_json)
            print(json.dumps(rows) if as_json else fit_table(rows, gpu_memory_gb))
            return 0
        plan = plan_memory(MemoryOptions(**args))
    except ValueError as err:
        print(f"cnx plan-memory: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan.as_dict()) if as_json else plan.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
