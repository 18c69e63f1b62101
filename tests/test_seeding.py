import torch

from cnx.seeding import derive_seed, stream_generator


def test_derive_seed_is_a_fixed_documented_hash():
    # sha256("cnx:data:0:0:0"): changing it would silently change every run's random streams.
    assert derive_seed("data", 0, 0, 0) == 5172214282172332513
    assert derive_seed("data", 0, 0, 0) == derive_seed("data", "0", 0, 0)  # parts are joined as text


def test_streams_are_separated_by_every_part():
    seeds = {derive_seed("train", seed, rank) for seed in range(8) for rank in range(64)}
    assert len(seeds) == 8 * 64  # seed 1 rank 0 is not seed 0 rank 1
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed("train", 0, 0) != derive_seed("data", 0, 0)


def test_same_parts_give_the_same_stream():
    a, b = stream_generator("x", 1, 2), stream_generator("x", 1, 2)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    assert not torch.equal(torch.rand(4, generator=stream_generator("x", 1, 3)), torch.rand(4, generator=a))
