"""`cnx train`'s options: the original README's command, generated flags, round trips, one-line errors."""

import dataclasses
import json
import subprocess
import sys

import pytest

from cnx.options import (
    LR_SCHEDULERS,
    OPTIONS_FILE,
    TrainingOptions,
    format_help,
    parse_options,
)


@pytest.fixture
def paths(tmp_path):
    """Stand-ins for the README's placeholders (the options never open them)."""
    names = {
        "SAVE_DIR": "save",
        "META_INFO": "meta_info.json",
        "GROUND_TRUTH": "validation/ground_truth",
        "POSE": "validation/pose",
        "REFERENCE_IMAGE": "validation/reference_image.png",
    }
    return {key: str(tmp_path / name) for key, name in names.items()}


def readme_argv(paths, output_dir_split=False):
    """The original README's training command, placeholders filled in, at the tiny 64x96 size."""
    output_dir = (
        ["--output_dir=", paths["SAVE_DIR"]] if output_dir_split else [f"--output_dir={paths['SAVE_DIR']}"]
    )
    return [
        "--pretrained_model_name_or_path=stabilityai/stable-video-diffusion-img2vid-xt-1-1",
        *output_dir,
        "--dataset_type=ubc",
        f"--meta_info_path={paths['META_INFO']}",
        f"--validation_image_folder={paths['GROUND_TRUTH']}",
        f"--validation_control_folder={paths['POSE']}",
        f"--validation_image={paths['REFERENCE_IMAGE']}",
        "--width=64",
        "--height=96",
        "--lr_warmup_steps", "500",
        "--sample_n_frames", "21",
        "--interval_frame", "3",
        "--learning_rate=1e-5",
        "--per_gpu_batch_size=1",
        "--num_train_epochs=6000",
        "--mixed_precision=bf16",
        "--gradient_accumulation_steps=1",
        "--checkpointing_steps=2000",
        "--validation_steps=500",
        "--gradient_checkpointing",
        "--checkpoints_total_limit", "4",
    ]  # fmt: skip


def minimal(paths, *flags):
    return [f"--meta_info_path={paths['META_INFO']}", *flags]


def refused(capsys, argv) -> str:
    """The single stderr line of a refused argv (exit status 2, nothing on stdout)."""
    with pytest.raises(SystemExit) as exit_info:
        parse_options(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cnx train: ")
    return lines[0]


def test_readme_command_parses_to_its_values(paths, capsys):
    options = parse_options(readme_argv(paths))
    assert capsys.readouterr().err == ""
    assert options.output_dir == paths["SAVE_DIR"]
    assert options.meta_info_path == paths["META_INFO"]
    assert options.validation_image_folder == paths["GROUND_TRUTH"]
    assert options.validation_control_folder == paths["POSE"]
    assert options.validation_image == paths["REFERENCE_IMAGE"]
    assert (options.width, options.height, options.sample_n_frames, options.interval_frame) == (64, 96, 21, 3)
    assert options.learning_rate == 1e-5 and options.lr_warmup_steps == 500
    assert options.num_train_epochs == 6000 and options.mixed_precision == "bf16"
    assert (options.checkpointing_steps, options.validation_steps, options.checkpoints_total_limit) == (
        2000,
        500,
        4,
    )
    assert options.gradient_checkpointing is True and options.use_ema is False
    # What the README leaves out takes cnx's defaults.
    assert (options.trainable, options.sigma_sampler, options.seed, options.lr_scheduler) == (
        "full",
        "lognormal",
        0,
        "constant",
    )


def test_readme_output_dir_with_a_space_is_refused_in_one_line(paths, capsys):
    line = refused(capsys, readme_argv(paths, output_dir_split=True))
    assert line == "cnx train: --output_dir has an empty value: write --output_dir=VALUE without a space"
    # An unset $PATH_TO_THE_SAVE_DIR leaves `--output_dir=` followed by the next flag: the same message.
    argv = readme_argv(paths, output_dir_split=True)
    argv.remove(paths["SAVE_DIR"])
    assert "--output_dir has an empty value" in refused(capsys, argv)


def test_every_field_is_a_flag_with_help():
    text = format_help()
    for f in dataclasses.fields(TrainingOptions):
        assert f"--{f.name}" in text
        assert f.metadata["help"], f.name


def test_defaults_and_choices_come_from_the_modules_that_own_them():
    from diffusers.optimization import SchedulerType

    from cnx import conditioning, edm

    options = TrainingOptions()
    assert options.control_scale == conditioning.DEFAULT_CONTROL_SCALE
    assert options.conditioning_dropout_prob == conditioning.DEFAULT_CONDITIONING_DROPOUT_PROB
    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(TrainingOptions)}
    assert choices["sigma_sampler"] == edm.SIGMA_SAMPLERS
    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}
    assert choices["trainable"] == ("full", "selective", "lora", "controlnext")


def test_defaults_parse_with_only_the_data_list(paths):
    options = parse_options(minimal(paths))
    assert options == TrainingOptions(meta_info_path=paths["META_INFO"])
    assert options.seed == 0 and options.num_workers == 2 and options.checkpoints_total_limit is None
    assert options.mixed_precision == "no" and options.lr_warmup_steps == 0


def test_json_round_trip(paths, tmp_path):
    options = parse_options(readme_argv(paths) + ["--trainable=lora", "--rank=4", "--use_ema", "--seed=7"])
    written = options.to_json(tmp_path / "run")
    assert written == tmp_path / "run" / OPTIONS_FILE
    text = written.read_text()
    assert list(json.loads(text)) == sorted(json.loads(text)) and '\n  "adam_beta1": 0.9,' in text
    assert TrainingOptions.from_json(tmp_path / "run") == options
    assert TrainingOptions.from_json(written) == options


def test_json_unknown_keys_and_wrong_types_name_the_file(paths, tmp_path):
    path = TrainingOptions(meta_info_path=paths["META_INFO"]).to_json(tmp_path / OPTIONS_FILE)
    values = json.loads(path.read_text())
    path.write_text(json.dumps(values | {"csv_path": "x", "lr": 1}))
    with pytest.raises(ValueError, match=rf"{path}: unknown options csv_path, lr"):
        TrainingOptions.from_json(path)
    path.write_text(json.dumps(values | {"width": "64"}))
    with pytest.raises(ValueError, match=rf"{path}: width must be int, got '64'"):
        TrainingOptions.from_json(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{path}: not valid json"):
        TrainingOptions.from_json(path)
    path.write_text(json.dumps(values | {"learning_rate": 1}))  # an int where a float is due is read as one
    assert TrainingOptions.from_json(path).learning_rate == 1.0
    path.write_text(json.dumps(values | {"latent_cache_mb": 64}))  # a retired option of older runs
    assert TrainingOptions.from_json(path) == TrainingOptions(meta_info_path=paths["META_INFO"])


def test_hub_token_is_never_written(paths, tmp_path):
    options = TrainingOptions(meta_info_path=paths["META_INFO"], hub_token="hf_secret")
    assert "hf_secret" not in " ".join(options.as_argv(changed_only=False))
    assert "hf_secret" not in options.to_json(tmp_path).read_text()


@pytest.mark.parametrize("changed_only", [True, False])
def test_as_argv_round_trip(paths, changed_only):
    options = parse_options(
        readme_argv(paths)
        + [
            "--trainable=selective",
            "--sigma_sampler=cosine_interpolated",
            "--adam_epsilon=1e-7",
            "--ref_augment",
        ]
        + [
            "--max_train_steps=3",
            "--control_scale=0.35",
            "--local_rank=-1",
            "--resume_from_checkpoint=latest",
        ]
    )
    argv = options.as_argv(changed_only=changed_only)
    assert parse_options(argv) == options
    assert all(item.startswith("--") for item in argv)
    assert "--width=64" in argv and "--gradient_checkpointing" in argv
    assert ("--num_workers=2" in argv) is not changed_only


def test_help_is_generated_from_the_fields():
    text = format_help()
    assert text.startswith("usage: cnx train")
    assert "pitfall 7" in text and "{full,selective,lora,controlnext}" in text


def test_help_flag_prints_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_options(["--help"])
    assert exit_info.value.code == 0
    assert "--meta_info_path" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--learning_rat=1e-4"], "unknown flag --learning_rat; did you mean --learning_rate?"),
        (["--zzz"], "unknown flag --zzz; see cnx train --help"),
        (["stray"], "unexpected value 'stray'"),
        (["--width=abc"], "--width: invalid int value: 'abc'"),
        (["--width"], "--width: expected one argument"),
        (["--lr_scheduler=cosine_warm"], "--lr_scheduler: invalid choice: 'cosine_warm'"),
        (["--dataset_type=webvid"], "--dataset_type: invalid choice: 'webvid'"),
        (["--gradient_checkpointing=maybe"], "--gradient_checkpointing: expected true or false, got 'maybe'"),
        (["--output_dir="], "--output_dir has an empty value: write --output_dir=VALUE without a space"),
        (["--output_dir", ""], "--output_dir has an empty value"),
        (
            ["--csv_path=/data/list.csv"],
            "--csv_path is not supported here: cnx reads the ubc-style data list",
        ),
        (["--video_folder", "/v"], "--video_folder is not supported here: cnx reads the ubc-style data list"),
        (
            ["--latent_cache_mb=64"],
            "--latent_cache_mb is not supported here: the in-memory latent cache is gone",
        ),
        (
            ["--condition_folder=/c"],
            "--condition_folder is not supported here: cnx reads the ubc-style data list",
        ),
        (["--motion_folder=/m"], "--motion_folder is not supported here: cnx reads the ubc-style data list"),
        (["--validation_prompt=a dancer"], "--validation_prompt is not supported here"),
        (["--width=100"], "--width must be a positive multiple of 8, got 100"),
        (["--height=0"], "--height must be a positive multiple of 8, got 0"),
        (["--sample_n_frames=0"], "--sample_n_frames must be at least 1, got 0"),
        (["--gradient_accumulation_steps=0"], "--gradient_accumulation_steps must be at least 1, got 0"),
        (["--per_gpu_batch_size=0"], "--per_gpu_batch_size must be at least 1, got 0"),
        (["--checkpointing_steps=0"], "--checkpointing_steps must be at least 1, got 0"),
        (["--validation_steps=-5"], "--validation_steps must be at least 1, got -5"),
        (["--checkpoints_total_limit=0"], "--checkpoints_total_limit must be at least 1, got 0"),
        (["--decode_chunk_size=0"], "--decode_chunk_size must be at least 1, got 0"),
        (
            ["--conditioning_dropout_prob=1.5"],
            "--conditioning_dropout_prob is a probability: it must be in [0, 1]",
        ),
        (
            ["--max_bad_sample_fraction=-0.1"],
            "--max_bad_sample_fraction is a probability: it must be in [0, 1]",
        ),
        (["--learning_rate=0"], "--learning_rate must be greater than 0, got 0.0"),
        (["--learning_rate=nan"], "--learning_rate must be a finite number, got nan"),
        (["--trainable=lora", "--rank=0"], "--trainable=lora needs --rank of at least 1, got 0"),
        (["--validation_image=/r.png"], "missing --validation_image_folder, --validation_control_folder"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["--num_validation_images=-1"], "--num_validation_images must be 0 or more, got -1"),
        (["--video_cache_mb=-5"], "--video_cache_mb must be 0 or more, got -5"),
        (
            ["--stochastic_rounding"],
            "--stochastic_rounding rounds updates into bf16 weights: give --weights_dtype",
        ),
        (
            ["--weights_dtype=bf16"],
            "--weights_dtype=bf16 computes in bf16: give --mixed_precision=bf16, not no",
        ),
        (["--weights_dtype=bf16", "--mixed_precision=bf16", "--use_8bit_adam"], "drop one of the two"),
        (["--weights_dtype=fp16"], "--weights_dtype: invalid choice: 'fp16'"),
    ],
)
def test_each_problem_is_one_line_and_exit_2(paths, capsys, flags, expected):
    assert expected in refused(capsys, minimal(paths, *flags))


def test_zero_validation_images_is_accepted(paths):  # 0: the trainer validates nothing
    assert parse_options(minimal(paths, "--num_validation_images=0")).num_validation_images == 0


def test_missing_data_list_is_refused(capsys):
    assert "--meta_info_path is required" in refused(capsys, ["--width=64", "--height=96"])


def test_several_value_problems_share_the_one_line(paths, capsys):
    line = refused(capsys, minimal(paths, "--width=7", "--learning_rate=-1"))
    assert "--width must be" in line and "; --learning_rate must be" in line


def test_train_stage_warns_in_one_line_and_parses(paths, capsys):
    options = parse_options(minimal(paths, "--train_stage=2"))
    assert options.train_stage == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("cnx train: warning: --train_stage is ignored") and "--trainable" in line


def test_flags_checked_elsewhere_or_ignored_are_accepted(paths, capsys):
    options = parse_options(
        minimal(paths, "--use_8bit_adam", "--local_rank=3", "--push_to_hub", "--hub_model_id=me/m")
    )
    assert options.use_8bit_adam and options.local_rank == 3 and options.push_to_hub
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("rounding", [[], ["--stochastic_rounding"]])
def test_bf16_weights_parse_with_bf16_mixed_precision(paths, rounding):
    options = parse_options(minimal(paths, "--weights_dtype=bf16", "--mixed_precision=bf16", *rounding))
    assert options.weights_dtype == "bf16" and options.stochastic_rounding == bool(rounding)
    assert parse_options(options.as_argv()) == options


def test_prefixes_of_flags_are_not_guessed(paths, capsys):
    assert "unknown flag --learning; did you mean --learning_rate?" in refused(
        capsys, minimal(paths, "--learning=1")
    )


def test_importing_options_imports_nothing_heavy():
    code = (
        "import sys, cnx.options; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
