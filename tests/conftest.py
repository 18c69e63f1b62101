"""Fixtures shared by several test files, and the convergence run, which trains in the background."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from two_processes import launch_two_processes

from cnx.tiny import write_tiny_svd

ROOT = Path(__file__).resolve().parent.parent
CONVERGENCE_TESTS = "test_convergence.py"
# What runs after the convergence run, with both cores: the notebook that analyses a training run,
# and tests marked `both_cores` (they need two threads; beside the run, three threads thrash).
AFTER_CONVERGENCE = {"05_validation_analysis.ipynb"}
BOTH_CORES = "both_cores"
CONVERGENCE_RUN = pytest.StashKey["ConvergenceRun"]()


@pytest.fixture(scope="session")
def tiny_svd_dir(tmp_path_factory):
    """A stand-in SVD pipeline folder (seed 0), written once per test session."""
    return write_tiny_svd(tmp_path_factory.mktemp("tiny-svd") / "svd", seed=0)


@pytest.fixture(scope="session")
def deepspeed_run(tiny_svd_dir, tmp_path_factory) -> tuple[Path, dict[int, dict], Path]:
    """(output_dir, steps, torch extensions folder) of a ZeRO-2 run in two CPU processes: 4 steps,
    checkpoints at 2 and 4, EMA kept.

    One launch for two files, the launch being the slowest part of each test: test_distributed
    resumes it from checkpoint-2, test_export exports checkpoint-4 and compares it with final/.
    The extensions folder starts empty: `cnx train` compiles no DeepSpeed op on a CPU.
    """
    output_dir, extensions = tmp_path_factory.mktemp("deepspeed"), tmp_path_factory.mktemp("extensions")
    steps = launch_two_processes(
        "deepspeed",
        tiny_svd_dir,
        output_dir,
        "--max_train_steps=4",
        "--checkpointing_steps=2",
        "--use_ema",
        env={"TORCH_EXTENSIONS_DIR": str(extensions)},
    )
    return output_dir, steps, extensions


class ConvergenceRun:
    """`benchmarks/convergence.py` (seed 0) in a subprocess; `figures()` waits for its result.

    It trains in the tiny profile's own precision (float32 on a CPU), as `make demo` does: from an
    earlier pretrained model, under bf16 autocast the held-out loss of two seeds hardly fell, too
    close to no change for any threshold with a margin (docs/tiny_svd.md; the shipped model's runs
    in both precisions are in benchmarks/results/convergence_600_steps.json).

    With `share_cores` it trains on one core and everything else in this session on the other, one
    thread each, until `figures()` returns: two processes of two threads each on two cores mostly
    wait for each other (tried: the training ran at under half its speed, the tests as slowed).
    """

    def __init__(self, share_cores: bool, timeout_s: float = 1500):
        self.folder = Path(tempfile.mkdtemp(prefix="cnx-convergence-test-"))
        self.out = self.folder / "figures.json"
        self.log = self.folder / "convergence.log"
        self.run = self.folder / "run"  # kept: notebook 05 analyses it (CNX_RUN) instead of training its own
        command = [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--json", str(self.out)]
        command += ["--work_dir", str(self.run)]
        self.threads = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
        if share_cores:
            os.environ["OMP_NUM_THREADS"] = "1"  # for the run and every process this session starts
            torch.set_num_threads(1)
        with self.log.open("w") as log:  # a file, not a pipe: nothing reads it until the end
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
            )
        self.started = time.time()
        self.deadline = time.monotonic() + timeout_s
        self.timeline = ""  # when the run finished against when its tests asked for it: the summary prints it

    def figures(self) -> dict:
        asked = time.time()
        try:
            code = self.process.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        finally:
            self.give_back_the_core()
        assert code == 0, self.log.read_text(errors="replace")[-3000:]
        finished = self.out.stat().st_mtime  # the record is the run's last write
        self.timeline = f"convergence run: {finished - self.started:.0f} s; its tests asked for it " + (
            f"{asked - finished:.0f} s after it finished"
            if asked >= finished
            else f"and waited {finished - asked:.0f} s"
        )
        os.environ["CNX_RUN"] = str(self.run)
        return json.loads(self.out.read_text())

    def give_back_the_core(self) -> None:
        threads, variable = self.threads
        torch.set_num_threads(threads)
        if variable is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = variable

    def stop(self) -> None:
        """Kill the run and the training it started (its own process group), if still running."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", f"{BOTH_CORES}: runs after the convergence run, with both cores free")


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(config, items):
    """Start the convergence run now, in the background, and order the session around it.

    It trains and samples for about five minutes on one core while the other tests and the
    notebooks run on the other (the tests use 1.3 cores when alone). Then its tests wait for it,
    and what is in AFTER_CONVERGENCE or marked `both_cores` runs last, with both cores: notebook
    05, which analyses the run (600 steps) instead of training a 300-step one of its own, and the
    tests that need two threads.
    """
    guarded = [item for item in items if item.path.name == CONVERGENCE_TESTS]
    if not guarded or config.option.collectonly:
        return
    after = [i for i in items if i.path.name in AFTER_CONVERGENCE or i.get_closest_marker(BOTH_CORES)]
    beside = [item for item in items if item not in after and item not in guarded]
    items[:] = beside + guarded + after
    config.stash[CONVERGENCE_RUN] = ConvergenceRun(share_cores=bool(beside))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """How the session's time went around the convergence run (for ordering the suite)."""
    run = config.stash.get(CONVERGENCE_RUN, None)
    if run is not None and run.timeline:
        terminalreporter.write_line(run.timeline)


def pytest_unconfigure(config):
    run = config.stash.get(CONVERGENCE_RUN, None)
    if run is not None:
        run.stop()


@pytest.fixture(scope="session")
def convergence_run(request) -> ConvergenceRun:
    """The convergence run started when the tests were collected."""
    return request.config.stash[CONVERGENCE_RUN]
