"""Run folders: everything one training run needs, written once, runnable anywhere with `bash launch.sh`.

`write_run_folder` turns a profile (`tiny` for a CPU, `full` for the original
setting on 8 GPUs) plus overrides into a numbered folder
`runs/00003-<profile>-<gpus>x<machines>-<desc>/` holding:

    training_options.json   the resolved `cnx train` options
    accelerate.yaml         processes, machines, mixed precision, DeepSpeed or not
    deepspeed.json          ZeRO stage, bf16, clipping, accumulation, CPU offload (DeepSpeed runs)
    launch.sh               the complete `accelerate launch ... -m cnx.train --flag=value ...`
    slurm.sbatch            the same command on a multi-node SLURM cluster (one task per node)
    doctor.txt              `cnx doctor` at the time of writing
    README.md               how to run it
    output/                 what training writes (checkpoints, logs, final weights)

Paths inside the folder are relative to it and launch.sh starts with `cd` into
its own folder, so the folder can be moved or copied to a cluster. `run(folder)`
starts launch.sh and streams its output with a progress bar read from
`output/logs/steps.jsonl`; `cnx launch` ends by drawing that log as
`output/logs/loss.png` and printing where the results are (the validation grid
among them). The trainer never imports this module, nor this module the
trainer: where things are in `output/` is `cnx.runs`'s to say.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from cnx import runs

OUTPUT = "output"  # the training output_dir, inside the run folder
DEFAULT_PORT = 29500

# Profile -> the training flags it implies (on top of cnx.profiles' paths and sizes).
PROFILE_FLAGS = {
    # A few minutes on a laptop CPU: one process, checkpoints midway and at the end, validation at the
    # end. ControlNeXt starts from scratch on the pretrained tiny SVD: a higher learning rate, short
    # clips (the profile's 4 frames) for many steps, and a strong control (SVD-xt: 0.2) make it learn
    # in minutes at every seed measured (benchmarks/convergence.py).
    "tiny": {
        "learning_rate": 3e-4,
        "control_scale": 2.0,
        "lr_warmup_steps": 10,
        "max_train_steps": 600,
        "checkpointing_steps": 300,
        "validation_steps": 600,
        "num_frames": 14,
        "use_ema": True,
        "num_workers": 0,
        "video_cache_mb": 128,  # data_samples' 16 videos decoded take 81 MiB: each is decoded once
    },
    # The original README's command.
    "full": {
        "learning_rate": 1e-5,
        "lr_warmup_steps": 500,
        "num_train_epochs": 6000,
        "per_gpu_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "checkpointing_steps": 2000,
        "validation_steps": 500,
        "gradient_checkpointing": True,
        "checkpoints_total_limit": 4,
        "num_workers": 4,
    },
}
PROFILE_GPUS = {"tiny": 0, "full": 8}  # 0: the CPU


def profile_options(profile_name: str, overrides: list[str], output_dir: str):
    """TrainingOptions of a profile, then `overrides` (training flags, `--name=value`) on top."""
    from cnx.options import parse_options
    from cnx.profiles import get_profile

    profile = get_profile(profile_name)
    base = {
        "pretrained_model_name_or_path": profile.pretrained_model_name_or_path,
        "meta_info_path": profile.meta_info_path,
        "validation_image_folder": profile.validation_image_folder,
        "validation_control_folder": profile.validation_control_folder,
        "validation_image": profile.validation_image,
        "width": profile.width,
        "height": profile.height,
        "sample_n_frames": profile.sample_n_frames,
        "interval_frame": profile.interval_frame,
        "mixed_precision": profile.mixed_precision,
        **PROFILE_FLAGS[profile.name],
        "output_dir": output_dir,
    }
    argv = [f"--{k}" if v is True else f"--{k}={v}" for k, v in base.items() if v is not False]
    return parse_options(argv + list(overrides))


def next_run_number(runs_dir: Path) -> int:
    numbers = [int(m[1]) for p in runs_dir.glob("*") if (m := re.match(r"(\d{5})-", p.name))]
    return max(numbers, default=-1) + 1


def accelerate_config(
    num_gpus: int, num_machines: int, mixed_precision: str, deepspeed: bool, ip, port
) -> dict:
    """accelerate's config file as a dict: CPU (one or several processes), multi-GPU or DeepSpeed."""
    processes = max(num_gpus, 1) * num_machines
    if deepspeed:
        kind = "DEEPSPEED"
    elif processes > 1:
        kind = "MULTI_GPU"  # with use_cpu: several CPU processes over gloo
    else:
        kind = "NO"
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": kind,
        "mixed_precision": mixed_precision,
        "use_cpu": num_gpus == 0,
        "num_processes": processes,
        "num_machines": num_machines,
        "machine_rank": 0,
        "main_process_ip": ip,
        "main_process_port": port,
        "rdzv_backend": "static",
        "same_network": True,
        "debug": False,
    }
    if deepspeed:
        config["deepspeed_config"] = {"deepspeed_config_file": "deepspeed.json", "zero3_init_flag": False}
    return config


def deepspeed_config(options, zero_stage: int, offload_optimizer: bool) -> dict:
    """DeepSpeed's json: the trainer sets the same batch, accumulation and clipping values again."""
    zero = {"stage": zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": options.per_gpu_batch_size,
        "gradient_accumulation_steps": options.gradient_accumulation_steps,
        "gradient_clipping": options.max_grad_norm,
        "bf16": {"enabled": options.mixed_precision == "bf16"},
        "fp16": {"enabled": options.mixed_precision == "fp16"},
        "zero_optimization": zero,
    }


LAUNCH_SH = """#!/usr/bin/env bash
# {title}
# Runs from any place: it cds into this folder, and output/ (and a copied model) are relative to it.
# PYTHON: an interpreter with cnx installed (default: `python` on PATH; `cnx.launch.run` passes its own).
# On a cluster node set MACHINE_RANK and MAIN_PROCESS_IP (slurm.sbatch does).
{needs}set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${{PYTHON:-python}}"
{env}exec "$PYTHON" -m accelerate.commands.launch --config_file accelerate.yaml \\
  --machine_rank "${{MACHINE_RANK:-0}}" --main_process_ip "${{MAIN_PROCESS_IP:-{ip}}}" \\
  --main_process_port "${{MAIN_PROCESS_PORT:-{port}}}" \\
  -m cnx.train \\
{flags}
"""

SLURM = """#!/usr/bin/env bash
#SBATCH --job-name={name}
#SBATCH --nodes={machines}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --output=slurm-%j.out
# Submit from this folder (cd into it, then `sbatch slurm.sbatch`): one task per node, each runs
# launch.sh with its node rank; the first node is the main process.
set -euo pipefail
export MAIN_PROCESS_IP="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
srun bash -c 'MACHINE_RANK=$SLURM_NODEID bash "$SLURM_SUBMIT_DIR/launch.sh"'
"""


HUB_MODEL_HELP = (
    "{model} is not on this machine. It is a gated Hugging Face repository: once, accept its licence at "
    "https://huggingface.co/{model}, log in (`hf auth login`, or HF_TOKEN set), then download it with the "
    "network allowed (`make lab` sets HF_HUB_OFFLINE=1): `HF_HUB_OFFLINE=0 hf download {model}`. It lands "
    "in the Hugging Face cache ($HF_HOME/hub, default ~/.cache/huggingface/hub), where every run on this "
    "machine finds it offline; on a cluster, download it on each machine (or share HF_HOME), or pass "
    "--pretrained_model_name_or_path=/a/local/pipeline/folder."
)


def model_missing(name_or_path: str, cache_dir: str | Path | None = None) -> str | None:
    """None when the SVD pipeline `name_or_path` loads here without the network; else how to get it.

    A folder needs its `model_index.json`; a hub id (SVD-xt 1.1) needs its files in the local
    Hugging Face cache (`cache_dir`, default the hub's), as `make lab`'s HF_HUB_OFFLINE=1 forbids
    downloading them.
    """
    path = Path(name_or_path)
    if not is_hub_id(name_or_path):
        if (path / "model_index.json").is_file():
            return None
        return f"{path}: no SVD pipeline folder (no model_index.json)"
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name_or_path, "model_index.json", cache_dir=cache_dir)
    if isinstance(found, str) and (Path(found).parent / "unet" / "config.json").is_file():
        return None
    return HUB_MODEL_HELP.format(model=name_or_path)


def is_hub_id(value: str) -> bool:
    """`owner/name` that is no folder here: a Hugging Face repository id (as diffusers reads it)."""
    return (
        re.fullmatch(r"[\w.-]+/[\w.-]+", value) is not None
        and not value.startswith(".")
        and not Path(value).exists()
    )


PATH_FLAGS = (
    "pretrained_model_name_or_path",
    "meta_info_path",
    "validation_image_folder",
    "validation_control_folder",
    "validation_image",
    "controlnet_model_name_or_path",
    "unet_model_name_or_path",
    "latent_cache_dir",
)


def outside_needs(options) -> list[str]:
    """What the run reads from outside its folder: absolute paths (the data, by default) and hub models."""
    needs = []
    for name in PATH_FLAGS:
        value = getattr(options, name, None)
        if not value:
            continue
        if Path(value).is_absolute():
            needs.append(
                f"--{name}={value}" + (" (and the videos it lists)" if name == "meta_info_path" else "")
            )
        elif name.endswith("model_name_or_path") and is_hub_id(value):
            needs.append(f"--{name}={value} (a hub id: in the machine's Hugging Face cache)")
    return needs


def needs_comment(options) -> str:
    needs = outside_needs(options)
    if not needs:
        return ""
    head = "# Read from outside this folder: on another machine these must exist (or edit the flags below):"
    return "\n".join([head, *(f"#   {need}" for need in needs)]) + "\n"


def write_run_folder(
    profile: str = "tiny",
    overrides: list[str] = (),
    num_gpus: int | None = None,
    num_machines: int = 1,
    main_process_ip: str = "127.0.0.1",
    main_process_port: int = DEFAULT_PORT,
    zero_stage: int | None = None,
    offload_optimizer: bool = False,
    desc: str = "",
    runs_dir: str | Path = "runs",
) -> Path:
    """Write a run folder (see the module docstring); return its path. Nothing is started.

    `num_gpus` per machine (default: 0, the CPU, for tiny; 8 for full); `zero_stage`
    None means DeepSpeed ZeRO-2 on GPUs and no DeepSpeed on the CPU, 0 means no DeepSpeed.
    """
    from cnx.doctor import report
    from cnx.profiles import ensure_model, get_profile

    num_gpus = PROFILE_GPUS[profile] if num_gpus is None else num_gpus
    if zero_stage is None:
        zero_stage = 2 if num_gpus > 0 else 0
    overrides = list(overrides)
    options = profile_options(profile, overrides, OUTPUT)  # validated: one clear line on bad flags
    runs_dir = Path(runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", desc or options.trainable).strip("-")
    folder = runs_dir / f"{next_run_number(runs_dir):05d}-{profile}-{max(num_gpus, 1)}x{num_machines}-{label}"
    folder.mkdir()

    # What the run needs: the tiny profile's pretrained SVD is copied into the folder and travels with it.
    if profile == "tiny" and not any(o.startswith("--pretrained_model_name_or_path") for o in overrides):
        shutil.copytree(ensure_model(get_profile("tiny")).pretrained_model_name_or_path, folder / "tiny_svd")
        options = profile_options(profile, [*overrides, "--pretrained_model_name_or_path=tiny_svd"], OUTPUT)
    options.to_json(folder / "training_options.json")

    import yaml

    deepspeed = zero_stage > 0
    config = accelerate_config(
        num_gpus, num_machines, options.mixed_precision, deepspeed, main_process_ip, main_process_port
    )
    (folder / "accelerate.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if deepspeed:
        ds = deepspeed_config(options, zero_stage, offload_optimizer)
        (folder / "deepspeed.json").write_text(json.dumps(ds, indent=2) + "\n")
    env = "export ACCELERATE_USE_CPU=true DS_ACCELERATOR=cpu\n" if num_gpus == 0 else ""
    flags = " \\\n".join(f"  {shlex.quote(flag)}" for flag in options.as_argv(changed_only=False))
    (folder / "launch.sh").write_text(
        LAUNCH_SH.format(
            title=folder.name,
            needs=needs_comment(options),
            env=env,
            ip=main_process_ip,
            port=main_process_port,
            flags=flags,
        )
    )
    (folder / "launch.sh").chmod(0o755)
    (folder / "slurm.sbatch").write_text(
        SLURM.format(name=folder.name, machines=num_machines, gpus=max(num_gpus, 1))
    )
    (folder / "doctor.txt").write_text(report() + "\n")
    (folder / "README.md").write_text(
        f"# {folder.name}\n\n"
        "Run `bash launch.sh` here (on a SLURM cluster: `sbatch slurm.sbatch` from this folder); "
        f"training writes into `{OUTPUT}/`.\n"
        "`training_options.json` holds every flag; `accelerate.yaml` (and `deepspeed.json`) the processes.\n"
    )
    return folder


def total_steps(folder: Path) -> int | None:
    """The run's optimizer steps, counted as `cnx train` counts them; None when its data cannot be read.

    `--max_train_steps` when set; else `--num_train_epochs` times the steps of an epoch: the whole
    batches each of the folder's processes reads after sharding (pitfall 7), over gradient accumulation.
    """
    import yaml

    from cnx.meta import MetaInfoError, parse_meta_info

    folder = Path(folder)
    options = json.loads((folder / runs.OPTIONS_FILE).read_text())
    if options.get("max_train_steps"):
        return options["max_train_steps"]
    world = yaml.safe_load((folder / "accelerate.yaml").read_text())["num_processes"]
    try:  # a relative path is relative to the folder, where launch.sh runs
        samples = len(parse_meta_info(folder / options["meta_info_path"])[0])
    except (OSError, MetaInfoError):  # the data is elsewhere (a cluster's): no total, the bar still counts
        return None
    per_epoch = samples // (world * options["per_gpu_batch_size"])
    if per_epoch == 0:  # the trainer stops with its own message
        return None
    return options["num_train_epochs"] * max(1, per_epoch // options["gradient_accumulation_steps"])


def run(folder: str | Path, echo=print) -> int:
    """Run `launch.sh` in its folder, streaming its output; a progress bar follows `steps.jsonl`.

    Returns the exit code. An interrupt (Ctrl-C, a notebook's stop button) stops the
    training's process group with SIGINT, then SIGTERM, then SIGKILL, and returns its code.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    steps_log = folder / OUTPUT / runs.STEPS_LOG
    # The trainer's own bar would garble the stream; launch.sh runs this interpreter unless PYTHON is set.
    env = {"PYTHON": sys.executable, **os.environ, "CNX_PROGRESS": "off"}
    child = subprocess.Popen(
        ["bash", "launch.sh"],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
        bufsize=1,
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in child.stdout], daemon=True)
    reader.start()
    bar = tqdm(total=total_steps(folder), desc=folder.name, unit="step")
    try:
        while child.poll() is None or reader.is_alive() or not lines.empty():
            try:
                echo(lines.get(timeout=0.5).rstrip("\n"))
            except queue.Empty:
                _update(bar, steps_log)
        _update(bar, steps_log)
        return child.returncode
    except KeyboardInterrupt:
        return _stop(child)
    finally:
        bar.close()


def _update(bar, steps_log: Path) -> None:
    records = runs.read_log(steps_log)  # a line being written is skipped
    last = records[-1] if records else None
    if last is not None and last["step"] != bar.n:  # redraw only on a new step
        bar.n = last["step"]
        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
        bar.refresh()


def _stop(child: subprocess.Popen) -> int:
    """SIGINT to the run's process group, then SIGTERM, then SIGKILL, 20 s apart."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            break
        try:
            return child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            continue
    return child.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cnx launch",
        description="Write a run folder and run it; other flags are training flags (--max_train_steps=100).",
    )
    parser.add_argument("--profile", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--num_gpus", type=int, default=None, help="per machine; 0: the CPU (tiny's default)")
    parser.add_argument("--num_machines", type=int, default=1)
    parser.add_argument("--main_process_ip", default="127.0.0.1")
    parser.add_argument("--main_process_port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--zero_stage", type=int, default=None, choices=(0, 1, 2, 3), help="0: no DeepSpeed")
    parser.add_argument(
        "--offload_optimizer", action="store_true", help="DeepSpeed: optimizer states on the CPU"
    )
    parser.add_argument("--desc", default="", help="a short description for the folder name")
    parser.add_argument("--runs_dir", default="runs")
    parser.add_argument(
        "--dry_run", action="store_true", help="write the folder and print launch.sh, run nothing"
    )
    args, overrides = parser.parse_known_args(argv)
    if args.num_machines < 1 or (args.num_gpus is not None and args.num_gpus < 0):
        parser.error("--num_machines must be at least 1 and --num_gpus at least 0")
    if args.offload_optimizer and args.zero_stage == 0:
        parser.error("--offload_optimizer needs DeepSpeed (a --zero_stage above 0)")
    folder = write_run_folder(
        args.profile,
        overrides,
        args.num_gpus,
        args.num_machines,
        args.main_process_ip,
        args.main_process_port,
        args.zero_stage,
        args.offload_optimizer,
        args.desc,
        args.runs_dir,
    )
    print(f"run folder: {folder}")
    if args.dry_run:
        print((folder / "launch.sh").read_text())
        return 0
    code = run(folder)
    if code == 0:
        write_loss_curve(folder)
        print(outputs_summary(folder))
    return code


LOSS_CURVE = Path("logs") / "loss.png"  # in the output folder, beside steps.jsonl


def write_loss_curve(folder: Path) -> Path | None:
    """Draw the run's `steps.jsonl` (`cnx.viz.loss_curve`) into output/logs/loss.png; None without steps."""
    records = [r for r in runs.read_log(Path(folder) / OUTPUT / runs.STEPS_LOG) if "loss" in r]
    if not records:
        return None
    import matplotlib.pyplot as plt

    from cnx import viz

    path = Path(folder) / OUTPUT / LOSS_CURVE
    fig = viz.loss_curve(records)
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)  # drawn for the file only: a notebook shows nothing twice
    return path


def outputs_summary(folder: Path) -> str:
    """Where a finished run's results are: the last validation's grid and video, curves, weights."""
    output = Path(folder) / OUTPUT
    validations = sorted(output.glob("validation/step-*"))  # step-000600: the names sort by step
    first = validations[-1] / "video-0" if validations else None  # the last validation's first video
    found = {
        "validation grid": first / "grid.png" if first else None,  # truth, pose and generated frames
        "validation video": first / "video.mp4" if first else None,
        "validation metrics": first / "metrics.json" if first else None,
        "loss curve": output / LOSS_CURVE,
        "step log": output / runs.STEPS_LOG,
        "TensorBoard": output / "logs" / "cnx",
        "checkpoint": runs.latest_checkpoint(output),
        "final weights": output / runs.FINAL,
    }
    return "\n".join(
        f"{name:>18}: {path}" for name, path in found.items() if path is not None and path.exists()
    )


if __name__ == "__main__":
    sys.exit(main())
