"""Keep pins exact: the original code's authors saw training stop converging after dependency upgrades."""

import re
import tomllib
from importlib.metadata import version

import yaml

from cnx.profiles import REPO_ROOT

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)$")
REQUIRED = {
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "deepspeed",
    "decord",
    "einops",
    "safetensors",
    "numpy",
    "matplotlib",
    "ipywidgets",
    "jupyterlab",
    "nbmake",
    "pytest",
    "tensorboard",
    "tqdm",
    "av",
    "torchmetrics",
    "peft",
}


def parse_pins(requirements):
    pins = {}
    for line in requirements:
        match = PIN.match(line)
        assert match, f"not an exact pin: {line!r}"
        pins[match[1].lower()] = match[2]
    return pins


def pyproject_pins(*extras):
    """Pins of the dependencies plus the named extras (default: `dev` and `bnb`, which the venv installs)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    groups = project["optional-dependencies"]
    return parse_pins(
        project["dependencies"] + [req for name in extras or ("dev", "bnb") for req in groups[name]]
    )


def environment_pins():
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict))
    assert "-e .[dev,bnb]" in pip_section, "environment.yml must install the package with its extras"
    return parse_pins([req for req in pip_section if not req.startswith("-e ")])


def test_environment_yml_and_pyproject_agree_on_every_pin():
    assert environment_pins() == pyproject_pins()


def test_every_required_package_is_pinned_and_torchvision_is_not():
    pins = pyproject_pins()
    assert REQUIRED <= set(pins), sorted(REQUIRED - set(pins))
    assert pins["torch"] == "2.13.0"
    assert "torchvision" not in pins


def test_optional_extras_are_pinned_too():
    pins = pyproject_pins("pose")
    assert {"rtmlib", "onnxruntime"} <= set(pins)


def test_the_installed_environment_matches_the_pins():
    for name, pinned in pyproject_pins().items():
        assert version(name).split("+")[0] == pinned, name
