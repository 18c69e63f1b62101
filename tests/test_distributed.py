"""Two-process training on the CPU with `accelerate launch`: DDP (gloo) and DeepSpeed ZeRO-2, and resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnx.profiles import DATA_SAMPLES

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
LAUNCHERS = {
    "ddp": (["--multi_gpu"], {"ACCELERATE_USE_CPU": "true"}),
    "deepspeed": (["--use_deepspeed", "--zero_stage", "2"], {"DS_ACCELERATOR": "cpu"}),
}


def launch(kind, tiny_svd_dir, output_dir, *extra):
    flags, env = LAUNCHERS[kind]
    argv = [
        ACCELERATE,
        "launch",
        *flags,
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
    ]
    argv += ["--dynamo_backend", "no", "-m", "cnx.train", f"--pretrained_model_name_or_path={tiny_svd_dir}"]
    argv += [f"--output_dir={output_dir}", f"--meta_info_path={DATA_SAMPLES / 'meta_info.json'}", *extra]
    argv += ["--width=64", "--height=96", "--sample_n_frames=4", "--interval_frame=3", "--num_workers=0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        r["step"]: r for r in map(json.loads, (output_dir / "logs" / "steps.jsonl").read_text().splitlines())
    }


@pytest.fixture(scope="module")
def ddp_losses(tiny_svd_dir, tmp_path_factory):
    steps = launch(
        "ddp", tiny_svd_dir, tmp_path_factory.mktemp("ddp"), "--max_train_steps=4", "--checkpointing_steps=2"
    )
    return {step: record["loss"] for step, record in steps.items()}


@pytest.mark.parametrize("kind", ["ddp", "deepspeed"])
def test_two_processes_train_checkpoint_and_resume_exactly(kind, tiny_svd_dir, tmp_path, ddp_losses):
    straight = tmp_path / "straight"
    steps = launch(kind, tiny_svd_dir, straight, "--max_train_steps=4", "--checkpointing_steps=2")
    checkpoint = straight / "checkpoint-2"
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    if kind == "deepspeed":  # ZeRO-2 shards the optimizer state across the two ranks; it clips (pitfall 8)
        assert len(list((checkpoint / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt"))) == 2
        config = json.loads((straight / "logs" / "deepspeed.json").read_text())
        assert config["zero_optimization"]["stage"] == 2 and config["gradient_clipping"] == 1.0
    assert all(r["samples_per_s"] > 0 and r["grad_norm"] is not None for r in steps.values())
    # Both backends compute the same steps: DeepSpeed matches DDP to float precision.
    assert [steps[s]["loss"] for s in (1, 2, 3, 4)] == pytest.approx(
        [ddp_losses[s] for s in (1, 2, 3, 4)], rel=1e-5
    )
    # Resuming from a checkpoint outside the new output_dir redoes steps 3 and 4 exactly.
    resumed = launch(
        kind,
        tiny_svd_dir,
        tmp_path / "resumed",
        "--max_train_steps=4",
        f"--resume_from_checkpoint={checkpoint}",
    )
    assert sorted(resumed) == [3, 4]
    assert [resumed[s]["loss"] for s in (3, 4)] == [steps[s]["loss"] for s in (3, 4)]
