"""`benchmarks/results/`, the one home of measured figures: complete records, cited where they are used."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CITING = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.py")]
CITING += [ROOT / "tests" / "test_convergence.py", ROOT / "tests" / "conftest.py"]
RESULT_NAME = re.compile(r"\b((?:bench_[a-z_]+|convergence[a-z0-9_]*)\.json)")


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def convergence_thresholds():
    """tests/test_convergence.py's thresholds, read without collecting it (that would start its run)."""
    spec = importlib.util.spec_from_file_location(
        "convergence_thresholds", ROOT / "tests" / "test_convergence.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_every_record_says_when_where_and_with_what(path):
    record = json.loads(path.read_text())
    assert {"benchmark", "date", "machine", "torch"} <= set(record), path.name
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", record["date"]), record["date"]
    assert (ROOT / "benchmarks" / f"{record['benchmark']}.py").is_file(), record["benchmark"]


def test_every_cited_results_file_exists():
    missing = []
    for path in CITING:
        for name in re.findall(
            r"\b((?:bench_[a-z_]+|convergence[a-z0-9_]*)\.json)", path.read_text(encoding="utf-8")
        ):
            if not (RESULTS / name).is_file():
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing


def assert_trained_past_every_threshold(t, start: dict, end: dict, run) -> None:
    assert end["loss"] < t.LOSS_FALLS * start["loss"], run
    assert end["loss"] < t.CONTROL_GAIN * end["loss_no_control"], run
    assert end["loss"] < t.RIGHT_POSES * end["loss_reversed_poses"], run
    assert end["fidelity"] < t.FIDELITY_FALLS * start["fidelity"], run
    assert end["fidelity"] < t.FIDELITY_CONTROL * end["fidelity_no_control"], run
    assert end["contrast"] > t.CONTRAST_GAIN * start["contrast"] > 0, run


def test_the_convergence_thresholds_sit_between_the_measured_runs():
    """Every threshold of the CI check separates the trained from the untrained figures of every run."""
    t = convergence_thresholds()
    measured = load("convergence_600_steps.json")
    assert len(measured["runs"]) == 6
    for run in measured["runs"]:
        assert_trained_past_every_threshold(t, run["step_0"], run["end"], run)
    assert min(measured["step_0_ratios"]["loss / loss_reversed_poses"]) > t.RIGHT_POSES


def test_bf16_weights_with_stochastic_rounding_trained_past_every_threshold():
    """`--weights_dtype=bf16 --stochastic_rounding` (no float32 master) passed the CI check's thresholds."""
    t = convergence_thresholds()
    run = load("convergence_bf16_weights.json")
    assert (run["weights_dtype"], run["stochastic_rounding"], run["steps"]) == ("bf16", True, 600)
    assert run["mixed_precision"] == "bf16" and all(run["verdicts"].values())
    start, end = run["step_0"], run["end"]
    assert abs(start["loss"] / start["loss_no_control"] - 1) < t.UNTRAINED
    assert start["loss"] > t.RIGHT_POSES * start["loss_reversed_poses"]
    assert_trained_past_every_threshold(t, start, end, run)


def test_the_readme_is_for_users():
    """A page: what it is, how to train and generate; the experiment log lives in docs/tiny_svd.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert text.splitlines()[3].startswith("make demo") and text.splitlines()[4].startswith("make test")
    assert "](docs/tiny_svd.md)" in text
