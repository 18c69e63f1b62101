"""Keep pins exact: the original code's authors saw training stop converging after dependency upgrades."""

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version

import pytest
import yaml

from cnx.mediapipe_pose import MEDIAPIPE_PACKAGE, MEDIAPIPE_VERSION
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
    """Pins of the dependencies plus the named extras (default: `dev`, `bnb`, `pose`: the venv's)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    groups = project["optional-dependencies"]
    return parse_pins(
        project["dependencies"] + [req for name in extras or ("dev", "bnb", "pose") for req in groups[name]]
    )


def environment_pins():
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict))
    assert "-e .[dev,bnb,pose]" in pip_section, "environment.yml must install the package with its extras"
    return parse_pins([req for req in pip_section if not req.startswith("-e ")])


def test_environment_yml_and_pyproject_agree_on_every_pin():
    assert environment_pins() == pyproject_pins()


def test_every_required_package_is_pinned_and_torchvision_is_not():
    pins = pyproject_pins()
    assert REQUIRED <= set(pins), sorted(REQUIRED - set(pins))
    assert pins["torch"] == "2.13.0"
    assert "torchvision" not in pins


def test_optional_extras_are_pinned_too():
    pins = pyproject_pins("dwpose")
    assert {"rtmlib", "onnxruntime"} <= set(pins)
    assert {"opencv-python-headless", "protobuf", "flatbuffers"} <= set(pyproject_pins("pose"))


def test_mediapipe_has_one_pin_and_is_installed_at_it_without_its_declared_requirements():
    """`make venv` and environment.yml install the version cnx.mediapipe_pose names, with --no-deps:
    its declared requirements (jax, opencv-contrib, protobuf<5) would bloat the venv and break tensorboard."""
    pin = f"{MEDIAPIPE_PACKAGE}=={MEDIAPIPE_VERSION}"
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(rf"^\t\$\(BIN\)/pip install --quiet --no-deps {re.escape(pin)}$", makefile, re.M)
    assert f"pip install --no-deps {pin}" in (REPO_ROOT / "environment.yml").read_text()
    assert MEDIAPIPE_PACKAGE not in {name for name in pyproject_pins("pose", "dwpose", "dev", "bnb")}
    assert version(MEDIAPIPE_PACKAGE) == MEDIAPIPE_VERSION
    for name in ("jax", "jaxlib", "opencv-contrib-python", "opencv-python"):
        with pytest.raises(PackageNotFoundError):  # a second cv2 would shadow the pinned headless one
            version(name)


def test_the_installed_environment_matches_the_pins():
    for name, pinned in pyproject_pins().items():
        assert version(name).split("+")[0] == pinned, name
