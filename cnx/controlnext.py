"""ControlNeXt for SVD: a light pose encoder and its cross-normalised injection into the UNet.

ControlNet copies half the UNet to read the control; ControlNeXt replaces that
copy with a few convolutions (3.5 M parameters against SVD-xt's 1.5 G) and adds
their output to the UNet's hidden states once, right after `down_blocks[0]`.
The features are first given the hidden states' mean and standard deviation
("cross-normalisation"), so the addition starts at a sensible magnitude
without zero-initialised layers, and a single `scale` sets the control
strength.

The UNet stays diffusers' own `UNetSpatioTemporalConditionModel`; `ControlNeXtSVD`
wraps it and injects the control with a forward hook that lives only for the
duration of one call.

Pitfall numbers refer to docs/pitfalls.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from cnx.checkpointing import check_granularity, checkpoint_whole_transformers
from cnx.conditioning import DEFAULT_CONTROL_SCALE
from cnx.options import DEFAULT_CHECKPOINTING

CROSS_NORM_EPS = 1e-5  # keeps a constant (e.g. all-black) control map from dividing by zero


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """The one 3x3 convolution used everywhere: padding 1, so training and inference agree (pitfall 21)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)


def noise_level_batch(
    timestep: torch.Tensor | float | int, batch_size: int, device: torch.device
) -> torch.Tensor:
    """One noise-level input per sample, (B,), from a scalar, a 0-d, (1,) or (B,) tensor.

    This is SVD's `c_noise` (0.25 ln sigma), the same continuous "timestep" the UNet gets.
    """
    if not torch.is_tensor(timestep):
        timestep = torch.tensor([float(timestep)], dtype=torch.float32)
    timestep = timestep.to(device).reshape(-1)  # (1,) or (B,)
    if timestep.shape[0] not in (1, batch_size):
        raise ValueError(
            f"timestep must be a scalar or one value per sample ({batch_size}), got {tuple(timestep.shape)}"
        )
    return timestep.expand(batch_size)  # (B,)


# A quarter-width encoder for the narrow stand-in UNets: about 0.2 M parameters and about 1/16 of the
# published encoder's compute, so CPU tests and notebooks stay fast. Only the output width must
# follow the UNet; the rest is free.
TINY_CONTROLNEXT_CONFIG = {
    "time_embed_dim": 64,
    "embed_channels": 16,
    "in_channels": (32, 32),
    "out_channels": (32, 64),
    "groups": (4, 8),
}
SVD_BLOCK_WIDTH = 320  # block_out_channels[0] of SVD's UNet


def controlnext_config_for(unet_width: int) -> dict:
    """ControlNeXt config for a UNet whose first block is `unet_width` wide.

    SVD's 320 gets the published config (the released weights load into it);
    any other width gets the quarter-width encoder with a matching output.
    """
    if unet_width == SVD_BLOCK_WIDTH:
        return {"control_channels": SVD_BLOCK_WIDTH}
    return {**TINY_CONTROLNEXT_CONFIG, "control_channels": unet_width}


class ControlNeXt(ModelMixin, ConfigMixin):
    """The ControlNeXt-SVD-v2 pose encoder: pose frames -> features for the UNet's first block.

    Input: pose_frames (B, F, 3, H, W) with values in [0, 1], and the noise level
    `c_noise` (one per sample, shared by the sample's frames). Output: features
    (B*F, control_channels, ceil(H/8), ceil(W/8)). The resolution halves three
    times: in `embedding[0]` (stride 2), `down_sample[0]` and `down_sample[1]`;
    every other convolution keeps it. `control_channels` must equal the UNet's
    first block width (320 for SVD).

    With the default config the state dict is the published ControlNeXt-SVD-v2
    encoder's, name for name and shape for shape (52 tensors, 3,526,400 parameters).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        time_proj_dim: int = 128,  # sinusoidal features of c_noise
        time_embed_dim: int = 256,  # width of the noise-level embedding fed to every residual block
        embed_channels: int = 64,  # width of the first two (half-resolution) convolutions
        embed_groups: int = 2,  # GroupNorm groups in `embedding`
        in_channels: Sequence[int] = (128, 128),  # input width of each residual block
        out_channels: Sequence[int] = (128, 256),  # output width of each residual block
        groups: Sequence[int] = (4, 8),  # GroupNorm groups of each residual block
        mid_groups: int = 8,  # GroupNorm groups in `mid_convs[0]`
        control_channels: int = 320,  # output width == the UNet's block_out_channels[0]
    ):
        super().__init__()
        in_channels, out_channels, groups = list(in_channels), list(out_channels), list(groups)
        if not len(in_channels) == len(out_channels) == len(groups) >= 1:
            raise ValueError(
                f"in_channels, out_channels and groups need one entry per residual block, "
                f"got {in_channels}, {out_channels}, {groups}"
            )
        if in_channels[1:] != out_channels[:-1]:
            raise ValueError(
                f"each residual block must read the previous one's output: {in_channels=} {out_channels=}"
            )

        self.time_proj = Timesteps(time_proj_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_proj_dim, time_embed_dim)
        # Indices 2, 5, 8 are parameter-free ReLUs; the published state dict numbers the rest.
        self.embedding = nn.Sequential(
            conv3x3(3, embed_channels, stride=2),  # H -> H/2
            nn.GroupNorm(embed_groups, embed_channels),
            nn.ReLU(),
            conv3x3(embed_channels, embed_channels),
            nn.GroupNorm(embed_groups, embed_channels),
            nn.ReLU(),
            conv3x3(embed_channels, in_channels[0]),
            nn.GroupNorm(embed_groups, in_channels[0]),
            nn.ReLU(),
        )
        self.down_res = nn.ModuleList(
            ResnetBlock2D(in_channels=c_in, out_channels=c_out, temb_channels=time_embed_dim, groups=g)
            for c_in, c_out, g in zip(in_channels, out_channels, groups, strict=True)
        )
        # Downsample2D's stride-2 conv3x3 with padding 1; H/2 -> H/4 -> H/8 with the defaults.
        self.down_sample = nn.ModuleList(
            Downsample2D(c, use_conv=True, out_channels=c, padding=1, name="op") for c in out_channels
        )
        width = out_channels[-1]
        self.mid_convs = nn.ModuleList(
            [
                nn.Sequential(  # a residual branch: x + mid_convs[0](x)
                    conv3x3(width, width),
                    nn.ReLU(),
                    nn.GroupNorm(mid_groups, width),
                    conv3x3(width, width),
                    nn.GroupNorm(mid_groups, width),
                ),
                nn.Conv2d(width, control_channels, kernel_size=1),  # to the UNet's width
            ]
        )
        self.gradient_checkpointing = False  # diffusers' enable_gradient_checkpointing() flips this

    def _checkpointed(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        # Recompute activations in backward instead of storing them, when enabled and training.
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)

    def forward(self, pose_frames: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        """Features (B*F, control_channels, ceil(H/8), ceil(W/8)) for pose frames (B, F, 3, H, W)."""
        if pose_frames.ndim != 5 or pose_frames.shape[2] != 3:
            raise ValueError(f"pose_frames must be (B, F, 3, H, W), got {tuple(pose_frames.shape)}")
        batch_size, num_frames = pose_frames.shape[:2]
        weight_dtype = self.time_embedding.linear_1.weight.dtype

        t = noise_level_batch(timestep, batch_size, pose_frames.device)  # (B,)
        t_emb = self.time_proj(t).to(weight_dtype)  # (B, time_proj_dim), float32 from Timesteps
        emb = self.time_embedding(t_emb)  # (B, time_embed_dim)
        emb = emb.repeat_interleave(num_frames, dim=0)  # (B*F, time_embed_dim): shared by a sample's frames

        x = pose_frames.flatten(0, 1).to(weight_dtype)  # (B*F, 3, H, W)
        x = self._checkpointed(self.embedding, x)  # (B*F, in_channels[0], H/2, W/2)
        for res, down in zip(self.down_res, self.down_sample, strict=True):
            x = self._checkpointed(res, x, emb)  # (B*F, out_channels[i], h, w)
            x = down(x)  # (B*F, out_channels[i], h/2, w/2)
        x = x + self._checkpointed(self.mid_convs[0], x)  # (B*F, out_channels[-1], H/8, W/8)
        return self.mid_convs[1](x)  # (B*F, control_channels, H/8, W/8)


def match_moments(control: torch.Tensor, hidden: torch.Tensor, eps: float = CROSS_NORM_EPS) -> torch.Tensor:
    """Give each sample of `control` the mean and std of the same sample of `hidden`.

    control: (N, C, hc, wc); hidden: (N, C, h, w); statistics per sample over
    channels and space (unbiased std), computed in float32 because bf16 sums of
    hundreds of thousands of values lose too many digits. Returns (N, C, hc, wc) float32.
    """
    if control.shape[:2] != hidden.shape[:2]:
        raise ValueError(
            f"control {tuple(control.shape)} and hidden states {tuple(hidden.shape)} must agree in (N, C); "
            "ControlNeXt's control_channels must equal the UNet's block_out_channels[0]"
        )
    control, hidden = control.float(), hidden.float()
    dims = (1, 2, 3)
    mean_c, std_c = control.mean(dims, keepdim=True), control.std(dims, keepdim=True)  # (N, 1, 1, 1)
    mean_h, std_h = hidden.mean(dims, keepdim=True), hidden.std(dims, keepdim=True)  # (N, 1, 1, 1)
    return (control - mean_c) / (std_c + eps) * std_h + mean_h


def cross_normalize(control: torch.Tensor, hidden: torch.Tensor, eps: float = CROSS_NORM_EPS) -> torch.Tensor:
    """The features to add to `hidden`: moments matched to it, then average-pooled to its size.

    control: (B*F, C, hc, wc) from ControlNeXt; hidden: (B*F, C, h, w), the output
    of the UNet's down_blocks[0]. Returns (B*F, C, h, w) in hidden's dtype.
    """
    matched = match_moments(control, hidden, eps)  # (B*F, C, hc, wc)
    return F.adaptive_avg_pool2d(matched, hidden.shape[-2:]).to(hidden.dtype)  # (B*F, C, h, w)


def per_frame_scale(
    control_scale: float | torch.Tensor, batch_size: int, num_frames: int, like: torch.Tensor
) -> torch.Tensor:
    """A float, 0-d or (B,) control scale as (B*F, 1, 1, 1), in `like`'s dtype and device."""
    scale = torch.as_tensor(control_scale, dtype=like.dtype, device=like.device).reshape(-1)
    if scale.shape[0] == 1:
        scale = scale.expand(batch_size)
    if scale.shape[0] != batch_size:
        raise ValueError(
            f"control_scale must be a float or one value per sample ({batch_size}), got {tuple(scale.shape)}"
        )
    return scale.repeat_interleave(num_frames).reshape(-1, 1, 1, 1)  # (B*F, 1, 1, 1)


class ControlNeXtSVD(nn.Module):
    """diffusers' SVD UNet plus ControlNeXt: called like the UNet, plus `pose_frames` and `control_scale`.

    The attributes are named `unet` and `controlnext`, so a training wrapper's
    state dict carries `unet.` / `controlnext.` prefixes that `cnx.weights`
    unwraps. Without `pose_frames` the call is exactly the plain UNet's.
    """

    def __init__(self, unet: nn.Module, controlnext: ControlNeXt, eps: float = CROSS_NORM_EPS):
        super().__init__()
        width = unet.config.block_out_channels[0]
        if controlnext.config.control_channels != width:
            raise ValueError(
                f"ControlNeXt outputs {controlnext.config.control_channels} channels but the UNet's "
                f"first block is {width} wide; build it with ControlNeXt(control_channels={width})"
            )
        self.unet = unet
        self.controlnext = controlnext
        self.eps = eps

    def enable_gradient_checkpointing(
        self, granularity: str = DEFAULT_CHECKPOINTING, checkpoint_func: Callable | None = None
    ) -> None:
        """Recompute activations in backward; `granularity` as `cnx.checkpointing` describes.

        checkpoint_func: diffusers' `gradient_checkpointing_func` (default: non-reentrant
        torch.utils.checkpoint); the memory planner passes its counting stand-in.
        """
        whole = check_granularity(granularity) == "blocks"
        self.unet.enable_gradient_checkpointing(checkpoint_func)
        self.controlnext.enable_gradient_checkpointing(checkpoint_func)
        checkpoint_whole_transformers(self.unet, whole)

    def disable_gradient_checkpointing(self) -> None:
        self.unet.disable_gradient_checkpointing()
        self.controlnext.disable_gradient_checkpointing()
        checkpoint_whole_transformers(self.unet, False)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        added_time_ids: torch.Tensor,
        pose_frames: torch.Tensor | None = None,
        control_scale: float | torch.Tensor = DEFAULT_CONTROL_SCALE,
        return_dict: bool = True,
    ):
        """Denoise `sample` (B, F, C, h, w) with the pose control added after down_blocks[0].

        pose_frames: (B, F, 3, H, W) in [0, 1], or None for no control.
        control_scale: the control strength, a float or one value per sample (B,).
        Raising it pushes the UNet's features further towards the pose features,
        so the video follows the poses more tightly at the cost of image quality
        far above the trained value (0.2); 0 switches the control off, which
        classifier-free guidance uses for the unconditional half of a batch.
        """
        if pose_frames is None:
            return self.unet(sample, timestep, encoder_hidden_states, added_time_ids, return_dict=return_dict)
        if pose_frames.shape[:2] != sample.shape[:2]:
            raise ValueError(
                f"pose_frames {tuple(pose_frames.shape)} and sample {tuple(sample.shape)} differ in (B, F)"
            )
        batch_size, num_frames = sample.shape[:2]
        control = self.controlnext(pose_frames, timestep)  # (B*F, C, H/8, W/8)
        fired = []

        def inject(module, args, output):
            # down_blocks[0] returns (hidden, skip states); the skip states stay untouched.
            hidden, res_samples = output  # hidden: (B*F, C, h, w)
            scale = per_frame_scale(control_scale, batch_size, num_frames, hidden)  # (B*F, 1, 1, 1)
            fired.append(True)
            return hidden + scale * cross_normalize(control, hidden, self.eps), res_samples

        handle = self.unet.down_blocks[0].register_forward_hook(inject)
        try:
            out = self.unet(sample, timestep, encoder_hidden_states, added_time_ids, return_dict=return_dict)
        finally:
            handle.remove()
        if len(fired) != 1:
            raise RuntimeError(
                f"the control was injected {len(fired)} times instead of once; is this an SVD UNet?"
            )
        return out


# ---------------------------------------------------------------------------------------------------------
# Sizes, for the notebook's comparison of ControlNeXt with the UNet and a ControlNet-style copy.


def count_parameters(*modules: nn.Module) -> int:
    """Number of parameters; works on meta-device modules, which hold no memory."""
    return sum(p.numel() for m in modules for p in m.parameters())


def svd_unet_on_meta(**config) -> nn.Module:
    """SVD-xt's UNet (diffusers' default config) on the meta device: shapes only, no memory, no download."""
    from diffusers import UNetSpatioTemporalConditionModel

    with torch.device("meta"):
        return UNetSpatioTemporalConditionModel(**config)


def controlnet_copy_parameters(unet: nn.Module) -> int:
    """Parameters of a ControlNet-style trainable copy of the UNet's encoder half.

    ControlNet copies conv_in, the time and added-time embeddings, every down
    block and the mid block (and adds zero convolutions, not counted here).
    """
    parts = [unet.conv_in, unet.time_embedding, unet.add_embedding, unet.down_blocks, unet.mid_block]
    return count_parameters(*parts)


def encoder_shapes(config: dict, pose_shape: Sequence[int]) -> list[tuple[str, tuple]]:
    """(stage, output shape) through a ControlNeXt of `config` for pose frames `pose_shape` (B, F, 3, H, W).

    Runs a copy on the meta device, so even the full 21 x 576x1024 profile costs nothing.
    """
    with torch.device("meta"):
        model = ControlNeXt.from_config(config)
    stages = [("embedding", model.embedding)]
    for i, (res, down) in enumerate(zip(model.down_res, model.down_sample, strict=True)):
        stages += [(f"down_res.{i}", res), (f"down_sample.{i}", down)]
    stages += [("mid_convs.0 (residual)", model.mid_convs[0]), ("mid_convs.1", model.mid_convs[1])]
    shapes = [("pose_frames", tuple(pose_shape))]
    for name, module in stages:
        module.register_forward_hook(lambda m, a, out, name=name: shapes.append((name, tuple(out.shape))))
    with torch.no_grad():
        model(torch.zeros(pose_shape, device="meta"), torch.zeros(pose_shape[0], device="meta"))
    return shapes
