"""ControlNeXt training learns to use the control: `benchmarks/convergence.py`, guarded in CI.

The guard against a dependency change that silently stops training from converging:
the benchmark trains the tiny profile's run (600 steps, seed 0) through the real entry
point from the pretrained tiny SVD and measures held-out figures before and after. It starts
in the background when the tests are collected and the other tests and the notebooks run beside
it, each side with one thread (alone it keeps two); these tests wait for it, then notebook 05
analyses its run (tests/conftest.py).

The run trains in float32, the tiny profile's own precision on a CPU (as `make demo` runs it).
Measured from the shipped pretrained model (VAE at 28.2 dB), 600 steps, one thread each, two runs
at a time: seeds 0, 1 and 2 in float32 (353-362 s of training in a slow half hour) and under bf16
autocast (293-308 s). The benchmark's docstring has the table. As end / step 0 or end / the
comparison, float32 seeds 0, 1, 2, then bf16 seeds 0, 1, 2:

- the held-out loss falls: 0.849, 0.966, 0.896; 0.855, 0.911, 0.884;
- the trained control lowers it against the same model without it: 0.927, 0.901, 0.917; 0.927,
  0.913, 0.910, while at step 0 the untrained control changes it by 0.7-1.3%;
- the right poses lower it against the same poses reversed in time: 0.916, 0.919, 0.896; 0.908,
  0.917, 0.894, against 0.998-0.999 at step 0. So the control carries the poses, not just
  features the UNet got used to;
- the control fidelity score of sampled videos improves: 0.854, 0.913, 0.874; 0.860, 0.905,
  0.892. At the end videos sampled with the control score better than without it: 0.909, 0.793,
  0.887; 0.896, 0.823, 0.880 (at step 0: 1.008-1.021);
- their contrast (`cnx.metrics.control_fidelity`: how much better each frame shows its own
  pose than the others') grows from 0.0001-0.0002 to 0.0120-0.0231, 75-259 times.

Each threshold sits between the trained and the untrained figures of every run, with a margin of
at least 3.4% of every trained figure (the contrast: 16 times), except the loss fall at float32
seed 1 (0.966 against 0.975). The loss fall varies most from run to run: from the previous
pretrained model bf16 runs at seeds 0 and 2 fell by 0.8% and 1.3% only. This test's seed 0
measures 0.849.
"""

import pytest

LOSS_FALLS = 0.975  # end / step 0 held-out loss below this (seed 0: 0.849; all <= 0.966)
CONTROL_GAIN = 0.96  # trained: loss with the control < this x the loss without it (measured <= 0.927)
UNTRAINED = 0.02  # step 0: the untrained control changes the held-out loss by less than this (<= 0.0126)
RIGHT_POSES = 0.96  # loss with the right poses / reversed: trained below (<= 0.919), step 0 above (>= 0.998)
FIDELITY_FALLS = 0.985  # end / step 0 control fidelity score below this (measured <= 0.913)
FIDELITY_CONTROL = 0.95  # trained: score with the control < this x without it (measured <= 0.909)
CONTRAST_GAIN = 4.5  # contrast of sampled videos, end / step 0, above this (measured >= 75)


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
