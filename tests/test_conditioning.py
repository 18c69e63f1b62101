"""cnx.conditioning: per-rank generators, reference noise augmentation, added time ids, dropout.

Pitfall numbers refer to docs/pitfalls.md.
"""

import inspect
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableVideoDiffusionPipeline

from cnx import conditioning as cond
from cnx import edm
from cnx.seeding import derive_seed


def _draws(seed: int, rank: int, batch: int = 64):
    """Everything random one training step draws, from that rank's generator, in order."""
    generator = cond.rank_generator(seed, rank)
    dropout = cond.sample_conditioning_dropout(batch, generator)
    sigma = edm.sample_sigmas(batch, "lognormal", generator)
    noise = edm.gaussian_noise(torch.zeros(batch, 4), generator)
    reference = cond.noise_augment_reference(torch.zeros(batch, 3, 2, 2), generator)
    return dropout, sigma, noise, reference


def test_pitfall_10_ranks_and_seeds_draw_different_dropout_and_noise():
    """Pitfall 10: a constant-seeded generator made every rank draw the same decisions and noise."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    rank0, rank1 = _draws(seed=42, rank=0), _draws(seed=42, rank=1)
    other_seed = _draws(seed=43, rank=0)
    again = _draws(seed=42, rank=0)
    assert torch.equal(torch.get_rng_state(), before), "a draw used torch's global RNG"

    for a, b in ((rank0, rank1), (rank0, other_seed)):
        assert not torch.equal(a[0].keep_image_embedding, b[0].keep_image_embedding)
        assert not torch.equal(a[1], b[1])  # sigmas
        assert not torch.equal(a[2], b[2])  # latent noise
        assert not torch.equal(a[3], b[3])  # reference noise augmentation
    # The same (seed, rank) repeats exactly: resumable and reproducible.
    assert torch.equal(rank0[0].keep_image_embedding, again[0].keep_image_embedding)
    assert torch.equal(rank0[0].control_scale, again[0].control_scale)
    for i in (1, 2, 3):
        assert torch.equal(rank0[i], again[i])


def test_rank_generator_is_the_documented_stream():
    assert cond.rank_generator(5, 3).initial_seed() == derive_seed("train", 5, 3)
    assert cond.rank_generator(5, 3, stream="data").initial_seed() == derive_seed("data", 5, 3)


@pytest.mark.parametrize(
    "p_all, p_embedding, p_latent", [(0.1, 0.05, 0.05), (0.2, 0.1, 0.15), (0.1, 0.0, 0.0)]
)
def test_pitfall_12_dropout_frequencies_match_the_stated_probabilities(p_all, p_embedding, p_latent):
    """Pitfall 12: the unconditional case drops embedding, reference latent and control together."""
    n = 200_000
    d = cond.sample_conditioning_dropout(n, torch.Generator().manual_seed(1), p_all, p_embedding, p_latent)
    emb, lat, control_on = d.keep_image_embedding, d.keep_reference_latent, d.control_scale > 0
    cases = {
        "all off": (~emb & ~lat & ~control_on, p_all),
        "embedding alone": (~emb & lat & control_on, p_embedding),
        "latent alone": (emb & ~lat & control_on, p_latent),
        "all kept": (emb & lat & control_on, 1 - p_all - p_embedding - p_latent),
        "control off": (~control_on, p_all),
    }
    for name, (mask, p) in cases.items():
        tolerance = 5 * (p * (1 - p) / n) ** 0.5 + 1e-9  # five standard errors
        assert abs(mask.float().mean().item() - p) <= tolerance, name
    # The control is never off on its own, and nothing else is ever combined with it.
    assert torch.equal(~control_on, d.unconditional)
    assert torch.equal(~control_on, ~emb & ~lat)
    assert d.control_scale.dtype == torch.float32
    # By default the control keeps the strength the published models were trained with.
    torch.testing.assert_close(d.control_scale.unique(), torch.tensor([0.0, cond.DEFAULT_CONTROL_SCALE]))


def test_dropout_passes_the_callers_control_scale_and_rejects_bad_probabilities():
    d = cond.sample_conditioning_dropout(1000, torch.Generator().manual_seed(2), control_scale=0.6)
    torch.testing.assert_close(d.control_scale.unique(), torch.tensor([0.0, 0.6]))
    with pytest.raises(ValueError, match="conditioning_dropout_prob"):
        cond.sample_conditioning_dropout(4, torch.Generator(), conditioning_dropout_prob=1.5)
    with pytest.raises(ValueError, match="sum to <= 1"):
        cond.sample_conditioning_dropout(4, torch.Generator(), 0.5, 0.4, 0.2)


def test_apply_zeroes_exactly_the_dropped_conditions():
    d = cond.ConditioningDropout(
        keep_image_embedding=torch.tensor([True, False, True, False]),
        keep_reference_latent=torch.tensor([True, True, False, False]),
        control_scale=torch.tensor([1.0, 1.0, 1.0, 0.0]),
    )
    embeddings = torch.randn(4, 1, 8) + 3  # (B, 1, D), never zero
    for latents in (
        torch.randn(4, 4, 3, 2) + 3,
        torch.randn(4, 5, 4, 3, 2) + 3,
    ):  # (B, C, h, w), (B, F, C, h, w)
        emb, lat = d.apply(embeddings, latents)
        for i in range(4):
            assert torch.equal(
                emb[i], embeddings[i] if d.keep_image_embedding[i] else torch.zeros_like(emb[i])
            )
            assert torch.equal(lat[i], latents[i] if d.keep_reference_latent[i] else torch.zeros_like(lat[i]))
    with pytest.raises(ValueError, match="reference_latents has batch size 3"):
        d.apply(embeddings, torch.ones(3, 4, 3, 2))


def test_pitfall_12_training_unconditional_equals_the_samplers_unconditional_input():
    """Classifier-free guidance's unconditional branch is `drop_all`: exactly the trained all-off case."""
    drop, keep = cond.ConditioningDropout.drop_all(3), cond.ConditioningDropout.keep_all(3, control_scale=0.8)
    assert bool(drop.unconditional.all()) and not bool(keep.unconditional.any())
    emb, lat = drop.apply(torch.ones(3, 1, 8), torch.ones(3, 5, 4, 3, 2))
    assert emb.abs().sum() == 0 and lat.abs().sum() == 0 and drop.control_scale.abs().sum() == 0
    torch.testing.assert_close(keep.control_scale, torch.full((3,), 0.8))
    trained = cond.sample_conditioning_dropout(4096, torch.Generator().manual_seed(3))
    sample = int(trained.unconditional.nonzero()[0])
    emb_t, lat_t = trained.apply(torch.ones(4096, 1, 8), torch.ones(4096, 5, 4, 3, 2))
    assert torch.equal(emb_t[sample], emb[0]) and torch.equal(lat_t[sample], lat[0])
    assert trained.control_scale[sample] == drop.control_scale[0]


def test_pitfall_14_defaults_are_svd_xt_values_from_one_place():
    """Pitfall 14: training and sampling share these constants; they are SVD-xt's own defaults."""
    assert (cond.DEFAULT_FPS, cond.DEFAULT_MOTION_BUCKET_ID, cond.DEFAULT_NOISE_AUG_STRENGTH) == (
        7,
        127,
        0.02,
    )
    params = inspect.signature(StableVideoDiffusionPipeline.__call__).parameters
    assert params["fps"].default == cond.DEFAULT_FPS
    assert params["motion_bucket_id"].default == cond.DEFAULT_MOTION_BUCKET_ID
    assert params["noise_aug_strength"].default == cond.DEFAULT_NOISE_AUG_STRENGTH
    ours = inspect.signature(cond.added_time_ids).parameters
    assert ours["fps"].default == cond.DEFAULT_FPS
    assert ours["motion_bucket_id"].default == cond.DEFAULT_MOTION_BUCKET_ID
    assert ours["noise_aug_strength"].default == cond.DEFAULT_NOISE_AUG_STRENGTH
    assert inspect.signature(cond.noise_augment_reference).parameters["strength"].default == 0.02
    torch.testing.assert_close(cond.added_time_ids(), torch.tensor([[6.0, 127.0, 0.02]]))


def test_pitfall_14_added_time_ids_carry_the_callers_values_like_diffusers():
    """The caller's fps, bucket and strength arrive unchanged (fps - 1, as SVD's pipeline passes)."""
    ids = cond.added_time_ids(
        fps=12, motion_bucket_id=200, noise_aug_strength=0.1, batch_size=3, dtype=torch.bfloat16
    )
    assert ids.shape == (3, 3) and ids.dtype == torch.bfloat16
    torch.testing.assert_close(ids, torch.tensor([[11.0, 200.0, 0.1]] * 3, dtype=torch.bfloat16))
    # diffusers' own helper, given fps - 1 as its pipeline does, builds the same tensor.
    fake_pipe = SimpleNamespace(
        unet=SimpleNamespace(
            config=SimpleNamespace(addition_time_embed_dim=4),
            add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=12)),
        )
    )
    theirs = StableVideoDiffusionPipeline._get_add_time_ids(
        fake_pipe, 12 - 1, 200, 0.1, torch.float32, 3, 1, False
    )
    torch.testing.assert_close(cond.added_time_ids(12, 200, 0.1, 3), theirs)
    with pytest.raises(ValueError, match="batch_size"):
        cond.added_time_ids(batch_size=0)


def test_augment_reference_adds_generator_noise_of_the_given_strength():
    reference = torch.rand(2, 3, 64, 48) * 2 - 1  # pixels in [-1, 1]
    augmented = cond.noise_augment_reference(reference, torch.Generator().manual_seed(4))
    difference = augmented - reference
    assert difference.std().item() == pytest.approx(cond.DEFAULT_NOISE_AUG_STRENGTH, rel=0.05)
    assert abs(difference.mean().item()) < 0.002
    assert torch.equal(cond.noise_augment_reference(reference, torch.Generator(), strength=0.0), reference)
    half = cond.noise_augment_reference(reference.to(torch.bfloat16), torch.Generator(), strength=0.5)
    assert half.dtype == torch.bfloat16
