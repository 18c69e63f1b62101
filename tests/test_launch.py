"""Run folders: written from a profile, moved, and run with `bash launch.sh` or `cnx.launch.run`."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from cnx import launch
from cnx.options import TrainingOptions


def test_a_full_profile_folder_for_two_nodes_of_eight_gpus(tmp_path):
    folder = launch.write_run_folder(
        "full",
        ["--trainable=selective"],
        num_gpus=8,
        num_machines=2,
        main_process_ip="10.0.0.1",
        offload_optimizer=True,
        runs_dir=tmp_path,
    )
    assert folder.name == "00000-full-8x2-selective"
    options = TrainingOptions.from_json(folder / "training_options.json")
    assert (options.width, options.height, options.sample_n_frames, options.interval_frame) == (
        576,
        1024,
        21,
        3,
    )
    assert (
        options.mixed_precision == "bf16" and options.gradient_checkpointing and options.learning_rate == 1e-5
    )
    assert options.trainable == "selective" and options.output_dir == "output"
    config = yaml.safe_load((folder / "accelerate.yaml").read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["num_processes"] == 16
    assert config["num_machines"] == 2 and config["main_process_ip"] == "10.0.0.1" and not config["use_cpu"]
    deepspeed = json.loads((folder / "deepspeed.json").read_text())
    assert deepspeed["zero_optimization"]["stage"] == 2 and deepspeed["bf16"]["enabled"]
    assert deepspeed["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert deepspeed["gradient_clipping"] == options.max_grad_norm
    script = (folder / "launch.sh").read_text()
    for flag in options.as_argv(changed_only=False):  # every flag spelled out
        assert flag in script, flag
    sbatch = (folder / "slurm.sbatch").read_text()
    assert (
        "#SBATCH --nodes=2" in sbatch and "#SBATCH --gpus-per-node=8" in sbatch and "SLURM_NODEID" in sbatch
    )
    assert "torch" in (folder / "doctor.txt").read_text()
    assert len((folder / "README.md").read_text().strip().splitlines()) <= 4
    again = launch.write_run_folder("full", [], runs_dir=tmp_path)
    assert again.name == "00001-full-8x1-full"


def test_bad_training_flags_stop_the_folder_before_it_is_written(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        launch.write_run_folder("tiny", ["--learning_rat=1"], runs_dir=tmp_path)
    assert info.value.code == 2 and "--learning_rate" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_tiny_folder_moved_elsewhere_trains_with_bash_launch_sh(tmp_path):
    written = launch.write_run_folder(
        "tiny",
        ["--max_train_steps=2", "--checkpointing_steps=2", "--validation_steps=2", "--num_frames=4"],
        runs_dir=tmp_path / "here",
    )
    assert written.name == "00000-tiny-1x1-full"
    config = yaml.safe_load((written / "accelerate.yaml").read_text())
    assert (
        config["distributed_type"] == "NO" and config["use_cpu"] and not (written / "deepspeed.json").exists()
    )
    moved = tmp_path / "elsewhere" / written.name
    shutil.move(written, moved)  # the folder travels with its stand-in model and relative paths
    lines = []
    assert launch.run(moved, echo=lines.append) == 0, "\n".join(lines[-30:])
    assert any(line.startswith("done: 2 steps") for line in lines)
    output = moved / "output"
    assert (output / "checkpoint-2" / "trainer_state.json").is_file()
    assert (output / "final" / "controlnext" / "config.json").is_file()
    assert json.loads((output / "logs" / "validation.jsonl").read_text().splitlines()[0])["step"] == 2


def test_stopping_a_run_ends_its_whole_process_group():
    child = subprocess.Popen(
        ["bash", "-c", f"{sys.executable} -c 'import time; time.sleep(600)' & wait"], start_new_session=True
    )
    code = launch._stop(child)
    assert code != 0 and child.poll() is not None


@pytest.mark.parametrize(
    "num_gpus, num_machines, flags, total",
    [  # data_samples: 8 clips
        (1, 1, ["--num_train_epochs=5"], 5 * 8),
        (2, 1, ["--gradient_accumulation_steps=2", "--num_train_epochs=3"], 3 * 2),  # 4 batches per rank
        (1, 1, ["--per_gpu_batch_size=3", "--gradient_accumulation_steps=2", "--num_train_epochs=7"], 7 * 1),
        (2, 2, ["--gradient_accumulation_steps=4", "--num_train_epochs=5"], 5 * 1),  # 2 batches: still a step
    ],
)
def test_the_progress_bar_of_a_run_bounded_by_epochs_counts_the_steps_the_trainer_takes(
    tmp_path, num_gpus, num_machines, flags, total
):
    from cnx import train
    from cnx.meta import read_meta_info

    folder = launch.write_run_folder("full", flags, num_gpus, num_machines, zero_stage=0, runs_dir=tmp_path)
    options = TrainingOptions.from_json(folder / "training_options.json")
    assert options.max_train_steps is None
    assert launch.total_steps(folder) == total
    # What the trainer counts for the same options:
    samples = len(read_meta_info(options.meta_info_path))
    per_epoch = train.batches_per_epoch(samples, num_gpus * num_machines, options.per_gpu_batch_size)
    assert total == options.num_train_epochs * max(1, per_epoch // options.gradient_accumulation_steps)
    # Bounded by steps, the bar's total is that; data that is not here (a cluster's) gives no total.
    bounded = launch.write_run_folder("full", ["--max_train_steps=70"], runs_dir=tmp_path)
    assert launch.total_steps(bounded) == 70
    elsewhere = launch.write_run_folder("full", ["--meta_info_path=/cluster/meta.json"], runs_dir=tmp_path)
    assert launch.total_steps(elsewhere) is None


def test_a_finished_run_names_its_grid_loss_curve_and_latest_checkpoint(tmp_path):
    from PIL import Image

    from cnx import runs

    folder = tmp_path / "00000-tiny-1x1-full"
    output = folder / "output"
    assert launch.write_loss_curve(folder) is None  # no steps yet: nothing to draw
    (output / "logs").mkdir(parents=True)
    records = [{"step": s, "loss": 0.3 - 0.0002 * s, "lr": 3e-4} for s in range(1, 601)]
    (output / runs.STEPS_LOG).write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 601, "lo')
    for step in (600, 100):  # the older step written last: the latest is the highest step, not the newest
        runs.checkpoint_dir(output, step).mkdir()
        runs.write_state(runs.checkpoint_dir(output, step), {"step": step})
    for step in (300, 600):
        (output / "validation" / f"step-{step:06d}" / "video-0").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(output / "validation" / f"step-{step:06d}" / "video-0" / "grid.png")
    curve = launch.write_loss_curve(folder)
    assert curve == output / "logs" / "loss.png"
    with Image.open(curve) as image:
        assert image.format == "PNG" and image.width >= 800
    lines = dict(line.strip().split(": ", 1) for line in launch.outputs_summary(folder).splitlines())
    assert lines["validation grid"] == str(output / "validation" / "step-000600" / "video-0" / "grid.png")
    assert lines["loss curve"] == str(curve)
    assert lines["checkpoint"] == str(output / "checkpoint-600")


def test_launch_sh_names_no_interpreter_and_lists_what_it_reads_from_outside_its_folder(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("CNX_META_INFO", "/data/ubc/meta_info.json")
    folder = launch.write_run_folder("full", [], runs_dir=tmp_path)
    script = (folder / "launch.sh").read_text()
    assert 'PYTHON="${PYTHON:-python}"' in script and sys.executable not in script
    header = script.split("set -euo pipefail")[0]
    assert "#   --meta_info_path=/data/ubc/meta_info.json (and the videos it lists)" in header
    assert "stabilityai/stable-video-diffusion-img2vid-xt-1-1 (a hub id" in header
    tiny = launch.write_run_folder("tiny", ["--max_train_steps=2"], runs_dir=tmp_path)
    header = (tiny / "launch.sh").read_text().split("set -euo pipefail")[0]
    assert "tiny_svd" not in header  # the model travels inside the folder


def test_a_missing_model_is_named_with_how_to_get_it(tmp_path):
    from cnx.profiles import TINY_SVD

    assert launch.model_missing(str(TINY_SVD)) is None
    assert "no model_index.json" in launch.model_missing(str(tmp_path))
    hub_id = "stabilityai/stable-video-diffusion-img2vid-xt-1-1"
    message = launch.model_missing(hub_id, cache_dir=tmp_path / "hub")
    assert "licence" in message and "HF_HUB_OFFLINE=0 hf download" in message
    # The same id, downloaded: its snapshot in the cache, as `hf download` leaves it.
    snapshot = tmp_path / "hub" / "models--stabilityai--stable-video-diffusion-img2vid-xt-1-1"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("abc")
    (snapshot / "snapshots" / "abc" / "unet").mkdir(parents=True)
    (snapshot / "snapshots" / "abc" / "model_index.json").write_text("{}")
    (snapshot / "snapshots" / "abc" / "unet" / "config.json").write_text("{}")
    assert launch.model_missing(hub_id, cache_dir=tmp_path / "hub") is None
