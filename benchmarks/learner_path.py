"""The learner's path, timed: notebook 04, then 05 without `CNX_RUN`, in a fresh clone of the commit.

    .venv/bin/python benchmarks/learner_path.py       # `make learner-path`

A learner who has not run `make demo` and sets no `CNX_RUN` gets the course's longest path:
04 trains its short run, then 05 trains its own 300-step run (a checkpoint halfway) and analyses
it. `make test` runs 05 on the convergence run it has trained anyway, so this path is measured
here instead, exactly as a learner meets it: a `git clone` of HEAD (no `.cache`, no earlier
runs), the tiny profile, every cell executed by nbclient as nbmake does. It fails when a cell
fails, and reports each notebook's wall time against the budget the course states (BUDGET_S);
the record goes to `benchmarks/results/learner_path.json`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from record import record, write

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("04_launch_training.ipynb", "05_validation_analysis.ipynb")
BUDGET_S = 15 * 60  # both notebooks on 2 CPU cores; notebook 05 says its own training takes minutes
CELL_TIMEOUT_S = 1200


def run_notebook(path: Path) -> float:
    """Execute every cell of `path` in its folder; wall seconds. nbclient raises on a failing cell."""
    notebook = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the record here, not in results/")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cnx-learner-") as tmp:
        clone = Path(tmp) / "cnx"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        # The kernel imports the clone's cnx; nothing points 05 at a run.
        os.environ.pop("CNX_RUN", None)
        os.environ |= {"PYTHONPATH": str(clone), "CNX_PROFILE": "tiny", "HF_HUB_OFFLINE": "1"}
        seconds = {}
        for name in NOTEBOOKS:
            print(f"{name} ...", flush=True)
            seconds[name] = round(run_notebook(clone / "notebooks" / name), 1)
            print(f"{name}: {seconds[name] / 60:.1f} minutes", flush=True)

    total = sum(seconds.values())
    result = record("learner_path", notebooks=seconds, total_seconds=round(total, 1), budget_seconds=BUDGET_S)
    print(f"04 then 05 without CNX_RUN: {total / 60:.1f} minutes (budget {BUDGET_S / 60:.0f})")
    write(result, args.json)
    return 0 if total <= BUDGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
