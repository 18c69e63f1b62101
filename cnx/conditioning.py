"""What SVD is conditioned on besides the noisy latents, and how training drops it for guidance.

SVD sees three conditions: the CLIP image embedding of the reference image
(cross-attention), the VAE latent of a slightly noised reference image
(concatenated to the noisy latents channel-wise) and three "added time ids"
(fps - 1, motion bucket, noise-augmentation strength). ControlNeXt adds a
fourth: the pose control, injected with a per-sample `control_scale`.

Classifier-free guidance at sampling time runs an unconditional branch with
the image embedding zeroed, the reference latent zeroed *and* the control off
(scale 0). Training must show the model exactly that input, so the main
dropout case switches all three off together (pitfall 12 in docs/pitfalls.md).

The reference's noise augmentation here (`noise_augment_reference`) is SVD's
own: its strength is one of the added time ids. It is not the dataset's
random zoom / shift / colour jitter (`cnx.data.augment_reference`).

The defaults shared by training and the future sampler live here, once
(pitfall 14): the sampler imports `DEFAULT_FPS`, `DEFAULT_MOTION_BUCKET_ID` and
`DEFAULT_NOISE_AUG_STRENGTH` rather than writing its own numbers. The other
half of pitfall 14, a sampler that ignores the caller's control scale, belongs
to the sampler and is guarded there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cnx.edm import append_dims, gaussian_noise
from cnx.seeding import stream_generator

# SVD-xt's micro-conditioning defaults (StableVideoDiffusionPipeline's own defaults).
DEFAULT_FPS = 7  # frames per second of the clip; SVD was conditioned on fps - 1, so 6 is passed
DEFAULT_MOTION_BUCKET_ID = 127  # amount of motion; 127 is SVD-xt's middle setting
DEFAULT_NOISE_AUG_STRENGTH = 0.02  # std of the noise added to the reference image before encoding
DEFAULT_CONTROL_SCALE = 0.2  # ControlNeXt's control strength in the published models

# Conditioning dropout (probabilities per sample; the three cases are mutually exclusive).
DEFAULT_CONDITIONING_DROPOUT_PROB = 0.1  # all off together: embedding, reference latent, control
DEFAULT_IMAGE_EMBEDDING_DROPOUT_PROB = 0.05  # the CLIP embedding alone
DEFAULT_REFERENCE_LATENT_DROPOUT_PROB = 0.05  # the reference latent alone


# ---------------------------------------------------------------------------
# Per-rank random streams (pitfall 10)
# ---------------------------------------------------------------------------


def rank_generator(seed: int, rank: int, device: str | torch.device = "cpu", stream: str = "train"):
    """One rank's generator: the (stream, seed, rank) stream of `cnx.seeding`.

    The same (seed, rank, stream) always gives the same stream; another rank or
    another --seed gives another, and one rank can hold several independent
    streams (dropout and noise in "train", another for data loading). For a
    notebook or a test that draws a batch's dropout by hand; the trainer draws each
    micro-batch from its own finer stream, `cnx.step.step_generator` (seed, rank,
    step, micro-batch), so a resumed run repeats an uninterrupted one. Neither draws
    from torch's global generator.
    """
    return stream_generator(stream, seed, rank, device=device)


# ---------------------------------------------------------------------------
# The reference image and the added time ids
# ---------------------------------------------------------------------------


def noise_augment_reference(
    reference_image: torch.Tensor, generator: torch.Generator, strength: float = DEFAULT_NOISE_AUG_STRENGTH
) -> torch.Tensor:
    """reference + strength * N(0, 1), same dtype and device; pixels in [-1, 1], (B, 3, H, W).

    SVD encodes a slightly noised reference so the model cannot copy it pixel
    for pixel; the strength also goes into `added_time_ids`, so training and
    sampling must use the same number.
    """
    noise = gaussian_noise(reference_image, generator)
    return (reference_image.to(torch.float32) + strength * noise).to(reference_image.dtype)


def added_time_ids(
    fps: float = DEFAULT_FPS,
    motion_bucket_id: float = DEFAULT_MOTION_BUCKET_ID,
    noise_aug_strength: float = DEFAULT_NOISE_AUG_STRENGTH,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """(batch_size, 3) tensor [fps - 1, motion_bucket_id, noise_aug_strength], the caller's values unchanged.

    `fps` is the clip's real frame rate; SVD was trained on fps - 1, so one is
    subtracted here and nowhere else.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    row = torch.tensor([[fps - 1, motion_bucket_id, noise_aug_strength]], dtype=dtype, device=device)
    return row.repeat(batch_size, 1)


# ---------------------------------------------------------------------------
# Conditioning dropout (pitfall 12)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ConditioningDropout:
    """Per-sample decisions, each (B,): which conditions a sample keeps, and its control scale.

    `control_scale` is 0 exactly where the whole conditioning is dropped and
    the caller's control scale elsewhere; pass it to the ControlNeXt wrapper.
    """

    keep_image_embedding: torch.Tensor  # (B,) bool
    keep_reference_latent: torch.Tensor  # (B,) bool
    control_scale: torch.Tensor  # (B,) float32

    @property
    def unconditional(self) -> torch.Tensor:
        """(B,) bool: the samples that see classifier-free guidance's unconditional input."""
        return ~self.keep_image_embedding & ~self.keep_reference_latent & (self.control_scale == 0)

    @classmethod
    def keep_all(
        cls, batch_size: int, device=None, control_scale: float = DEFAULT_CONTROL_SCALE
    ) -> ConditioningDropout:
        """Every condition on: the conditional branch of the sampler."""
        ones = torch.ones(batch_size, dtype=torch.bool, device=device)
        return cls(ones, ones, torch.full((batch_size,), float(control_scale), device=device))

    @classmethod
    def drop_all(cls, batch_size: int, device=None) -> ConditioningDropout:
        """Every condition off: the unconditional branch of the sampler, as trained."""
        zeros = torch.zeros(batch_size, dtype=torch.bool, device=device)
        return cls(zeros, zeros, torch.zeros(batch_size, device=device))

    def apply(
        self, image_embeddings: torch.Tensor, reference_latents: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero the dropped embeddings (B, 1, D) and reference latents (B, C, h, w) or (B, F, C, h, w)."""
        batch = self.keep_image_embedding.shape[0]
        for name, tensor in (
            ("image_embeddings", image_embeddings),
            ("reference_latents", reference_latents),
        ):
            if tensor.shape[0] != batch:
                raise ValueError(f"{name} has batch size {tensor.shape[0]}, the dropout decisions {batch}")
        keep_embedding = append_dims(
            self.keep_image_embedding.to(image_embeddings.device), image_embeddings.ndim
        )
        keep_latent = append_dims(
            self.keep_reference_latent.to(reference_latents.device), reference_latents.ndim
        )
        return (
            torch.where(keep_embedding, image_embeddings, torch.zeros_like(image_embeddings)),
            torch.where(keep_latent, reference_latents, torch.zeros_like(reference_latents)),
        )


def sample_conditioning_dropout(
    batch_size: int,
    generator: torch.Generator,
    conditioning_dropout_prob: float = DEFAULT_CONDITIONING_DROPOUT_PROB,
    image_embedding_dropout_prob: float = DEFAULT_IMAGE_EMBEDDING_DROPOUT_PROB,
    reference_latent_dropout_prob: float = DEFAULT_REFERENCE_LATENT_DROPOUT_PROB,
    control_scale: float = DEFAULT_CONTROL_SCALE,
) -> ConditioningDropout:
    """Draw one uniform number per sample and split [0, 1) into four mutually exclusive cases.

    - `conditioning_dropout_prob`: embedding, reference latent and control all
      off together: the unconditional input of classifier-free guidance.
    - `image_embedding_dropout_prob`: the CLIP embedding alone is zeroed, so
      the model also learns to follow the reference latent and the pose alone.
    - `reference_latent_dropout_prob`: the reference latent alone is zeroed.
    - otherwise everything is kept.
    The pose control is dropped only in the first case: it is never needed off
    on its own, and keeping it trains the model to follow poses.
    """
    probs = {
        "conditioning_dropout_prob": conditioning_dropout_prob,
        "image_embedding_dropout_prob": image_embedding_dropout_prob,
        "reference_latent_dropout_prob": reference_latent_dropout_prob,
    }
    for name, p in probs.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p}")
    if sum(probs.values()) > 1.0:
        raise ValueError(f"the dropout probabilities are exclusive cases and must sum to <= 1, got {probs}")

    r = torch.rand(batch_size, generator=generator, device=generator.device)  # (B,)
    edge_all = conditioning_dropout_prob
    edge_embedding = edge_all + image_embedding_dropout_prob
    edge_latent = edge_embedding + reference_latent_dropout_prob
    drop_all = r < edge_all
    drop_embedding_only = (r >= edge_all) & (r < edge_embedding)
    drop_latent_only = (r >= edge_embedding) & (r < edge_latent)
    scale = torch.where(drop_all, 0.0, float(control_scale)).to(torch.float32)
    return ConditioningDropout(
        keep_image_embedding=~(drop_all | drop_embedding_only),
        keep_reference_latent=~(drop_all | drop_latent_only),
        control_scale=scale,
    )
