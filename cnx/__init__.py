"""cnx: train ControlNeXt on Stable Video Diffusion, from a laptop CPU to many GPUs."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes 0.50.2 (the `bnb` extra), which diffusers imports whenever it is installed, logs on
# CPUs with avx512_bf16 that it could not fetch a 4-bit matmul kernel from the hub: cnx uses only
# its 8-bit AdamW, so every command would print a warning nobody can act on. That one is dropped.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage()
)
