"""ControlNeXt training learns to use the control: `benchmarks/convergence.py`, guarded in CI.

The guard against a dependency change that silently stops training from converging:
the benchmark trains the tiny profile's run (600 steps, seed 0) through the real entry
point from the pretrained tiny SVD and measures held-out figures before and after. It starts
in the background when the tests are collected and the other tests and the notebooks run beside
it, each side with one thread (alone it keeps two); these tests wait for it, then notebook 05
analyses its run (tests/conftest.py).

Measured from the shipped pretrained model (VAE at 27.4 dB), 600 steps, one thread each, two
runs at a time: seeds 0, 1 and 2 under bf16 autocast (where the CPU computes bfloat16 natively,
as CI does here; 256-267 s of training) and seed 0 in float32 (330 s). The benchmark's docstring
has the table. As end / step 0 or end / the comparison, bf16 seeds 0, 1, 2, then float32 seed 0:

- the held-out loss falls: 0.874, 0.901, 0.955; 0.901;
- the trained control lowers it against the same model without it: 0.922, 0.908, 0.890; 0.918,
  while at step 0 the untrained control changes it by 0.9-1.0%;
- the right poses lower it against the same poses reversed in time: 0.912, 0.905, 0.890; 0.910,
  against 0.998-0.999 at step 0. So the control carries the poses, not just features the
  UNet got used to;
- the control fidelity score of sampled videos improves: 0.874, 0.896, 0.910; 0.903. At the end
  videos sampled with the control score better than without it: 0.893, 0.850, 0.896; 0.851 (at
  step 0: 1.024-1.031);
- their contrast (`cnx.metrics.control_fidelity`: how much better each frame shows its own
  pose than the others') grows 6.8, 10.5, 10.1; 8.7 times (0.0013-0.0016 -> 0.0111-0.0173).

Each threshold sits between the trained and the untrained figures, with a margin of at least
3% of every trained figure (the contrast: 1.5 times), with three exceptions. The loss fall
(0.975) is 2.0% above seed 2's 0.955: the loss fall varies most from seed to seed, and this test
runs seed 0 (0.874 in bf16, 0.901 in float32). The control's score gain (0.92) is 2.7% above seed
2's 0.896 (seed 0: 3.0%). The score's fall (0.985) was set for the previous model, whose float32
seed 0 fell to 0.959 only; this one's figures sit 7.6% or more below it, and float32 seeds 1 and 2
were not measured with it.
"""

import pytest

LOSS_FALLS = 0.975  # end / step 0 held-out loss below this (seed 0 <= 0.901; all <= 0.955)
CONTROL_GAIN = 0.96  # trained: loss with the control < this x the loss without it (measured <= 0.922)
UNTRAINED = 0.02  # step 0: the untrained control changes the held-out loss by less than this (<= 0.0104)
RIGHT_POSES = 0.96  # loss with the right poses / reversed: trained below (<= 0.912), step 0 above (>= 0.998)
FIDELITY_FALLS = 0.985  # end / step 0 control fidelity score below this (measured <= 0.910)
FIDELITY_CONTROL = 0.92  # trained: score with the control < this x without it (measured <= 0.896)
CONTRAST_GAIN = 4.5  # contrast of sampled videos, end / step 0, above this (measured >= 6.8)


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
