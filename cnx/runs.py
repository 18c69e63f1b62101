"""The layout of a training output folder, in one place: everything that finds a checkpoint asks here.

    output_dir/
      training_options.json     the run's options (cnx.options)
      checkpoint-<step>/        accelerate's save_state + training_options.json + trainer_state.json
      .partial-checkpoint-<step>/  a save in progress; renamed to checkpoint-<step> once complete
      final/                    the diffusers folders written at the end (controlnext/, unet/, ...)
      logs/steps.jsonl          one json line per optimizer step
      logs/validation.jsonl     one json line per validation video
      validation/step-<step>/   validation videos, grids and metrics

A checkpoint is complete when its `trainer_state.json` exists: it is written
last, into the temporary folder, before the rename. No torch here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_PREFIX = ".partial-"
OPTIONS_FILE = "training_options.json"
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
FINAL = "final"
STEPS_LOG = Path("logs") / "steps.jsonl"
VALIDATION_LOG = Path("logs") / "validation.jsonl"


class RunLayoutError(ValueError):
    """A folder that is not what a cnx run wrote; the message names it."""


def checkpoint_step(path: Path) -> int | None:
    """The step of a `checkpoint-<step>` folder, None for any other name (pitfall 3)."""
    path = Path(path)
    suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def partial_dir(output_dir: Path, step: int) -> Path:
    """Where a checkpoint is written before it is complete."""
    return Path(output_dir) / f"{PARTIAL_PREFIX}{CHECKPOINT_PREFIX}{step}"


def is_checkpoint(path: Path) -> bool:
    """A complete cnx checkpoint folder (any name): it holds trainer_state.json."""
    return (Path(path) / STATE_FILE).is_file()


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Finished `checkpoint-<step>` folders of a run, oldest step first (partial saves are skipped)."""
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_step(p) is not None]
    return sorted((p for p in found if is_checkpoint(p)), key=checkpoint_step)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def final_dir(output_dir: Path) -> Path | None:
    """The run's `final/` export when it holds a ControlNeXt, else None."""
    final = Path(output_dir) / FINAL
    return final if (final / "controlnext").is_dir() else None


def resolve_resume(value: str | None, output_dir: Path) -> Path | None:
    """The checkpoint to resume: None, "latest" (in output_dir; none yet is a fresh start) or any path."""
    if value is None:
        return None
    if value == "latest":
        return latest_checkpoint(output_dir)
    path = Path(value)
    if not is_checkpoint(path):
        raise RunLayoutError(f"{path}: not a complete cnx checkpoint (no {STATE_FILE})")
    return path


def read_state(checkpoint: Path) -> dict:
    """A checkpoint's trainer_state.json: step, data position (batches) and epoch."""
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def write_state(folder: Path, state: dict) -> None:
    (Path(folder) / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def rotate(output_dir: Path, limit: int | None, keep: Path | None) -> None:
    """Delete the oldest checkpoints beyond `limit`, never `keep` (the one this run resumed from)."""
    if not limit:
        return
    found = complete_checkpoints(output_dir)
    for old in found[: max(0, len(found) - limit)]:
        if keep is None or old.resolve() != Path(keep).resolve():
            shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------
# Logs


def read_log(path: Path) -> list[dict]:
    """The records of a json-lines log; a line cut short by a crash (not valid json) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def truncate_log(path: Path, step: int) -> None:
    """Keep the records of `path` up to `step`: later ones are redone by a resumed run."""
    path = Path(path)
    if path.exists():
        kept = [r for r in read_log(path) if isinstance(r.get("step"), int) and r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class StepLog:
    """`logs/steps.jsonl`: one json line per optimizer step, flushed as written (main process only)."""

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int):
        self.file = None
        if enabled:
            path = Path(output_dir) / STEPS_LOG
            path.parent.mkdir(parents=True, exist_ok=True)
            truncate_log(path, resume_step)
            truncate_log(Path(output_dir) / VALIDATION_LOG, resume_step)
            self.file = path.open("a")

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
