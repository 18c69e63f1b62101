"""ControlNeXt training learns to use the control: `benchmarks/convergence.py`, guarded in CI.

The guard against a dependency change that silently stops training from converging:
the benchmark trains the tiny profile's run (600 steps, seed 0) through the real entry
point from the pretrained tiny SVD and measures held-out figures before and after. It starts
in the background when the tests are collected and the other tests and the notebooks run beside
it, each side with one thread (alone it keeps two); these tests wait for it, then notebook 05
analyses its run (tests/conftest.py).

The run trains in float32, the tiny profile's own precision on a CPU (as `make demo` runs it).
Measured from the shipped pretrained model (VAE at 27.6 dB), 600 steps, one thread each, two runs
at a time: seeds 0, 1 and 2 in float32 (276-293 s of training) and under bf16 autocast (210-232
s). The benchmark's docstring has the table. As end / step 0 or end / the comparison, float32
seeds 0, 1, 2, then bf16 seeds 0, 1, 2:

- the held-out loss falls: 0.868, 0.897, 0.955; 0.992, 0.922, 0.987;
- the trained control lowers it against the same model without it: 0.909, 0.906, 0.899; 0.922,
  0.913, 0.895, while at step 0 the untrained control changes it by 0.8-1.5%;
- the right poses lower it against the same poses reversed in time: 0.913, 0.894, 0.902; 0.933,
  0.899, 0.906, against 0.998 at step 0. So the control carries the poses, not just features the
  UNet got used to;
- the control fidelity score of sampled videos improves: 0.911, 0.860, 0.906; 0.867, 0.850,
  0.915. At the end videos sampled with the control score better than without it: 0.915, 0.859,
  0.889; 0.925, 0.864, 0.895 (at step 0: 1.026-1.043);
- their contrast (`cnx.metrics.control_fidelity`: how much better each frame shows its own
  pose than the others') grows 8.5, 14.3, 11.6; 7.8, 14.7, 11.6 times (0.0011-0.0013 ->
  0.0102-0.0168).

Each threshold sits between the trained and the untrained figures of every run, with a margin of
at least 2.1% of every trained figure (the contrast: 1.7 times), except the loss fall under bf16:
its training loss tracks float32's (100-step means within 0.005), yet where the runs end the
UNet without the control has drifted further on the held-out dancers (0.2750 against 0.2443 at
seed 0), and seeds 0 and 2 fell by 0.8% and 1.3% only. Hence float32 here. The loss fall (0.975)
has the least margin: it varies most from run to run, and this test's seed 0 measures 0.868.
"""

import pytest

LOSS_FALLS = 0.975  # end / step 0 held-out loss below this (float32: seed 0 0.868; all <= 0.955)
CONTROL_GAIN = 0.96  # trained: loss with the control < this x the loss without it (measured <= 0.922)
UNTRAINED = 0.02  # step 0: the untrained control changes the held-out loss by less than this (<= 0.0152)
RIGHT_POSES = 0.96  # loss with the right poses / reversed: trained below (<= 0.933), step 0 above (>= 0.998)
FIDELITY_FALLS = 0.985  # end / step 0 control fidelity score below this (measured <= 0.915)
FIDELITY_CONTROL = 0.95  # trained: score with the control < this x without it (measured <= 0.925)
CONTRAST_GAIN = 4.5  # contrast of sampled videos, end / step 0, above this (measured >= 7.8)


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
