"""`cnx <command> ...`: each command is the `main(argv)` of the module that holds its logic."""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "tiny-model": ("cnx.tiny", "write a tiny random-weight Stable Video Diffusion pipeline folder"),
    "pretrain-tiny": ("cnx.pretrain", "train the tiny SVD on synthetic dancers on a CPU (VAE, then UNet)"),
    "samples": ("cnx.synth", "write synthetic dancer clips in the training data format"),
    "check-data": ("cnx.checks", "check every entry of a meta_info.json before training"),
    "extract-poses": (
        "cnx.extract_poses",
        "pose videos and per-frame detection json for a folder of videos (MediaPipe, offline)",
    ),
    "build-meta": ("cnx.meta", "build a meta_info.json from folders of videos and pose videos"),
    "cache-latents": (
        "cnx.cache_latents",
        "encode a dataset's frames once (VAE posteriors, CLIP embeddings)",
    ),
    "train": ("cnx.train", "train ControlNeXt on SVD (the original command's flags; launch with accelerate)"),
    "generate": ("cnx.generate", "animate a reference image along poses with SVD and a trained ControlNeXt"),
    "validate": ("cnx.validate", "generate a validation folder's video and score it (metrics.json)"),
    "launch": ("cnx.launch", "write a run folder from a profile (tiny, full) and run it"),
    "export": ("cnx.export", "write a training checkpoint's weights as diffusers folders (as final/)"),
    "plan-memory": ("cnx.memory", "GPU memory per part of a training step, and the most frames that fit"),
    "doctor": ("cnx.doctor", "report Python, torch, devices, disk and every package against its pin"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: cnx <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in {"-h", "--help"}:
            print(f"\ncnx: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
