"""One home for measured figures: every benchmark writes its record to `benchmarks/results/<name>.json`.

A record says when, where and with what the figures were measured (date, machine, torch, the
commit checked out (the working tree may differ), the load on the machine when it finished), then
the benchmark's own settings and figures.
The README and docs cite these files; docstrings say what a benchmark measures and why, not what
it measured on a given day. Figures measured elsewhere and copied in carry a "source" instead.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """The GPU's name where one is used, else the CPU's model, core count and bfloat16 support."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line), "")
    bf16 = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in cpuinfo.split()]
    return f"{model or platform.machine()}, {os.cpu_count()} cores" + (
        f" ({', '.join(bf16)})" if bf16 else ""
    )


def commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS
        )
    except OSError:
        return None
    return done.stdout.strip() or None


def record(name: str, **fields) -> dict:
    """{"benchmark", "date", "machine", "torch", "commit", "load_average", **fields}."""
    return {
        "benchmark": name,
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "torch": torch.__version__,
        "commit": commit(),
        "load_average": round(os.getloadavg()[0], 2),  # other work on the machine slows a timing
        **fields,
    }


def write(result: dict, path: str | Path | None = None, variant: str = "") -> Path:
    """Write `result` as JSON to `path`, by default `benchmarks/results/<benchmark>[_<variant>].json`."""
    path = Path(path) if path else RESULTS / f"{result['benchmark']}{'_' + variant if variant else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
