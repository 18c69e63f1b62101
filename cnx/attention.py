"""Attention shortcuts for SVD's UNet: the cross-attention over one token, and the SDPA backend order.

SVD's UNet cross-attends (every `attn2`, in the spatial and the temporal
transformer blocks) to one token: the CLIP image embedding, (B*F, 1, 1024)
for the spatial blocks and (B*h*w, 1, 1024) for the temporal ones. A softmax
over one key is exactly 1 whatever the query, so

    attn2(x, ctx) = to_out(to_v(ctx)), broadcast over x's L queries,

and the query path (the block's `norm2`, `to_q`), `to_k`, the attention itself
and L-1 of to_out's L rows are wasted work (at SVD-xt's first level, 9216
queries per frame).
`SingleTokenCrossAttention` computes the right-hand side; the output and every
gradient that flows are the same (tests: allclose 1e-6 in float32).

What changes: `norm2`, `to_q` and `to_k` of those blocks are no longer read, so
they get no gradient at all, where diffusers' path gave them an exactly-zero
one (in float arithmetic, rounding-sized noise). `freeze_bypassed` makes that explicit
by freezing them (they are then left out of the optimizer, the EMA and DDP's
reduction, which would otherwise stop on unused parameters). The original
script trained them with AdamW: weight decay shrank them by (1 - lr * decay)
each step and Adam's normalisation turned the rounding noise into small random
updates. Neither changed what the model computes (no query or key of these
layers reaches the output), but the saved `norm2`/`to_q`/`to_k` weights differ: with
the shortcut they stay as loaded.
"""

from __future__ import annotations

import contextlib

import torch

SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")  # --sdpa_backend


class SingleTokenCrossAttention:
    """A diffusers attention processor for cross-attention to a context of exactly one token.

    Refuses (ValueError) a context of more tokens, an attention mask or a 4-D input: there
    the shortcut would not be exact. `supports` says whether a layer's settings allow it.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = encoder_hidden_states  # (N, 1, D)
        if context is None or context.ndim != 3 or context.shape[1] != 1:
            got = "no context" if context is None else f"a context of shape {tuple(context.shape)}"
            raise ValueError(
                f"SingleTokenCrossAttention needs a context of one token (N, 1, D), got {got}; "
                "train with --no_single_token_cross_attention"
            )
        if attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError(
                "SingleTokenCrossAttention takes (N, L, C) hidden states and no attention mask; "
                "train with --no_single_token_cross_attention"
            )
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        value = attn.to_out[1](attn.to_out[0](attn.to_v(context)))  # (N, 1, C): the one row every query reads
        out = value.expand(hidden_states.shape[0], hidden_states.shape[1], value.shape[-1])  # (N, L, C)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    @staticmethod
    def supports(attn) -> bool:
        """A cross-attention layer whose output the shortcut gives exactly (diffusers' `Attention`)."""
        dropout = attn.to_out[1] if len(attn.to_out) > 1 else None
        return (
            attn.is_cross_attention
            and attn.spatial_norm is None
            and attn.group_norm is None
            and (dropout is None or dropout.p == 0)  # a dropout mask per query would differ from one row's
        )


def cross_attention_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, block) of every transformer block of `model` with a cross-attention `attn2`.

    Raises ValueError for a block whose query path is not SVD's: its `norm2` must feed `attn2` alone
    (diffusers' `TemporalBasicTransformerBlock`, or a `BasicTransformerBlock` with layer_norm).
    """
    from diffusers.models.attention import BasicTransformerBlock, TemporalBasicTransformerBlock

    blocks = [
        (name, module)
        for name, module in model.named_modules()
        if getattr(module, "attn2", None) is not None and module.attn2.is_cross_attention
    ]
    for name, block in blocks:
        temporal = isinstance(block, TemporalBasicTransformerBlock)
        spatial = isinstance(block, BasicTransformerBlock) and block.norm_type == "layer_norm"
        if not (temporal or (spatial and block.pos_embed is None)) or not SingleTokenCrossAttention.supports(
            block.attn2
        ):
            raise ValueError(
                f"the single-token cross-attention is not exact for {name} ({type(block).__name__}): "
                "train with --no_single_token_cross_attention"
            )
    return blocks


def use_single_token_cross_attention(model: torch.nn.Module) -> int:
    """Give every transformer block's cross-attention in `model` (SVD's `attn2`) the shortcut; how many.

    Call `freeze_bypassed` after choosing what trains (`cnx.trainable.select_trainable` does).
    """
    blocks = cross_attention_blocks(model)
    processor = SingleTokenCrossAttention()
    for _, block in blocks:
        block.attn2.set_processor(processor)
    return len(blocks)


def use_default_cross_attention(model: torch.nn.Module) -> None:
    """Undo `use_single_token_cross_attention`: diffusers' SDPA processor, the original's path."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for _, block in cross_attention_blocks(model):
        block.attn2.set_processor(AttnProcessor2_0())


def bypassed_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of what the shortcut never reads: each block's query path, LoRA adapters included.

    The query path is `norm2` (it feeds `attn2` alone), `attn2.to_q` and `attn2.to_k`.
    """
    found = []
    for name, block in cross_attention_blocks(model):
        if isinstance(block.attn2.processor, SingleTokenCrossAttention):
            parts = {"norm2": block.norm2, "attn2.to_q": block.attn2.to_q, "attn2.to_k": block.attn2.to_k}
            found += [(f"{name}.{part}", module) for part, module in parts.items()]
    return found


def freeze_bypassed(model: torch.nn.Module) -> int:
    """Freeze what the shortcut never reads (see the module docstring); returns how many tensors it froze."""
    frozen = 0
    for _, module in bypassed_modules(model):
        for parameter in module.parameters():
            frozen += parameter.requires_grad
            parameter.requires_grad_(False)
    return frozen


@contextlib.contextmanager
def sdpa_priority(backend: str):
    """Scaled-dot-product attention tries `backend` first, then torch's own order; "auto": torch's order.

    No backend is switched off, so a shape the first cannot run falls through to the next (on a
    CPU "cudnn" is never usable and torch's CPU kernel runs). torch puts the math kernel before
    cuDNN, so cuDNN attention is used only when asked for. It must enclose compilation too: a
    compiled graph keeps the kernel chosen while it was traced.
    """
    if backend not in SDPA_BACKENDS:
        raise ValueError(f"--sdpa_backend must be one of {', '.join(SDPA_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # torch's own order (torch 2.13, `torch._C._get_sdp_priority_order()`); the chosen one goes first.
    order = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    chosen = order[backend]
    with sdpa_kernel([chosen, *(b for b in order.values() if b != chosen)], set_priority=True):
        yield
