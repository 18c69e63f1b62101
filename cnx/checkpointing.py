"""What gradient checkpointing recomputes in SVD's UNet: diffusers' choice, or each whole transformer.

diffusers' `enable_gradient_checkpointing()` recomputes each `SpatioTemporalResBlock`
whole (spatial resnet, temporal resnet, their mixer) and, inside each
`TransformerSpatioTemporalModel`, only the spatial `BasicTransformerBlock`.
The rest of that model runs outside any checkpoint, its activations kept to
the backward: the GroupNorm, `proj_in`, the temporal block, the time mixer and
`proj_out`. At SVD-xt's 21 x 576x1024 they hold most of a checkpointed step's
activations (`cnx plan-memory --checkpointing diffusers`).

Granularities (`cnx train --checkpointing`, `cnx plan-memory --checkpointing`):
- `diffusers`: exactly diffusers' own, the baseline.
- `blocks`: each `TransformerSpatioTemporalModel` is recomputed whole, through
  the model's own `_gradient_checkpointing_func` (non-reentrant
  torch.utils.checkpoint, or the memory planner's stand-in), so only its input
  is kept. Its inner checkpoint of the spatial block is switched off: nested
  in the whole block's, it would run that block a third time in the backward
  and save nothing more. The resnets stay as diffusers checkpoints them (each
  is already one whole block), and so does ControlNeXt's encoder (its
  embedding, residual blocks and mid convolutions, `cnx.controlnext`).

The whole-block forward is an instance attribute of each transformer, present
only while `blocks` is on: the UNet stays diffusers' class with diffusers'
state dict, so published weights load strictly, and `copy.deepcopy` rebinds it
to the copy. Turn it on and off through `ControlNeXtSVD.enable_gradient_checkpointing`
/ `disable_gradient_checkpointing`, not the UNet's own methods (which leave it
in place). ControlNeXt's injection hooks `down_blocks[0]`'s output, outside
every transformer, so it runs once, in the forward, under either granularity.
"""

from __future__ import annotations

import functools
import types

import torch
from diffusers.models.transformers.transformer_temporal import (
    TransformerSpatioTemporalModel,
    TransformerTemporalModelOutput,
)
from torch import nn

from cnx.options import CHECKPOINTING as GRANULARITIES


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"checkpointing granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}"
        )
    return granularity


def _transformer_output(
    self: TransformerSpatioTemporalModel, hidden_states, encoder_hidden_states, indicator
):
    """diffusers' own forward of the transformer: its output (B*F, C, h, w)."""
    return type(self).forward(self, hidden_states, encoder_hidden_states, indicator, return_dict=False)[0]


def _whole_transformer_forward(
    self: TransformerSpatioTemporalModel,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    image_only_indicator: torch.Tensor | None = None,
    return_dict: bool = True,
):
    """The transformer's forward, recomputed whole in the backward when gradients are on."""
    if torch.is_grad_enabled():
        body = functools.partial(_transformer_output, self)
        output = self._gradient_checkpointing_func(
            body, hidden_states, encoder_hidden_states, image_only_indicator
        )
    else:
        output = _transformer_output(self, hidden_states, encoder_hidden_states, image_only_indicator)
    return TransformerTemporalModelOutput(sample=output) if return_dict else (output,)


def whole_transformers(unet: nn.Module) -> list[TransformerSpatioTemporalModel]:
    return [m for m in unet.modules() if isinstance(m, TransformerSpatioTemporalModel)]


def checkpoint_whole_transformers(unet: nn.Module, on: bool) -> None:
    """Recompute each spatio-temporal transformer of `unet` whole (on) or leave them to diffusers (off).

    Call after the UNet's `enable_gradient_checkpointing`, which gives every transformer the
    `_gradient_checkpointing_func` used here.
    """
    for transformer in whole_transformers(unet):
        if on:
            transformer.gradient_checkpointing = False  # no inner checkpoint nested in the whole block's
            transformer.forward = types.MethodType(_whole_transformer_forward, transformer)
        elif is_whole(transformer):
            del transformer.forward  # diffusers' own forward again


def is_whole(transformer: TransformerSpatioTemporalModel) -> bool:
    """Whether `transformer` is recomputed whole (granularity `blocks`)."""
    forward = transformer.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _whole_transformer_forward
