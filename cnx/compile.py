"""Regional `torch.compile` (`--compile`): each repeated block of SVD's UNet compiled in place.

A step of SVD spends much of its time outside the matmuls: norms run in float32
under autocast, then activations, residual adds and casts, each a kernel launch
and a trip through memory. Compiling the blocks that repeat (the spatio-temporal
resnet, the spatial and the temporal transformer block) fuses those, at the cost
of compiling each block's few shapes once instead of the whole UNet (diffusers'
`compile_repeated_blocks` does this for models that list `_repeated_blocks`;
SVD's UNet lists none). `Module.compile` compiles in place, so parameter names,
state dicts, checkpoints and gradient checkpointing's calls stay as they were.

Compilation happens at a block's first call (minutes for SVD-xt on a GPU, tens
of seconds for the tiny model on a CPU, where inductor needs a C++ compiler).
"""

from __future__ import annotations

import torch

# diffusers' class names of SVD's repeated blocks (diffusers 0.42).
REPEATED_BLOCKS = ("SpatioTemporalResBlock", "BasicTransformerBlock", "TemporalBasicTransformerBlock")
# Compiled graphs kept per block's code: a class meets a few widths x resolutions x (train, eval) each.
CACHE_SIZE_LIMIT = 64


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost modules of `model` whose class is one of REPEATED_BLOCKS."""
    found: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        if type(module).__name__ in REPEATED_BLOCKS:
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return found


def compile_repeated_blocks(model: torch.nn.Module, **compile_kwargs) -> int:
    """Compile every repeated block of `model` in place (`compile_kwargs` go to torch.compile); how many.

    Static shapes (dynamic=False): a block meets a handful of shapes, each worth its own kernels.
    """
    import torch._dynamo

    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"--compile: no block of {', '.join(REPEATED_BLOCKS)} in {type(model).__name__}")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, CACHE_SIZE_LIMIT)
    for block in blocks:
        block.compile(**{"dynamic": False, **compile_kwargs})
    return len(blocks)


def uncompile(model: torch.nn.Module) -> None:
    """Undo `compile_repeated_blocks` (the benchmark times eager and compiled rows in one process).

    Dynamo's caches go too: a graph does not guard on the attention kernel order it was traced under.
    """
    import torch._dynamo

    for module in model.modules():
        module.__dict__.pop("_compiled_call_impl", None)  # what Module.compile sets (torch 2.13)
    torch._dynamo.reset()
