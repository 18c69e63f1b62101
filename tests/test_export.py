"""What `cnx train` wrote, read back: `cnx export` and the sampler give the run's own final/ (plain, LoRA,
controlnext-only, DeepSpeed); bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnx import export
from cnx.options import TrainingOptions
from cnx.profiles import DATA_SAMPLES

META = DATA_SAMPLES / "meta_info.json"
SMALL = ["--width=64", "--height=96", "--sample_n_frames=4", "--interval_frame=3", "--num_workers=0"]
STEPS = ["--max_train_steps=2", "--checkpointing_steps=2"]  # checkpoint-2 and final/ hold the same step
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def train_argv(tiny_svd_dir, output_dir, *extra):
    base = [f"--pretrained_model_name_or_path={tiny_svd_dir}", f"--output_dir={output_dir}"]
    return [*base, f"--meta_info_path={META}", *SMALL, *STEPS, *extra]


def run(*argv, env=ENV):
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def cnx_export(*argv):
    return run(sys.executable, "-m", "cnx.cli", "export", *map(str, argv))


def files_of(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def assert_same_export(final: Path, exported: Path, exact: bool = True) -> None:
    """Same folders and files; configs equal; every tensor equal (or close, for fp32 round trips)."""
    assert files_of(exported) == files_of(final)
    for name in files_of(final):
        if name.endswith(".json"):
            assert json.loads((exported / name).read_text()) == json.loads((final / name).read_text()), name
            continue
        want, got = load_file(final / name), load_file(exported / name)
        assert got.keys() == want.keys(), name
        for key, tensor in want.items():
            if exact:
                assert torch.equal(got[key], tensor), f"{name}: {key}"
            else:
                torch.testing.assert_close(got[key], tensor, msg=f"{name}: {key}")


# What each --trainable run trains, and the folders its final/ export holds.
RUNS = {
    "full": (["--use_ema"], {"controlnext", "unet", "controlnext_ema", "unet_ema"}),
    "lora": (["--use_ema", "--rank=4"], {"controlnext", "unet", "unet_lora", "unet_lora_ema"}),
    "controlnext": ([], {"controlnext"}),  # without EMA the LR schedule is custom object 0
}


@pytest.fixture(scope="module", params=list(RUNS))
def trained(request, tiny_svd_dir, tmp_path_factory):
    """(mode, output_dir) of a real 2-step `cnx train` run: checkpoint-2 and final/ hold the same step."""
    mode = request.param
    output_dir = tmp_path_factory.mktemp(f"run-{mode}")
    argv = train_argv(tiny_svd_dir, output_dir, f"--trainable={mode}", *RUNS[mode][0])
    result = run(sys.executable, "-m", "cnx.train", *argv)
    assert result.returncode == 0, result.stderr[-2000:]
    return mode, output_dir


def test_an_exported_checkpoint_equals_the_final_export_of_its_run(trained, tmp_path):
    mode, output_dir = trained
    final = output_dir / "final"
    assert {p.name for p in final.iterdir()} >= RUNS[mode][1]
    out = tmp_path / "exported"
    (out / "unet_lora_ema").mkdir(parents=True)  # a stale export folder, and a file of the user's
    (out / "unet_lora_ema" / "stale.safetensors").write_text("old")
    (out / "notes.txt").write_text("mine")

    result = cnx_export(output_dir / "checkpoint-2", out, "--overwrite")

    assert result.returncode == 0, result.stderr[-2000:]
    (out / "notes.txt").unlink()  # left alone; the stale folder was replaced or removed
    assert_same_export(final, out)
    assert all(str(out / name) in result.stdout for name in {p.name for p in final.iterdir()})
    assert "step 2" in result.stdout.splitlines()[0]


# ---------------------------------------------------------------------------------------------
# Sampling reads what training wrote: a checkpoint, the output_dir, final/


def sampler_state(tiny_svd_dir, path, ema: bool = False) -> dict:
    """Every weight of the pipeline `cnx generate --controlnext PATH` samples with."""
    from cnx.sampler import find_trained_weights, load_pipeline

    pipe = load_pipeline(str(tiny_svd_dir), find_trained_weights(path, ema), device="cpu")
    return {
        f"{name}.{k}": v
        for name in ("controlnext", "unet")
        for k, v in getattr(pipe, name).state_dict().items()
    }


def assert_same_state(got: dict, want: dict, exact: bool = True) -> None:
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        if exact:
            assert torch.equal(got[key], tensor), key
        else:
            torch.testing.assert_close(got[key], tensor, msg=key)


def test_a_checkpoint_and_its_output_dir_sample_with_the_weights_of_final(trained, tiny_svd_dir, tmp_path):
    mode, output_dir = trained
    final = sampler_state(tiny_svd_dir, output_dir / "final")
    pretrained = sampler_state(tiny_svd_dir, output_dir / "final" / "controlnext")  # the SVD's own UNet
    assert_same_state(sampler_state(tiny_svd_dir, output_dir / "checkpoint-2"), final)
    # The output_dir's latest complete checkpoint; an unfinished save (no trainer_state.json) is passed over.
    shutil.copytree(output_dir / "checkpoint-2", tmp_path / "run" / "checkpoint-2")
    shutil.copytree(output_dir / "checkpoint-2", tmp_path / "run" / "checkpoint-4", ignore=ignore_state)
    assert_same_state(sampler_state(tiny_svd_dir, tmp_path / "run"), final)
    unet_trained = any(not torch.equal(final[k], pretrained[k]) for k in final if k.startswith("unet."))
    assert unet_trained == (mode != "controlnext")  # full and LoRA runs sample with their trained UNet
    if "--use_ema" in RUNS[mode][0]:
        ema = sampler_state(tiny_svd_dir, output_dir / "final", ema=True)
        assert_same_state(sampler_state(tiny_svd_dir, output_dir / "checkpoint-2", ema=True), ema)
        assert any(not torch.equal(ema[k], final[k]) for k in final)


def ignore_state(folder, names):
    return ["trainer_state.json"] if "trainer_state.json" in names else []


@pytest.mark.parametrize("trained", ["full"], indirect=True)  # the weights of every mode are compared above
def test_validate_reads_an_output_dir_and_a_checkpoint_that_cnx_train_wrote(trained, tiny_svd_dir, tmp_path):
    from cnx.cli import main

    output_dir = trained[1]
    validation = DATA_SAMPLES / "validation"
    metrics = []
    for controlnext in (output_dir, output_dir / "checkpoint-2", output_dir / "final"):
        out = tmp_path / controlnext.name
        argv = ["validate", f"--pretrained_model_name_or_path={tiny_svd_dir}", f"--controlnext={controlnext}"]
        argv += [f"--validation_dir={validation}", f"--output_dir={out}", "--height=96", "--width=64"]
        assert main([*argv, "--num_inference_steps=2", "--max_frames=4"]) == 0
        metrics.append(json.loads((out / "metrics.json").read_text())["metrics"])
    assert metrics[0] == metrics[1] == metrics[2]  # the same weights, the same seed: the same video


def test_a_deepspeed_zero2_checkpoint_exports_its_fp32_weights(deepspeed_run, tiny_svd_dir, tmp_path):
    """The ZeRO-2 run of two CPU processes (tests/conftest.py) that test_distributed resumes."""
    run_dir = deepspeed_run[0]
    checkpoint = run_dir / "checkpoint-4"  # the last step: final/ holds the same weights
    assert (checkpoint / "pytorch_model").is_dir() and not (checkpoint / "model.safetensors").exists()
    out = tmp_path / "exported"

    result = run(sys.executable, "-m", "cnx.export", str(checkpoint), str(out))

    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_export(run_dir / "final", out, exact=False)
    assert {p.name for p in out.iterdir()} == {"controlnext", "unet", "controlnext_ema", "unet_ema"}
    for ema in (False, True):  # the sampler reads the shards too
        final = sampler_state(tiny_svd_dir, run_dir / "final", ema)
        assert_same_state(sampler_state(tiny_svd_dir, checkpoint, ema), final, exact=False)


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, before any model is built


def fake_checkpoint(folder: Path, weights: bool = True, **options) -> Path:
    folder.mkdir(parents=True)
    TrainingOptions(**options).to_json(folder / "training_options.json")
    (folder / "trainer_state.json").write_text('{"step": 2}')
    if weights:
        (folder / "model.safetensors").write_bytes(b"")  # only its presence is checked up front
    return folder


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "no such checkpoint folder"),
        (
            "run folder",
            "not a cnx checkpoint (no trainer_state.json or training_options.json); a run folder? ",
        ),
        ("no weights", "no weights inside (expected model.safetensors or pytorch_model.bin"),
        ("no ema state", "the run used --use_ema but its EMA state custom_checkpoint_0.pkl is missing"),
        ("bad options", "unknown options learning_rat"),
        ("moved model", "moved-svd: the run's model folder does not exist (moved? pass --pretrained_model"),
        ("out not empty", "exists and is not empty (pass --overwrite to write into it)"),
    ],
)
def test_bad_input_is_refused_in_one_line(tmp_path, capsys, case, expected):
    from cnx.cli import main

    checkpoint = tmp_path / "run" / "checkpoint-2"
    out = tmp_path / "out"
    if case == "run folder":
        fake_checkpoint(checkpoint)
        checkpoint = checkpoint.parent
    elif case == "no weights":
        fake_checkpoint(checkpoint, weights=False)
    elif case == "no ema state":
        fake_checkpoint(checkpoint, use_ema=True)
    elif case == "bad options":
        fake_checkpoint(checkpoint)
        (checkpoint / "training_options.json").write_text('{"learning_rat": 1e-5}')
    elif case == "moved model":
        fake_checkpoint(checkpoint, pretrained_model_name_or_path=str(tmp_path / "moved-svd"))
    elif case == "out not empty":
        fake_checkpoint(checkpoint)
        out.mkdir()
        (out / "keep.txt").write_text("")

    assert main(["export", str(checkpoint), str(out)]) == 2

    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.err.startswith("cnx export: ") and expected in captured.err
    assert case == "out not empty" or not out.exists()
    assert export.main([str(checkpoint), str(out)]) == 2  # `python -m cnx.export` says the same
    assert capsys.readouterr().err == captured.err
