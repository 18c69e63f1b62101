"""`cnx train`'s options: one frozen dataclass, from which the flags, the json and the help are made.

Every field of `TrainingOptions` is a flag of the same name (`--learning_rate`),
with its default and one line of help; `build_parser` generates the argparse
parser from the fields, so flags, `training_options.json` and the docs cannot
drift apart. The original training script's flags keep their names; where cnx
means something different the help says so.

`parse_options` refuses bad input in one line, `cnx train: <problem>`, exit
status 2, before anything heavy is imported: this module imports neither torch
nor diffusers, so a typo costs a second, not a model load. It catches the
original README's own trap: `--output_dir= $PATH` is split by the shell into
`--output_dir=` (an empty value) and a stray `$PATH`.

Three defaults are copied here rather than imported (their modules import
torch); `tests/test_options.py` checks they equal `cnx.edm.SIGMA_SAMPLERS`,
`cnx.conditioning.DEFAULT_CONTROL_SCALE` and `DEFAULT_CONDITIONING_DROPOUT_PROB`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

from cnx import flags
from cnx.flags import flag

OPTIONS_FILE = "training_options.json"
SIGMA_SAMPLERS = ("lognormal", "cosine_interpolated")  # = cnx.edm.SIGMA_SAMPLERS
DEFAULT_CONTROL_SCALE = 0.2  # = cnx.conditioning.DEFAULT_CONTROL_SCALE
DEFAULT_CONDITIONING_DROPOUT_PROB = 0.1  # = cnx.conditioning.DEFAULT_CONDITIONING_DROPOUT_PROB
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
TRAINABLE = ("full", "selective", "lora", "controlnext")
WEIGHTS_DTYPES = ("fp32", "bf16")
CHECKPOINTING = ("blocks", "diffusers")  # what --gradient_checkpointing recomputes (cnx.checkpointing)
DEFAULT_CHECKPOINTING = "blocks"  # measured by `cnx plan-memory`: the lighter, at a little recomputation
SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")  # = cnx.attention.SDPA_BACKENDS
COMPILE_BACKENDS = ("inductor", "aot_eager")  # --compile_backend
# What an options file written before a field existed meant by its absence (the older behaviour).
LEGACY_DEFAULTS = {"single_token_cross_attention": False}
SECRET_FIELDS = ("hub_token",)  # never written to training_options.json or a launch command

# The original script's other dataset (webvid) and its prompt: flag -> what to use instead.
UNSUPPORTED_FLAGS = {
    **dict.fromkeys(
        ("csv_path", "video_folder", "condition_folder", "motion_folder"),
        "cnx reads the ubc-style data list, use --meta_info_path",
    ),
    "validation_prompt": "SVD is conditioned on an image, not a prompt: use --validation_image",
    "latent_cache_mb": "the in-memory latent cache is gone: build one on disk with `cnx cache-latents` "
    "and pass --latent_cache_dir",
}
RETIRED_OPTIONS = ("latent_cache_mb",)  # read from older training_options.json files and ignored
VALIDATION_FLAGS = ("validation_image_folder", "validation_image", "validation_control_folder")


@dataclass(frozen=True)
class TrainingOptions:
    # Model and weights
    pretrained_model_name_or_path: str = flag(
        "stabilityai/stable-video-diffusion-img2vid-xt-1-1", "SVD diffusers pipeline folder or hub id"
    )
    revision: str | None = flag(None, "hub revision of the pretrained pipeline")
    non_ema_revision: str | None = flag(None, "hub revision of non-EMA weights (kept for the original's CLI)")
    pretrain_unet: str | None = flag(None, "a UNet folder to start from instead of the pipeline's unet/")
    controlnet_model_name_or_path: str | None = flag(
        None, "ControlNeXt weights to start from (file or folder); default: freshly initialised"
    )
    unet_model_name_or_path: str | None = flag(None, "trained UNet weights to start from (file or folder)")
    trainable: str = flag(
        "full",
        "what trains: full = UNet + ControlNeXt; selective = ControlNeXt + the UNet attention's "
        "to_out/to_v; lora = ControlNeXt + peft LoRA adapters (rank --rank) on the UNet attention; "
        "controlnext = ControlNeXt alone",
        TRAINABLE,
    )
    rank: int = flag(128, "LoRA rank, used with --trainable=lora")
    train_stage: int | None = flag(
        None, "ignored: it did nothing in the original; --trainable chooses what trains"
    )
    # Data
    dataset_type: str = flag("ubc", "data list format: the ubc-style meta_info.json", ("ubc",))
    meta_info_path: str | None = flag(None, "required: json list of {video_path, guide_path, meta_info}")
    width: int = flag(576, "training width in pixels, a multiple of 8 (original README: 576)")
    height: int = flag(1024, "training height in pixels, a multiple of 8 (original README: 1024)")
    sample_n_frames: int = flag(21, "frames per training clip (original README: 21)")
    interval_frame: int = flag(3, "spacing between sampled frames; <= 0 draws one in [2, 7] per clip")
    ref_augment: bool = flag(False, "randomly zoom, shift and colour-jitter the reference image")
    num_workers: int = flag(2, "dataloader worker processes per GPU; 0 loads in the main process")
    max_bad_sample_fraction: float = flag(
        0.01, "stop the run once more than this fraction of samples failed to load (pitfall 16)"
    )
    # Optimisation
    per_gpu_batch_size: int = flag(1, "clips per GPU per step")
    gradient_accumulation_steps: int = flag(1, "micro-batches accumulated per optimizer step")
    num_train_epochs: int = flag(100, "passes over the data; --max_train_steps overrides it")
    max_train_steps: int | None = flag(None, "total optimizer steps; overrides --num_train_epochs")
    learning_rate: float = flag(1e-5, "peak learning rate, after warm-up (original README: 1e-5)")
    scale_lr: bool = flag(False, "multiply the learning rate by GPUs x accumulation steps x batch size")
    lr_scheduler: str = flag(
        "constant", "learning-rate schedule (diffusers.optimization's names)", LR_SCHEDULERS
    )
    lr_warmup_steps: int = flag(
        0, "linear warm-up steps; cnx warms up with every schedule (the original ignored it, pitfall 7)"
    )
    adam_beta1: float = flag(0.9, "Adam's beta1")
    adam_beta2: float = flag(0.999, "Adam's beta2")
    adam_weight_decay: float = flag(1e-2, "AdamW weight decay (cnx spares norms and biases, pitfall 9)")
    adam_epsilon: float = flag(1e-8, "Adam's epsilon")
    max_grad_norm: float = flag(1.0, "gradient clipping norm, applied with and without DeepSpeed (pitfall 8)")
    use_8bit_adam: bool = flag(
        False, "8-bit AdamW moments from bitsandbytes (the bnb extra): CUDA/ROCm GPUs, Intel XPUs, CPUs"
    )
    weights_dtype: str = flag(
        "fp32",
        "dtype the UNet and ControlNeXt weights (and so the gradients) are stored in; bf16 needs "
        "--mixed_precision=bf16 and keeps a float32 master copy in the optimizer (cnx.bf16_adamw)",
        WEIGHTS_DTYPES,
    )
    stochastic_rounding: bool = flag(
        False, "with --weights_dtype=bf16: round each update stochastically into the bf16 weights, no master"
    )
    use_ema: bool = flag(False, "keep an EMA of the trained weights and save it (pitfall 6)")
    gradient_checkpointing: bool = flag(False, "recompute activations in backward to save memory")
    checkpointing: str = flag(
        DEFAULT_CHECKPOINTING,
        "what --gradient_checkpointing recomputes (cnx.checkpointing): blocks = each of the UNet's "
        "spatio-temporal transformers whole; diffusers = diffusers' own (temporal activations stored)",
        CHECKPOINTING,
    )
    mixed_precision: str = flag(
        "no",
        "accelerate's mixed precision; sigmas and the loss stay float32 (pitfall 11)",
        ("no", "fp16", "bf16"),
    )
    allow_tf32: bool = flag(False, "allow TF32 matmuls on Ampere and newer GPUs")
    enable_xformers_memory_efficient_attention: bool = flag(False, "use xformers attention")
    single_token_cross_attention: bool = flag(
        True,
        "compute the UNet's cross-attention to its one image token as to_out(to_v(token)): exact, "
        "faster; its unread norm2/to_q/to_k are frozen, where the original trained them on zero "
        "gradients (cnx.attention)",
    )
    compile: bool = flag(False, "torch.compile each repeated UNet block (cnx.compile); compiles at step 1")
    compile_backend: str = flag(
        "inductor",
        "torch.compile's backend for --compile; aot_eager traces but generates no code (tests, bisecting)",
        COMPILE_BACKENDS,
    )
    fused_adamw: bool = flag(
        True,
        "torch's fused AdamW kernel on CUDA and CPU; off: torch's choice (foreach on CUDA, as the original)",
    )
    sdpa_backend: str = flag(
        "auto",
        "attention kernel tried first, then torch's order; auto: torch's (flash, efficient, math, cudnn)",
        SDPA_BACKENDS,
    )
    latent_cache_dir: str | None = flag(
        None,
        "read each clip's VAE posteriors (and the reference's CLIP embedding) from this `cnx cache-latents` "
        "folder instead of encoding the frames every step; refused if built for another model, size or data",
    )
    video_cache_mb: int = flag(
        0,
        "keep up to this many MiB of whole decoded videos per data process in host memory, so each is "
        "opened and decoded once (small datasets); 0: decode each sample's frames from the file",
    )
    # Noise and conditioning
    sigma_sampler: str = flag(
        "lognormal",
        "noise-level sampler; the original's cosine_interpolated mismatched SVD (pitfall 13)",
        SIGMA_SAMPLERS,
    )
    conditioning_dropout_prob: float = flag(
        DEFAULT_CONDITIONING_DROPOUT_PROB,
        "chance to drop image embedding, reference latent and control at once, as guidance does (pitfall 12)",
    )
    control_scale: float = flag(DEFAULT_CONTROL_SCALE, "ControlNeXt's control strength in training")
    seed: int = flag(0, "seed of every random stream, per (seed, rank, step) (pitfall 10)")
    # Checkpoints, validation, logging
    output_dir: str = flag("outputs", "where checkpoints, validation and logs are written")
    checkpointing_steps: int = flag(500, "save the full training state every N optimizer steps")
    checkpoints_total_limit: int | None = flag(None, "keep only the newest N checkpoints; default: keep all")
    resume_from_checkpoint: str | None = flag(
        None, "a checkpoint folder, or 'latest' in --output_dir; restores weights, optimizer, schedule, step"
    )
    validation_steps: int = flag(500, "validate every N optimizer steps")
    num_validation_images: int = flag(1, "validation videos generated each time; 0: no validation")
    num_frames: int = flag(
        14, "frames generated at validation (the original's meaning; clips: --sample_n_frames)"
    )
    decode_chunk_size: int | None = flag(
        None, "frames the VAE decodes together at validation; default: all (SVD's decoder saw long clips)"
    )
    validation_image_folder: str | None = flag(
        None, "ground-truth frames 0.png..N.png (give all three or none)"
    )
    validation_image: str | None = flag(None, "reference image for validation (give all three or none)")
    validation_control_folder: str | None = flag(None, "pose frames 0.png..N.png (give all three or none)")
    logging_dir: str = flag("logs", "tracker logs, relative to --output_dir")
    report_to: str = flag("tensorboard", "where metrics are logged", ("tensorboard", "none"))
    log_trainable_parameters: bool = flag(False, "write the names of the trained parameters to the output")
    push_to_hub: bool = flag(False, "push the trained weights to the hub repo --hub_model_id")
    hub_model_id: str | None = flag(None, "hub repository for --push_to_hub")
    hub_token: str | None = flag(None, "hub token; never saved: prefer `hf auth login` or $HF_TOKEN")
    local_rank: int = flag(-1, "accepted and ignored: accelerate passes the rank through the environment")

    def problems(self) -> list[str]:
        """Every problem with these values, one short sentence each; empty when all is well."""
        found = []
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata["choices"]
            if value == "":
                found.append(f"--{f.name} has an empty value")
            elif isinstance(value, float) and not math.isfinite(value):
                found.append(f"--{f.name} must be a finite number, got {value}")
            elif choices and value not in choices:
                found.append(f"--{f.name} must be one of {', '.join(choices)}, got {value!r}")
        if self.meta_info_path is None:
            found.append("--meta_info_path is required: the json list of training videos")
        for name in ("width", "height"):
            if getattr(self, name) < 8 or getattr(self, name) % 8:
                found.append(f"--{name} must be a positive multiple of 8, got {getattr(self, name)}")
        at_least_one = (
            "sample_n_frames", "num_frames", "per_gpu_batch_size", "gradient_accumulation_steps",
            "num_train_epochs", "max_train_steps", "checkpointing_steps", "checkpoints_total_limit",
            "validation_steps", "decode_chunk_size",
        )  # fmt: skip
        for name in at_least_one:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                found.append(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in (
            "lr_warmup_steps",
            "num_workers",
            "video_cache_mb",
            "num_validation_images",
        ):
            if getattr(self, name) < 0:
                found.append(f"--{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("conditioning_dropout_prob", "max_bad_sample_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                found.append(f"--{name} is a probability: it must be in [0, 1], got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                found.append(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("learning_rate", "adam_epsilon", "max_grad_norm"):
            if getattr(self, name) <= 0:
                found.append(f"--{name} must be greater than 0, got {getattr(self, name)}")
        if self.trainable == "lora" and self.rank < 1:
            found.append(f"--trainable=lora needs --rank of at least 1, got {self.rank}")
        given = [name for name in VALIDATION_FLAGS if getattr(self, name) is not None]
        if 0 < len(given) < len(VALIDATION_FLAGS):
            missing = ", ".join(f"--{name}" for name in VALIDATION_FLAGS if name not in given)
            found.append(
                f"validation needs all three of --{', --'.join(VALIDATION_FLAGS)} or none; missing {missing}"
            )
        found += weights_problems(
            self.weights_dtype, self.stochastic_rounding, self.mixed_precision, self.use_8bit_adam
        )
        if self.push_to_hub and not self.hub_model_id:
            found.append("--push_to_hub needs --hub_model_id (the hub repository to push to)")
        return found

    def as_argv(self, changed_only: bool = True) -> list[str]:
        """Flags that reproduce these options: `parse_options(options.as_argv()) == options`.

        `changed_only` leaves out values equal to their defaults (as the original README's
        command does). The hub token is left out.
        """
        return flags.as_argv(self, changed_only, skip=SECRET_FIELDS)

    def to_json(self, path: str | Path) -> Path:
        """Write `training_options.json` (sorted keys, indent 2) to a folder, or to `path` ending in .json."""
        path = _json_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in SECRET_FIELDS}
        path.write_text(json.dumps(values, sort_keys=True, indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> TrainingOptions:
        """Read what `to_json` wrote (the file, or a folder holding it); keys it lacks take defaults.

        Except LEGACY_DEFAULTS: a file from before such a field meant the behaviour of that time.
        """
        path = _json_path(path)
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid json ({err})") from err
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a json object of options, got {type(values).__name__}")
        values = LEGACY_DEFAULTS | values
        hints = typing.get_type_hints(cls)
        for name in RETIRED_OPTIONS:  # an older run's options still load (its checkpoints, notebook 05)
            values.pop(name, None)
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise ValueError(
                f"{path}: unknown options {', '.join(unknown)} (not fields of cnx's TrainingOptions)"
            )
        for name, value in values.items():
            base, optional = flags.base_type(hints[name])
            if base is float and type(value) is int:
                values[name] = value = float(value)
            if not (type(value) is base or (value is None and optional)):
                expected = base.__name__ + (" or null" if optional else "")
                raise ValueError(f"{path}: {name} must be {expected}, got {value!r}")
        return cls(**values)


def weights_problems(
    weights_dtype: str, stochastic_rounding: bool, mixed_precision: str, use_8bit_adam: bool
) -> list[str]:
    """What cannot work among --weights_dtype, --stochastic_rounding, --mixed_precision and
    --use_8bit_adam (for `cnx train` and `cnx plan-memory` alike)."""
    found = []
    if stochastic_rounding and weights_dtype != "bf16":
        found.append("--stochastic_rounding rounds updates into bf16 weights: give --weights_dtype=bf16")
    if weights_dtype == "bf16" and mixed_precision != "bf16":
        found.append(
            f"--weights_dtype=bf16 computes in bf16: give --mixed_precision=bf16, not {mixed_precision}"
        )
    if weights_dtype == "bf16" and use_8bit_adam:
        found.append(
            "--use_8bit_adam updates float32 weights; with --weights_dtype=bf16 cnx's AdamW keeps "
            "float32 moments: drop one of the two"
        )
    return found


def _json_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".json" else path / OPTIONS_FILE


def build_parser() -> argparse.ArgumentParser:
    """The `cnx train` parser, one flag per TrainingOptions field (its type, default, choices, help)."""
    return flags.build_parser(
        TrainingOptions,
        "cnx train",
        "Train ControlNeXt on Stable Video Diffusion; every flag is a TrainingOptions field.",
    )


def format_help() -> str:
    """`cnx train --help`, generated from the fields."""
    return build_parser().format_help()


def _fail(problem: str) -> typing.NoReturn:
    print(f"cnx train: {problem}", file=sys.stderr)
    raise SystemExit(2)


def _argv_problem(argv: list[str], known: set[str]) -> str | None:
    """What argparse would word badly: `--flag=` with nothing after it, and the original's dropped flags."""
    for item in argv:
        name = item[2:].partition("=")[0]
        if item.startswith("--") and name in UNSUPPORTED_FLAGS:
            return f"--{name} is not supported here: {UNSUPPORTED_FLAGS[name]}"
        if item.startswith("--") and item.endswith("=") and name in known and item.count("=") == 1:
            return f"--{name} has an empty value: write --{name}=VALUE without a space"
    return None


def _unknown_problem(extras: list[str], known: set[str]) -> str:
    given = [item for item in extras if item.startswith("-")]
    if not given:
        return f"unexpected value {extras[0]!r}: values follow their flag, as --flag=VALUE or --flag VALUE"
    name = given[0].lstrip("-").partition("=")[0]
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f"did you mean --{close[0]}?" if close else "see cnx train --help"
    return f"unknown flag --{name}; {hint}"


def parse_options(argv: list[str] | None = None) -> TrainingOptions:
    """Options from `argv` (default: sys.argv[1:]); any problem: one line `cnx train: ...`, exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    known = {f.name for f in dataclasses.fields(TrainingOptions)}
    problem = _argv_problem(argv, known)
    if problem:
        _fail(problem)
    try:
        args, extras = parser.parse_known_args(argv)
    except ValueError as err:
        _fail(str(err))
    if extras:
        _fail(_unknown_problem(extras, known))
    options = TrainingOptions(**vars(args))
    problems = options.problems()
    if problems:
        _fail("; ".join(problems))
    if options.train_stage is not None:
        print(
            "cnx train: warning: --train_stage is ignored (it did nothing in the original script); "
            "--trainable chooses what trains",
            file=sys.stderr,
        )
    return options
