"""ControlNeXt training learns to use the control: `benchmarks/convergence.py`, guarded in CI.

The guard against a dependency change that silently stops training from converging:
the benchmark trains the tiny profile's run (400 steps) through the real entry point
from the pretrained tiny SVD and measures held-out figures before and after. What held
for every seed measured (0, 1 and 2; the benchmark's docstring has the table):

- the held-out loss falls: end / step 0 = 0.944, 0.919 and 0.957;
- the trained control lowers the held-out loss against the same model without it:
  ratios 0.970, 0.948 and 0.971, while at step 0 the untrained control changes it by
  0.05-0.76%;
- the right poses lower it against the same poses reversed in time: ratios 0.971, 0.967
  and 0.968, against 0.996-1.000 at step 0. So the control carries the poses, not just
  features the UNet got used to.

The thresholds below sit between the trained and untrained figures with a margin.
Sampled videos do not follow the poses yet at this budget (contrast ~0 at every seed,
control fidelity better at one seed of three), so neither is asserted here.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOSS_FALLS = 0.98  # end / step 0 held-out loss below this (measured <= 0.957; untrained: 1)
CONTROL_GAIN = 0.985  # trained: loss with the control < this x the loss without it (measured <= 0.971)
UNTRAINED = 0.015  # step 0: the untrained control changes the held-out loss by less than this (<= 0.0076)
RIGHT_POSES = 0.985  # trained: loss with the right poses < this x with them reversed (measured <= 0.971)


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence") / "figures.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


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


def test_the_figures_are_complete_and_finite(figures):
    fields = {"loss", "loss_no_control", "loss_reversed_poses", "fidelity", "fidelity_no_control"}
    fields |= {"contrast", "contrast_no_control"}
    for when in ("step_0", "end"):
        assert set(figures[when]) == fields
        assert all(-1 < value < 10 for value in figures[when].values()), figures[when]
    assert figures["steps"] == 400 and figures["trainable"] == "full"
