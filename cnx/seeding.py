"""Random streams derived from a run's `--seed`, one per purpose, never from a global RNG.

A stream is named by parts, e.g. ("data", seed, epoch, index) for one dataset
sample or ("train", seed, rank) for one rank's dropout and noise. Hashing the
parts (rather than adding them) keeps neighbouring streams unrelated: seed 1
rank 0 is not seed 0 rank 1, and the same parts give the same stream on any
worker, rank or machine.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """The first 8 bytes of sha256("cnx:" + ":".join(parts)), cut to 63 bits for torch's manual_seed."""
    digest = hashlib.sha256(("cnx:" + ":".join(map(str, parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def stream_generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded by `derive_seed(*parts)`."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))
