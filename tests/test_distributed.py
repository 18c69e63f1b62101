"""Two-process training on the CPU with `accelerate launch`: DDP (gloo) and DeepSpeed ZeRO-2, and resume.

A launch costs far more than its checks (two processes import the libraries and load the model before
a step), so each run serves several: the DDP run is both the reference and the DDP case's run to
resume, and the DeepSpeed run (tests/conftest.py) is also the one test_export exports.
"""

import json

import pytest
from two_processes import launch_two_processes


@pytest.fixture(scope="module")
def ddp_run(tiny_svd_dir, tmp_path_factory):
    """(output_dir, steps) of a DDP run in two CPU processes: 4 steps, checkpoints at 2 and 4."""
    output_dir = tmp_path_factory.mktemp("ddp")
    return output_dir, launch_two_processes(
        "ddp", tiny_svd_dir, output_dir, "--max_train_steps=4", "--checkpointing_steps=2"
    )


@pytest.mark.parametrize("kind", ["ddp", "deepspeed"])
def test_two_processes_train_checkpoint_and_resume_exactly(kind, tiny_svd_dir, tmp_path, ddp_run, request):
    run = request.getfixturevalue(f"{kind}_run")
    straight, steps = run[0], run[1]
    checkpoint = straight / "checkpoint-2"
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    extra = []
    if kind == "deepspeed":  # ZeRO-2 shards the optimizer state across the two ranks; it clips (pitfall 8)
        assert len(list((checkpoint / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt"))) == 2
        config = json.loads((straight / "logs" / "deepspeed.json").read_text())
        assert config["zero_optimization"]["stage"] == 2 and config["gradient_clipping"] == 1.0
        extra = ["--use_ema"]  # the run keeps an EMA (test_export exports it); resumed with its state
        # DeepSpeed's shared-memory all-reduce (inference only) was not compiled: cnx.train skips it.
        assert not any(run[2].iterdir())
    assert all(r["samples_per_s"] > 0 and r["grad_norm"] is not None for r in steps.values())
    # Both backends compute the same steps: DeepSpeed matches DDP to float precision (the EMA changes
    # no step).
    ddp_losses = {step: record["loss"] for step, record in ddp_run[1].items()}
    assert [steps[s]["loss"] for s in (1, 2, 3, 4)] == pytest.approx(
        [ddp_losses[s] for s in (1, 2, 3, 4)], rel=1e-5
    )
    # Resuming from a checkpoint outside the new output_dir redoes steps 3 and 4 exactly.
    resumed = launch_two_processes(
        kind,
        tiny_svd_dir,
        tmp_path / "resumed",
        "--max_train_steps=4",
        f"--resume_from_checkpoint={checkpoint}",
        *extra,
    )
    assert sorted(resumed) == [3, 4]
    assert [resumed[s]["loss"] for s in (3, 4)] == [steps[s]["loss"] for s in (3, 4)]
