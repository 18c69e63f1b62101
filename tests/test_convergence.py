"""ControlNeXt training learns to use the control: `benchmarks/convergence.py`, guarded in CI.

The guard against a dependency change that silently stops training from converging:
the benchmark trains the tiny profile's run (600 steps, seed 0) through the real entry
point from the pretrained tiny SVD and measures held-out figures before and after. It starts
in the background when the tests are collected and the other tests and the notebooks run beside
it, each side with one thread (alone it keeps two); these tests wait for it, then notebook 05
analyses its run (tests/conftest.py).

Measured from the shipped pretrained model (VAE at 27.6 dB), 600 steps, one thread each, two
runs at a time: seeds 0, 1 and 2 under bf16 autocast (where the CPU computes bfloat16 natively,
as CI does here; 283-306 s of training) and seed 0 in float32 (384 s). The benchmark's docstring
has the table. As end / step 0 or end / the comparison, bf16 seeds 0, 1, 2, then float32 seed 0:

- the held-out loss falls: 0.869, 0.917, 0.948; 0.871;
- the trained control lowers it against the same model without it: 0.910, 0.883, 0.920; 0.911,
  while at step 0 the untrained control changes it by 0.9-1.6%;
- the right poses lower it against the same poses reversed in time: 0.911, 0.886, 0.903; 0.909,
  against 0.997-0.998 at step 0. So the control carries the poses, not just features the
  UNet got used to;
- the control fidelity score of sampled videos improves: 0.896, 0.908, 0.887; 0.909. At the end
  videos sampled with the control score better than without it: 0.919, 0.837, 0.882; 0.900 (at
  step 0: 1.029-1.040);
- their contrast (`cnx.metrics.control_fidelity`: how much better each frame shows its own
  pose than the others') grows 8.7, 18.4, 13.1; 9.4 times (0.0010-0.0013 -> 0.0113-0.0206).

Each threshold sits between the trained and the untrained figures, with a margin of at least
2.7% of every trained figure (the contrast: 1.9 times). The loss fall (0.975) has the least: the
loss fall varies most from seed to seed, and this test runs seed 0 (0.869 in bf16, 0.871 in
float32), 10% below it. The control's score gain was 0.92 for the previous model (seeds 0-2 and
float32 seed 0 at 0.850-0.896); this model's seed 0 measures 0.919, so it is 0.95 now, still
below the 1.029 of every untrained control.
"""

import pytest

LOSS_FALLS = 0.975  # end / step 0 held-out loss below this (seed 0 <= 0.871; all <= 0.948)
CONTROL_GAIN = 0.96  # trained: loss with the control < this x the loss without it (measured <= 0.920)
UNTRAINED = 0.02  # step 0: the untrained control changes the held-out loss by less than this (<= 0.0157)
RIGHT_POSES = 0.96  # loss with the right poses / reversed: trained below (<= 0.911), step 0 above (>= 0.997)
FIDELITY_FALLS = 0.985  # end / step 0 control fidelity score below this (measured <= 0.909)
FIDELITY_CONTROL = 0.95  # trained: score with the control < this x without it (measured <= 0.919)
CONTRAST_GAIN = 4.5  # contrast of sampled videos, end / step 0, above this (measured >= 8.7)


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
