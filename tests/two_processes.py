"""`cnx train` in two CPU processes under `accelerate launch`, for the DDP and DeepSpeed tests."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from cnx.profiles import DATA_SAMPLES

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
LAUNCHERS = {  # two CPU processes: DDP over gloo, or DeepSpeed ZeRO-2
    "ddp": (["--multi_gpu"], {"ACCELERATE_USE_CPU": "true"}),
    "deepspeed": (["--use_deepspeed", "--zero_stage", "2"], {"DS_ACCELERATOR": "cpu"}),
}


def launch_two_processes(
    kind: str, tiny_svd_dir: Path, output_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> dict[int, dict]:
    """`accelerate launch` of `cnx train` in two CPU processes on small clips; its logged steps by number.

    Each launch takes a free port, so concurrent sessions do not collide on accelerate's 29500.
    """
    flags, launcher_env = LAUNCHERS[kind]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [ACCELERATE, "launch", *flags, "--num_processes", "2", "--num_machines", "1"]
    argv += ["--mixed_precision", "no", "--dynamo_backend", "no", f"--main_process_port={port}"]
    argv += ["-m", "cnx.train", f"--pretrained_model_name_or_path={tiny_svd_dir}"]
    argv += [f"--output_dir={output_dir}", f"--meta_info_path={DATA_SAMPLES / 'meta_info.json'}", *extra]
    argv += ["--width=64", "--height=96", "--sample_n_frames=4", "--interval_frame=3", "--num_workers=0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **launcher_env, **(env or {})}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (output_dir / "logs" / "steps.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}
