"""The step, what trains, data order, checkpoints; real runs of `python -m cnx.train`."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cnx import runs, train
from cnx.attention import bypassed_modules
from cnx.data import ClipDataset
from cnx.options import parse_options
from cnx.profiles import DATA_SAMPLES
from cnx.step import Objective, build_models, step_generator, training_step
from cnx.trainable import (
    build_lr_scheduler,
    build_optimizer,
    merged_unet,
    parameter_groups,
    select_trainable,
)

META = DATA_SAMPLES / "meta_info.json"
SMALL = ["--width=64", "--height=96", "--sample_n_frames=4", "--interval_frame=3", "--num_workers=0"]


def options_for(tiny_svd_dir, output_dir, *extra):
    base = [
        f"--pretrained_model_name_or_path={tiny_svd_dir}",
        f"--output_dir={output_dir}",
        f"--meta_info_path={META}",
    ]
    return [*base, *SMALL, *extra]


@pytest.fixture(scope="module")
def setup(tiny_svd_dir, tmp_path_factory):
    options = parse_options(options_for(tiny_svd_dir, tmp_path_factory.mktemp("run")))
    models, _ = build_models(options, torch.device("cpu"), torch.float32)
    dataset = ClipDataset(META, 64, 96, 4, 3)
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    return options, models, batch


# ---------------------------------------------------------------------------------------------
# The step and what trains


def test_pitfall_10_training_step_is_a_function_of_its_generator_and_reaches_every_trainable_weight(setup):
    options, models, batch = setup
    objective = Objective.from_options(options)
    trainable = select_trainable(models.model, "full")
    first = training_step(models, batch, objective, step_generator(0, 0, 5, 0))
    again = training_step(models, batch, objective, step_generator(0, 0, 5, 0))
    other_rank = training_step(models, batch, objective, step_generator(0, 1, 5, 0))
    assert first.loss.dtype == torch.float32 and first.per_sample.shape == (2,) and first.sigma.shape == (2,)
    assert torch.equal(first.loss, again.loss) and torch.equal(first.sigma, again.sigma)
    assert not torch.equal(first.sigma, other_rank.sigma)  # pitfall 10: ranks draw their own streams
    models.model.zero_grad(set_to_none=True)
    first.loss.backward()
    assert all(p.grad is not None for p in trainable)
    assert not any(p.requires_grad for m in (models.vae, models.image_encoder) for p in m.parameters())


@pytest.mark.parametrize("mode", ["full", "selective", "controlnext", "lora"])
def test_trainable_sets(setup, mode):
    import copy

    model = copy.deepcopy(setup[1].model)
    trainable = {id(p) for p in select_trainable(model, mode, rank=4)}
    unet = {name: p for name, p in model.unet.named_parameters()}
    assert all(id(p) in trainable for p in model.controlnext.parameters())
    trained_unet = {name for name, p in unet.items() if id(p) in trainable}
    if mode == "full":  # all but what the single-token cross-attention never reads (on by default)
        unread = {f"{name}.{p}" for name, m in bypassed_modules(model.unet) for p, _ in m.named_parameters()}
        assert unread and trained_unet == set(unet) - unread
    elif mode == "controlnext":
        assert not trained_unet
    elif mode == "selective":
        assert trained_unet and all(".to_out." in n or ".to_v." in n for n in trained_unet)
    else:
        assert trained_unet and all("lora_" in n for n in trained_unet)


def test_pitfall_9_two_parameter_groups_without_decay_on_norms_and_biases(setup):
    model = setup[1].model
    select_trainable(model, "full")
    decay, no_decay = parameter_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # not the frozen norm2s
    biases = {id(p) for n, p in named if n.endswith("bias") or ".norm" in n}
    assert biases <= {id(p) for p in no_decay["params"]}


def test_the_fused_cpu_optimizer_steps_as_the_plain_one_does(setup):
    options = setup[0]
    weights = [torch.randn(64, 32), torch.randn(32)]
    grads = [torch.randn_like(w) for w in weights]
    stepped = []
    for optimizer_of in (
        lambda groups: build_optimizer(groups, options, "cpu"),
        lambda groups: torch.optim.AdamW(groups, lr=options.learning_rate, fused=False),
    ):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = optimizer_of([{"params": params[:1], "weight_decay": 0.01}, {"params": params[1:]}])
        for _ in range(3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        stepped.append((optimizer, params))
    (fused, fused_params), (_, plain_params) = stepped
    assert fused.defaults["fused"] is True
    for a, b in zip(fused_params, plain_params, strict=True):
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, weights[0] if a.ndim == 2 else weights[1])  # it did step


def test_the_fused_optimizer_is_chosen_on_cuda_and_torchs_own_when_off(setup):
    options = setup[0]
    params = [torch.nn.Parameter(torch.zeros(2, 2))]  # CPU tensors: the trainer builds it before prepare()
    assert build_optimizer([{"params": params}], options, "cuda").defaults["fused"] is True
    assert build_optimizer([{"params": params}], options, torch.device("cuda", 0)).defaults["fused"] is True
    off = dataclasses.replace(options, fused_adamw=False)
    assert build_optimizer([{"params": params}], off, "cuda").defaults["fused"] is None  # foreach on CUDA
    assert build_optimizer([{"params": params}], options, "mps").defaults["fused"] is None


def test_pitfall_7_warm_up_works_with_the_constant_schedule(setup):
    options = parse_options(options_for("x", "y", "--lr_warmup_steps=4", "--learning_rate=1e-3"))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = build_lr_scheduler(optimizer, options, total_steps=10)
    rates = []
    for _ in range(6):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_pitfall_7_steps_per_epoch_are_counted_after_sharding():
    assert train.batches_per_epoch(8, world=1, batch_size=1) == 8
    assert train.batches_per_epoch(8, world=2, batch_size=1) == 4  # each rank reads half
    assert train.batches_per_epoch(9, world=2, batch_size=2) == 2
    with pytest.raises(SystemExit, match="fewer than one batch"):
        train.batches_per_epoch(3, world=2, batch_size=2)


def test_pitfall_8_gradients_are_clipped_at_max_grad_norm_once_per_optimizer_step(setup, monkeypatch):
    from accelerate import Accelerator

    options, models, batch = setup
    options = parse_options(options_for("x", "y", "--max_grad_norm=0.5", "--gradient_accumulation_steps=2"))
    trainable = select_trainable(models.model, "controlnext")
    accelerator = Accelerator(gradient_accumulation_steps=2)
    optimizer = accelerator.prepare(torch.optim.AdamW(trainable, lr=1e-5))
    calls = []
    clip = accelerator.clip_grad_norm_
    monkeypatch.setattr(
        accelerator, "clip_grad_norm_", lambda params, norm: calls.append(norm) or clip(params, norm)
    )
    data = iter([(0, 1, batch), (0, 2, batch)])
    epoch, position, loss, sigma, grad_norm = train.optimizer_step(
        accelerator, models, data, options, optimizer, trainable, step=0
    )
    assert calls == [0.5] and grad_norm is not None and position == 2 and sigma.shape == (4,)


def test_epoch_order_is_seeded_sharded_and_new_each_epoch():
    ranks = [train.epoch_indices(10, seed=0, epoch=0, world=2, rank=r, batch_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4 and not set(ranks[0]) & set(ranks[1])
    assert ranks[0] == train.epoch_indices(10, 0, 0, 2, 0, 2)  # the same on every call
    assert ranks[0] != train.epoch_indices(10, 0, 1, 2, 0, 2)  # a new order each epoch
    assert ranks[0] != train.epoch_indices(10, 1, 0, 2, 0, 2)  # and for another --seed


def test_pitfall_3_checkpoint_lookup_ignores_other_names_and_takes_any_path(tmp_path):
    for name in (
        "checkpoint-2",
        "checkpoint-10",
        "checkpoint-last",
        ".partial-checkpoint-12",
        "checkpoint-11",
    ):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-last"):
        (tmp_path / name / "trainer_state.json").write_text("{}")
    # checkpoint-11 has no trainer_state.json: a save that did not finish.
    assert [p.name for p in runs.complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert runs.resolve_resume("latest", tmp_path).name == "checkpoint-10"
    assert runs.resolve_resume("latest", tmp_path / "empty") is None  # nothing yet: a fresh start
    elsewhere = tmp_path / "elsewhere" / "any-name"
    elsewhere.mkdir(parents=True)
    (elsewhere / "trainer_state.json").write_text("{}")
    assert runs.resolve_resume(str(elsewhere), tmp_path) == elsewhere
    with pytest.raises(runs.RunLayoutError, match="not a complete cnx checkpoint"):
        runs.resolve_resume(str(tmp_path / "checkpoint-11"), tmp_path)
    runs.rotate(tmp_path, limit=1, keep=tmp_path / "checkpoint-2")  # never the checkpoint resumed from
    assert [p.name for p in runs.complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    runs.rotate(tmp_path, limit=1, keep=None)
    assert [p.name for p in runs.complete_checkpoints(tmp_path)] == ["checkpoint-10"]


# ---------------------------------------------------------------------------------------------
# Real runs: `python -m cnx.train` in a subprocess


def run(tiny_svd_dir, output_dir, *extra, wait=True, env=None):
    argv = [sys.executable, "-m", "cnx.train", *options_for(tiny_svd_dir, output_dir, *extra)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def losses(output_dir):
    lines = (output_dir / "logs" / "steps.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def test_a_run_killed_at_any_moment_resumes_with_the_losses_of_an_uninterrupted_run(tiny_svd_dir, tmp_path):
    """SIGKILL after the step-2 checkpoint; `--resume_from_checkpoint latest` redoes steps 3-4 exactly."""
    common = ["--max_train_steps=4", "--checkpointing_steps=2", "--lr_warmup_steps=2", "--use_ema"]
    straight = tmp_path / "straight"
    result = run(tiny_svd_dir, straight, *common)
    assert result.returncode == 0, result.stderr[-2000:]
    crashed = tmp_path / "crashed"
    process = run(tiny_svd_dir, crashed, *common, "--checkpointing_steps=1", wait=False)
    deadline = time.time() + 300
    while not (crashed / "checkpoint-2" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its step-2 checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = run(tiny_svd_dir, crashed, *common, "--resume_from_checkpoint=latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert losses(crashed) == losses(straight) and sorted(losses(straight)) == [1, 2, 3, 4]
    from safetensors.torch import load_file

    def final(run, name):
        return load_file(run / "final" / name / "diffusion_pytorch_model.safetensors")

    for name in ("controlnext", "unet", "controlnext_ema", "unet_ema"):  # pitfall 6: EMA saved and restored
        a, b = final(straight, name), final(crashed, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema, plain = final(straight, "controlnext_ema"), final(straight, "controlnext")
    assert any(not torch.equal(ema[k], plain[k]) for k in ema)


def test_an_exploding_run_stops_with_a_clear_message_and_its_checkpoints_intact(tiny_svd_dir, tmp_path):
    result = run(
        tiny_svd_dir, tmp_path, "--max_train_steps=8", "--checkpointing_steps=1", "--learning_rate=1e8"
    )
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("cnx train: non-finite") and "sigma" in message and "dancer_" in message
    saved = runs.complete_checkpoints(tmp_path)
    assert saved, "the steps before the explosion were checkpointed"
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(saved[0] / "model.safetensors").values())
    assert not list(tmp_path.glob(".partial-*"))


def test_the_original_readme_command_trains_validates_checkpoints_and_exports(tiny_svd_dir, tmp_path):
    """The original README's flags as written (paths filled in; only sizes and length scaled down for CI)."""
    validation = DATA_SAMPLES / "validation"
    readme = [
        f"--validation_image_folder={validation / 'ground_truth'}",
        f"--validation_control_folder={validation / 'pose'}",
        f"--validation_image={validation / 'reference_image.png'}",
        "--dataset_type=ubc",
        "--lr_warmup_steps",
        "500",
        "--learning_rate=1e-5",
        "--per_gpu_batch_size=1",
        "--num_train_epochs=6000",
        "--mixed_precision=bf16",
        "--gradient_accumulation_steps=1",
        "--checkpointing_steps=2000",
        "--validation_steps=500",
        "--gradient_checkpointing",
        "--checkpoints_total_limit",
        "4",
        "--max_train_steps=2",  # the README trains "until you stop it"; CI stops after 2 steps
    ]
    result = run(tiny_svd_dir, tmp_path, *readme)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in runs.complete_checkpoints(tmp_path)] == ["checkpoint-2"]  # the last step is saved
    record = json.loads((tmp_path / "logs" / "validation.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and {"psnr", "ssim", "temporal_error"} <= set(record)
    assert (tmp_path / "validation" / "step-000002" / "video-0" / "grid.png").is_file()
    assert list((tmp_path / "logs" / "cnx").glob("events.out.tfevents.*"))  # TensorBoard
    from safetensors.torch import load_file

    # Pitfall 11: trained weights stay fp32.
    weights = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    options = json.loads((tmp_path / "checkpoint-2" / "training_options.json").read_text())
    assert options["mixed_precision"] == "bf16" and options["num_train_epochs"] == 6000
    assert options["gradient_checkpointing"] and options["checkpointing"] == "blocks"  # cnx's default
    assert (tmp_path / "final" / "controlnext" / "config.json").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--push_to_hub", "--hub_model_id=me/cnx"],
            "--push_to_hub needs the network, but HF_HUB_OFFLINE is set",
        ),
    ],
)
def test_what_this_machine_cannot_do_is_refused_before_any_model_loads(tmp_path, flags, message):
    # The model path would fail later: the check comes first.
    result = run("/nonexistent/svd", tmp_path, *flags)
    assert result.returncode != 0 and message in result.stderr.strip().splitlines()[-1]


def test_lora_export_merges_the_adapters_into_a_plain_unet(setup):
    import copy

    model = copy.deepcopy(setup[1].model)
    select_trainable(model, "lora", rank=4)
    with torch.no_grad():
        for name, parameter in model.unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give the adapters something to merge
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    merged = merged_unet(model.unet)
    assert not any("lora" in name for name in merged.state_dict())
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 2, 8, 12, 8, generator=g)
    embeddings = torch.randn(1, 1, model.unet.config.cross_attention_dim, generator=g)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]])
    with torch.no_grad():
        adapted = model.unet(sample, 0.5, embeddings, time_ids).sample
        plain = merged(sample, 0.5, embeddings, time_ids).sample
        base = setup[1].model.unet(sample, 0.5, embeddings, time_ids).sample
    torch.testing.assert_close(plain, adapted, atol=1e-5, rtol=1e-4)
    assert (adapted - base).abs().max() > 1e-4  # the adapters did change the UNet


def test_a_resumed_run_drops_log_lines_past_its_checkpoint_and_a_line_cut_by_a_crash(tmp_path):
    log = tmp_path / "steps.jsonl"
    log.write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 2}\n{"step": 3, "loss": 3}\n{"step": 4, "lo')
    runs.truncate_log(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--meta_info_path=/nonexistent/meta_info.json"],
            "/nonexistent/meta_info.json: meta_info json does not exist",
        ),
        (
            ["--pretrained_model_name_or_path=/nonexistent/svd"],
            "/nonexistent/svd: cannot load the SVD pipeline's parts",
        ),
        (
            [
                f"--validation_image_folder={DATA_SAMPLES}",
                f"--validation_image={DATA_SAMPLES / 'validation' / 'reference_image.png'}",
                f"--validation_control_folder={DATA_SAMPLES / 'validation' / 'pose'}",
            ],
            "ground-truth images but",
        ),
    ],
)
def test_bad_input_stops_the_run_in_clear_lines_before_training(tiny_svd_dir, tmp_path, flags, message):
    result = run(tiny_svd_dir, tmp_path, "--max_train_steps=1", *flags)
    assert result.returncode == 2 and "cnx train: " in result.stderr and message in result.stderr, (
        result.stderr[-800:]
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "checkpoint-1").exists()


# ---------------------------------------------------------------------------------------------
# Guards: a save that fails half-way, the EMA's place in the step


class FailingSaveAccelerator:
    """One process whose `save_state` writes part of a checkpoint, then fails (a full disk, a kill)."""

    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "model.safetensors"), "wb") as file:
            file.write(b"half a checkpoint")
        raise OSError("No space left on device")


def test_a_save_that_fails_half_way_leaves_no_checkpoint_and_keeps_the_old_one(tmp_path):
    options = parse_options(options_for("x", tmp_path))
    with pytest.raises(OSError, match="No space"):
        train.save_checkpoint(FailingSaveAccelerator(), tmp_path, 3, {"step": 3}, options)
    assert not runs.checkpoint_dir(tmp_path, 3).exists() and runs.latest_checkpoint(tmp_path) is None
    # A complete checkpoint-3 already there (a resumed run saving the same step again) stays as it was.
    existing = runs.checkpoint_dir(tmp_path, 3)
    existing.mkdir()
    (existing / "model.safetensors").write_bytes(b"the complete weights")
    runs.write_state(existing, {"step": 3, "batches": 3, "epoch": 0})
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    with pytest.raises(OSError, match="No space"):
        train.save_checkpoint(FailingSaveAccelerator(), tmp_path, 3, {"step": 3}, options)
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    assert runs.latest_checkpoint(tmp_path) == existing


def test_the_ema_is_updated_after_the_optimizer_step(tiny_svd_dir, tmp_path):
    """diffusers' first EMA update has decay 0: after one step the EMA is the trained weights.

    An EMA updated before the optimizer step would copy the initial weights instead. The update
    computes ema - (ema - weight), so "is" means to float rounding (1e-12 seen), far below one
    step's change: 1e-4 (the learning rate) in the UNet, 2e-7 in the ControlNeXt (its gradient
    at this first step is zero here: weight decay alone moves it).
    """
    from safetensors.torch import load_file

    steps = ["--max_train_steps=1", "--lr_warmup_steps=0", "--learning_rate=1e-4"]  # warm-up's first lr is 0
    steps += ["--report_to=none", "--log_trainable_parameters"]
    result = run(tiny_svd_dir, tmp_path, "--use_ema", *steps)
    assert result.returncode == 0, result.stderr[-2000:]

    def final(name):
        return load_file(tmp_path / "final" / name / "diffusion_pytorch_model.safetensors")

    options = parse_options(options_for(tiny_svd_dir, tmp_path / "initial"))
    initial_model = build_models(options, torch.device("cpu"), torch.float32)[0].model
    initial = {
        "controlnext": initial_model.controlnext.state_dict(),
        "unet": load_file(tiny_svd_dir / "unet" / "diffusion_pytorch_model.safetensors"),
    }

    def farthest(a, b):
        assert a.keys() == b.keys()
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    # --log_trainable_parameters: the name and shape of every trained tensor, in the run's logs.
    logged = (tmp_path / "logs" / "trainable_parameters.txt").read_text().splitlines()
    select_trainable(initial_model, options.trainable)  # full: all but the cross-attention's unread ones
    names = [name for name, p in initial_model.named_parameters() if p.requires_grad]
    assert [line.split("\t")[0] for line in logged] == names
    assert "trainable parameters (full)" in result.stdout

    for name in ("controlnext", "unet"):
        trained = final(name)
        assert farthest(final(f"{name}_ema"), trained) < 1e-9, f"{name}: the EMA is not the trained weights"
        assert farthest(trained, initial[name]) > 1e-7, f"{name} did not train: the check could not fail"


def test_bf16_training_steps_without_amx_are_finite_and_repeat(tiny_svd_dir, tmp_path):
    """oneDNN's bf16 Conv3d weight gradient without AMX gave NaN or run-to-run garbage in the UNet's
    temporal resnets at small latents (`cnx.cpu_kernels`); the trainer computes them as Conv2d there.

    `ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16` holds an AMX CPU to the kernels of one without AMX.
    """
    from safetensors.torch import load_file

    small = ["--width=64", "--height=64", "--sample_n_frames=2", "--mixed_precision=bf16", "--report_to=none"]
    isa = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}  # one thread (run's default): the kernel fails there too
    runs_ = [tmp_path / "a", tmp_path / "b"]
    for output_dir in runs_:
        result = run(tiny_svd_dir, output_dir, *small, "--max_train_steps=2", env=isa)
        assert result.returncode == 0, result.stderr[-2000:]
    assert losses(runs_[0]) == losses(runs_[1]) and len(losses(runs_[0])) == 2
    a, b = (load_file(r / "final" / "unet" / "diffusion_pytorch_model.safetensors") for r in runs_)
    assert all(torch.isfinite(a[k]).all() and torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Lighter weights and optimizer states


def test_8bit_adam_refuses_in_one_line_a_missing_bitsandbytes_or_a_device_it_cannot_step_on(monkeypatch):
    import bitsandbytes as bnb

    from cnx.trainable import check_8bit_adam

    check_8bit_adam("cpu")  # it steps here
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
        with pytest.raises(
            SystemExit, match=r"^cnx train: --use_8bit_adam needs bitsandbytes, which does not"
        ):
            check_8bit_adam("cpu")

    def unsupported(self, closure=None):
        raise NotImplementedError("no kernel for this device\nsecond line")

    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", unsupported)
    with pytest.raises(SystemExit) as refused:
        check_8bit_adam("cpu")
    assert str(refused.value) == (
        f"cnx train: --use_8bit_adam: bitsandbytes {bnb.__version__} cannot step its 8-bit AdamW on cpu "
        "(no kernel for this device); it runs on CUDA or ROCm GPUs, Intel XPUs and CPUs"
    )


def test_bf16_weights_under_deepspeed_are_refused_before_any_model_loads(tmp_path):
    deepspeed = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}  # as launched
    result = run(
        "/nonexistent/svd", tmp_path, "--weights_dtype=bf16", "--mixed_precision=bf16", env=deepspeed
    )
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last.startswith(
        "cnx train: --weights_dtype=bf16 is for runs without DeepSpeed"
    )


@pytest.mark.parametrize(
    "flags",
    [
        ["--weights_dtype=bf16", "--mixed_precision=bf16", "--stochastic_rounding"],
        ["--use_8bit_adam"],
    ],
    ids=["bf16-stochastic-rounding", "8bit-adam"],  # bf16 with a master: tests/test_bf16_adamw.py
)
def test_lighter_states_train_and_resume_exactly(tiny_svd_dir, tmp_path, flags):
    """3 steps straight, and resumed from the step-2 checkpoint: the same step-3 loss and weights.

    The weights are stored in their dtype, the optimizer's float32 state (bf16 weights' moments
    and master) and the EMA stay float32 through save and load.
    """
    from safetensors.torch import load_file

    common = [*flags, "--max_train_steps=3", "--checkpointing_steps=2", "--use_ema", "--report_to=none"]
    common += ["--learning_rate=1e-4", "--lr_warmup_steps=0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run(tiny_svd_dir, straight, *common)
    assert result.returncode == 0, result.stderr[-2000:]
    again = run(tiny_svd_dir, resumed, *common, f"--resume_from_checkpoint={straight / 'checkpoint-2'}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(losses(straight)) == [1, 2, 3] and all(map(math.isfinite, losses(straight).values()))
    assert losses(resumed) == {3: losses(straight)[3]}

    bf16 = "--weights_dtype=bf16" in flags
    weights = load_file(straight / "checkpoint-3" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16 if bf16 else torch.float32}
    optimizer = torch.load(straight / "checkpoint-3" / "optimizer.bin", weights_only=True)

    def dtypes(state) -> set:  # bitsandbytes nests its quantised state in a dict of its own
        if isinstance(state, dict):
            return set().union(*map(dtypes, state.values()))
        return {state.dtype} if torch.is_tensor(state) else set()

    assert dtypes(optimizer["state"]) == ({torch.float32} if bf16 else {torch.float32, torch.uint8})
    ema = torch.load(straight / "checkpoint-3" / "custom_checkpoint_0.pkl", weights_only=True)
    assert {t.dtype for t in ema["shadow_params"]} == {torch.float32}
    for name in ("controlnext", "unet", "unet_ema"):
        a, b = (
            load_file(r / "final" / name / "diffusion_pytorch_model.safetensors") for r in (straight, resumed)
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
