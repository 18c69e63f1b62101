"""ControlNeXt training learns to use the control: `benchmarks/convergence.py`, guarded in CI.

The guard against a dependency change that silently stops training from converging:
the benchmark trains the tiny profile's run (600 steps, seed 0) through the real entry
point from the pretrained tiny SVD and measures held-out figures before and after. It starts
in the background when the tests are collected and the other tests and the notebooks run beside
it, each side with one thread (alone it keeps two); these tests wait for it, then notebook 05
analyses its run (tests/conftest.py). With one thread seed 0 gives 0.908, 0.905, 0.901, 0.881, 0.854 and 7.1
times for the figures below (identical in three repeats).

Where the CPU computes bfloat16 natively the run trains under bf16 autocast, as notebook 05's
does (200-218 s of training at seeds 0-2 on 2 cores). What held for every run measured from the
shipped pretrained model (seeds 0, 1 and 2 under bf16; the benchmark's docstring has the table),
as end / step 0 or end / the comparison:

- the held-out loss falls: 0.916, 0.947, 0.870;
- the trained control lowers it against the same model without it: 0.903, 0.924, 0.893,
  while at step 0 the untrained control changes it by 0.4-0.8%;
- the right poses lower it against the same poses reversed in time: 0.901, 0.904, 0.877,
  against 0.998-1.000 at step 0. So the control carries the poses, not just features the
  UNet got used to;
- the control fidelity score of sampled videos improves: 0.900, 0.906, 0.896. At the end
  videos sampled with the control score better than without it: 0.855, 0.837, 0.880 (at
  step 0: 1.006-1.023);
- their contrast (`cnx.metrics.control_fidelity`: how much better each frame shows its own
  pose than the others') grows 7.1, 13.8 and 7.7 times (0.0017-0.0019 -> 0.0138-0.0236).

In float32 (CPUs without native bfloat16), seeds 0, 1 and 2: the loss falls 0.897, 0.986,
0.909; control against none 0.916, 0.932, 0.898; right poses against reversed 0.906, 0.912,
0.881; the score falls 0.959, 0.913, 0.899 and beats no control 0.869, 0.838, 0.866; the
contrast grows 6.9, 13.8 and 8.2 times.

Each threshold sits between the trained and the untrained figures, with a margin of at least
3% of every trained figure (the contrast: 1.5 times), with two exceptions. The score's fall
(0.985) sits 2.7% above float32 seed 0's 0.959, and 1.5% below the untrained 1. The loss fall
(0.975) holds for seed 0, which this test runs (0.897-0.916 in every precision), but float32 seed
1 ended at 0.986: the loss fall varies most from seed to seed.
"""

import pytest

LOSS_FALLS = 0.975  # end / step 0 held-out loss below this (seed 0 <= 0.916; all bf16 <= 0.947)
CONTROL_GAIN = 0.96  # trained: loss with the control < this x the loss without it (measured <= 0.932)
UNTRAINED = 0.02  # step 0: the untrained control changes the held-out loss by less than this (<= 0.0081)
RIGHT_POSES = 0.96  # loss with the right poses / reversed: trained below (<= 0.912), step 0 above (>= 0.998)
FIDELITY_FALLS = 0.985  # end / step 0 control fidelity score below this (bf16 <= 0.906, fp32 <= 0.959)
FIDELITY_CONTROL = 0.92  # trained: score with the control < this x without it (measured <= 0.880)
CONTRAST_GAIN = 4.5  # contrast of sampled videos, end / step 0, above this (measured >= 6.9)


@pytest.fixture(scope="module")
def figures(convergence_run):
    return convergence_run.figures()


def test_the_heldout_loss_falls(figures):
    assert figures["end"]["loss"] < LOSS_FALLS * figures["step_0"]["loss"], figures


def test_the_trained_control_lowers_the_heldout_loss(figures):
    start, end = figures["step_0"], figures["end"]
    assert abs(start["loss"] / start["loss_no_control"] - 1) < UNTRAINED, start
    assert end["loss"] < CONTROL_GAIN * end["loss_no_control"], end


def test_the_right_poses_beat_the_same_poses_reversed(figures):
    start, end = figures["step_0"], figures["end"]
    assert start["loss"] > RIGHT_POSES * start["loss_reversed_poses"], start  # untrained: no difference
    assert end["loss"] < RIGHT_POSES * end["loss_reversed_poses"], end


def test_control_fidelity_improves_and_the_control_beats_none(figures):
    start, end = figures["step_0"], figures["end"]
    assert end["fidelity"] < FIDELITY_FALLS * start["fidelity"], (start, end)
    assert end["fidelity"] < FIDELITY_CONTROL * end["fidelity_no_control"], end
    assert start["contrast"] > 0 and end["contrast"] > CONTRAST_GAIN * start["contrast"], (start, end)


def test_the_figures_are_complete_and_finite(figures):
    fields = {"loss", "loss_no_control", "loss_reversed_poses", "fidelity", "fidelity_no_control"}
    fields |= {"contrast", "contrast_no_control"}
    for when in ("step_0", "end"):
        assert set(figures[when]) == fields
        assert all(-1 < value < 10 for value in figures[when].values()), figures[when]
    assert figures["steps"] == 600 and figures["trainable"] == "full"
