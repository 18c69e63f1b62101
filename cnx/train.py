"""`cnx train` / `python -m cnx.train`: ControlNeXt on SVD, launchable with `accelerate launch`.

The loop only: one optimizer step's loss is `cnx.step.training_step`, what
trains and how it updates is `cnx.trainable`, where things go in the output
folder is `cnx.runs`. What makes a run safe to stop and resume:
- every random draw of a step comes from a generator seeded by (seed, rank,
  step, micro-batch) through `cnx.seeding`, and the data order by (seed, epoch),
  so a resumed run draws exactly what an uninterrupted one would;
- a checkpoint is written by `accelerator.save_state` on every rank into a
  temporary folder that is renamed when complete; rotation never deletes the
  checkpoint a run resumed from;
- a non-finite loss or gradient norm stops the run before anything is saved,
  naming the step, the sigmas and the samples.
Pitfall numbers refer to docs/pitfalls.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from cnx import edm, runs
from cnx.attention import sdpa_priority
from cnx.seeding import stream_generator
from cnx.step import Objective, build_models, step_generator, training_step
from cnx.trainable import (
    build_lr_scheduler,
    build_optimizer,
    check_8bit_adam,
    export_folders,
    parameter_groups,
    select_trainable,
)

# ---------------------------------------------------------------------------------------------
# Data order


def epoch_indices(
    num_samples: int, seed: int, epoch: int, world: int, rank: int, batch_size: int
) -> list[int]:
    """This rank's sample indices for one epoch: a (seed, epoch) permutation, whole batches per rank.

    Every rank gets the same number of whole batches (the tail that does not fill
    a batch on every rank waits for the next epoch's permutation).
    """
    order = torch.randperm(num_samples, generator=stream_generator("shuffle", seed, epoch)).tolist()
    per_rank = num_samples // (world * batch_size) * batch_size
    return order[rank::world][:per_rank]


def batches_per_epoch(num_samples: int, world: int, batch_size: int) -> int:
    """Whole batches each rank reads per epoch: counted after sharding across `world` ranks (pitfall 7)."""
    per_epoch = num_samples // (world * batch_size)
    if per_epoch == 0:
        raise SystemExit(
            f"cnx train: {num_samples} samples are fewer than one batch of {batch_size} "
            f"on each of {world} processes"
        )
    return per_epoch


def batches(dataset, indices: list[int], batch_size: int, num_workers: int, epoch: int, skip: int):
    """A DataLoader over `indices` from batch `skip` on (a resumed run skips without decoding)."""
    dataset.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=indices[skip * batch_size :],
        num_workers=num_workers,
        persistent_workers=False,
        drop_last=True,
    )


# ---------------------------------------------------------------------------------------------
# Stopping on bad values


def samples_of(batch: dict) -> str:
    return ", ".join(
        f"entry {i} ({p})" for i, p in zip(batch["index"].tolist(), batch["video_path"], strict=True)
    )


def finite_or_stop(value: torch.Tensor, what: str, step: int, sigma: torch.Tensor, batch: dict) -> None:
    """`edm.check_finite_loss`, plus the batch's samples and what to do: stops before anything is saved."""
    try:
        edm.check_finite_loss(value, step, sigma, what)
    except FloatingPointError as err:
        raise FloatingPointError(
            f"{err}; the batch's sigma {[round(float(x), 4) for x in sigma]}, samples {samples_of(batch)}. "
            "The run stopped without saving; its earlier checkpoints "
            "are intact. Lower --learning_rate or check the data."
        ) from None


def loop_batches(
    dataset, options, world: int, rank: int, start_batch: int
) -> Iterator[tuple[int, int, dict]]:
    """(epoch, batches pulled so far, batch) for ever, from batch `start_batch` of the run on.

    A batch whose samples fail is counted and skipped (`cnx.data.FailureBudget`);
    the position counts it too, so a resumed run reads on from the same place.
    """
    from cnx.data import iterate_with_budget

    per_epoch = batches_per_epoch(len(dataset), world, options.per_gpu_batch_size)
    budget = dataset.failure_budget()
    epoch, skip = divmod(start_batch, per_epoch)
    while True:
        indices = epoch_indices(len(dataset), options.seed, epoch, world, rank, options.per_gpu_batch_size)
        loader = batches(dataset, indices, options.per_gpu_batch_size, options.num_workers, epoch, skip)
        for batch in iterate_with_budget(loader, budget, options.per_gpu_batch_size):
            yield epoch, start_batch + budget.seen // options.per_gpu_batch_size, batch
        epoch, skip = epoch + 1, 0


# ---------------------------------------------------------------------------------------------
# The loop


def check_environment(options, accelerator) -> None:
    """Refuse, before any model loads, what this machine or launch cannot do for these options."""
    if options.use_8bit_adam:
        check_8bit_adam(accelerator.device)
    if options.weights_dtype == "bf16" and accelerator.state.deepspeed_plugin is not None:
        raise SystemExit(
            "cnx train: --weights_dtype=bf16 is for runs without DeepSpeed: under --mixed_precision=bf16 "
            "DeepSpeed already holds bf16 weights and a float32 master (partitioned); drop --weights_dtype"
        )
    if options.push_to_hub:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise SystemExit(
                "cnx train: --push_to_hub needs the network, but HF_HUB_OFFLINE is set; unset it, or train "
                "without --push_to_hub and upload output_dir/final later (huggingface-cli upload)"
            )


def push_to_hub(folder: Path, options) -> None:
    """Upload the exported folder to `--hub_model_id`; a clear error (the folder stays) when that fails."""
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=options.hub_token)
        api.create_repo(options.hub_model_id, exist_ok=True)
        api.upload_folder(
            repo_id=options.hub_model_id, folder_path=folder, commit_message="cnx train: final weights"
        )
    except Exception as err:  # offline, no token, no permission: the weights are safe on disk either way
        raise SystemExit(
            f"cnx train: --push_to_hub to {options.hub_model_id} failed ({err}); {folder} is intact"
        ) from err
    print(f"uploaded {folder} to https://huggingface.co/{options.hub_model_id}")


def skip_deepspeed_shared_memory_op() -> None:
    """Keep DeepSpeed on CPUs from compiling its shared-memory all-reduce when its process group starts.

    The compilation takes tens of seconds on a machine that has not built it yet, and only
    DeepSpeed's inference all-reduce uses the op: ZeRO's training collectives go through
    torch.distributed (gloo here) either way. DeepSpeed reads the op's availability from one
    dict, probed on first access and kept, so marking it unavailable there skips the build.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def make_accelerator(options):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not torch.cuda.is_available():
        skip_deepspeed_shared_memory_op()
    # gloo when there is no GPU (otherwise several CPU processes silently train as one); a long
    # timeout so ranks waiting for the main process's validation do not time out.
    group = {"timeout": timedelta(hours=2)} | ({} if torch.cuda.is_available() else {"backend": "gloo"})
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    output_dir = Path(options.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        mixed_precision=options.mixed_precision,
        log_with=None if options.report_to == "none" else options.report_to,
        project_config=ProjectConfiguration(
            project_dir=output_dir, logging_dir=output_dir / options.logging_dir
        ),
        kwargs_handlers=[InitProcessGroupKwargs(**group)] if distributed else None,
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # batches are not handed to accelerate, so DeepSpeed is told their size here
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = options.per_gpu_batch_size
        plugin.deepspeed_config["gradient_accumulation_steps"] = options.gradient_accumulation_steps
        plugin.deepspeed_config["gradient_clipping"] = options.max_grad_norm  # pitfall 8
    return accelerator


def save_checkpoint(accelerator, output_dir: Path, step: int, record: dict, options) -> Path:
    """accelerator.save_state on every rank into a temporary folder, renamed once complete."""
    final, partial = runs.checkpoint_dir(output_dir, step), runs.partial_dir(output_dir, step)
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))  # every rank: DeepSpeed writes its shards from each
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        options.to_json(partial / runs.OPTIONS_FILE)
        runs.write_state(partial, record)  # written last: it marks the checkpoint complete
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    accelerator.wait_for_everyone()
    return final


def optimizer_step(accelerator, models, data, options, optimizer, trainable, step: int):
    """One optimizer step over `gradient_accumulation_steps` micro-batches.

    Returns (epoch, data position, loss averaged over micro-batches and ranks, sigmas (B*A,),
    gradient norm before clipping). DeepSpeed accumulates and steps inside its engine;
    otherwise accelerate's optimizer steps only at the accumulation boundary.
    """
    rank = accelerator.process_index
    losses, sigmas, grad_norm = [], [], None
    objective = Objective.from_options(options)
    for micro in range(options.gradient_accumulation_steps):
        epoch, position, batch = next(data)
        with accelerator.accumulate(models.model):
            generator = step_generator(options.seed, rank, step, micro)
            out = training_step(models, batch, objective, generator)
            finite_or_stop(out.per_sample, "loss", step + 1, out.sigma, batch)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients:  # clipped in every mode (pitfall 8)
                norm = accelerator.clip_grad_norm_(trainable, options.max_grad_norm)
                if norm is not None:
                    finite_or_stop(torch.as_tensor(norm), "gradient norm", step + 1, out.sigma, batch)
                    grad_norm = float(norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
        sigmas.append(out.sigma.detach())
    loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
    return epoch, position, loss, torch.cat(sigmas), grad_norm


def check_resume_matches(options, checkpoint: Path | None) -> None:
    """Refuse, before any model loads, a resume whose checkpoint trained another set of tensors.

    --single_token_cross_attention freezes norm2/to_q/to_k of the cross-attention
    (cnx.attention): the optimizer state of a run without it holds them, one with it does not.
    """
    from cnx.options import TrainingOptions

    if checkpoint is None or not (checkpoint / runs.OPTIONS_FILE).is_file():
        return
    saved = TrainingOptions.from_json(checkpoint / runs.OPTIONS_FILE).single_token_cross_attention
    if saved != options.single_token_cross_attention:
        flag = "--single_token_cross_attention" if saved else "--no_single_token_cross_attention"
        raise SystemExit(
            f"cnx train: {checkpoint} was trained with{'' if saved else 'out'} the single-token "
            f"cross-attention, which decides what trains; resume it with {flag}"
        )


def cpu_kernel_workarounds(unet, device, weight_dtype: torch.dtype):
    """What oneDNN's CPU kernels need under bf16 here (`cnx.cpu_kernels`): without AMX, the UNet's
    temporal Conv3d compute as the same Conv2d (their bf16 weight gradients were NaN or changed
    from run to run); otherwise nothing."""
    from cnx.cpu_kernels import conv3d_weight_grads_need_conv2d, temporal_convs_as_conv2d

    on_cpu_bf16 = torch.device(device).type == "cpu" and weight_dtype == torch.bfloat16
    return temporal_convs_as_conv2d(unet, enabled=on_cpu_bf16 and conv3d_weight_grads_need_conv2d())


def log_trainable_parameters(model, trainable: str, output_dir: Path) -> Path:
    """Write the trained parameters' names and shapes to logs/trainable_parameters.txt; print the count."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    path = output_dir / "logs" / "trainable_parameters.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}\t{tuple(p.shape)}\n" for name, p in named))
    count, total = sum(p.numel() for _, p in named), sum(p.numel() for p in model.parameters())
    print(
        f"trainable parameters ({trainable}): {count:,} of {total:,} in {len(named)} tensors, names in {path}"
    )
    return path


def log_to_tensorboard(accelerator, record: dict, sigma: torch.Tensor) -> None:
    """The step's scalars and a histogram of its sigmas."""
    accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=record["step"])
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    tracker.add_histogram("sigma", sigma.float().cpu(), record["step"])


def train(options) -> Path:
    """Train as `options` say; return the output folder. Each phase below is one comment."""
    from tqdm.auto import tqdm

    from cnx.data import ClipDataset

    accelerator = make_accelerator(options)
    check_environment(options, accelerator)
    world, main = accelerator.num_processes, accelerator.is_main_process
    output_dir = Path(options.output_dir)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    if options.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        options.to_json(output_dir / runs.OPTIONS_FILE)
        if accelerator.state.deepspeed_plugin is not None:  # the configuration DeepSpeed really ran with
            config = accelerator.state.deepspeed_plugin.deepspeed_config
            (output_dir / "logs").mkdir(exist_ok=True)
            (output_dir / "logs" / "deepspeed.json").write_text(
                json.dumps(config, indent=2, default=str) + "\n"
            )

    # Data: checked up front (cnx check-data's cheap checks), never shuffled by the dataset itself.
    # With a latent cache (checked against these options first) the clip's frames are not decoded.
    dataset_args = (options.meta_info_path, options.width, options.height)
    dataset_args += (options.sample_n_frames, options.interval_frame)
    dataset_kwargs = dict(
        seed=options.seed,
        ref_augment=options.ref_augment,
        max_failure_fraction=options.max_bad_sample_fraction,
        video_cache_mb=options.video_cache_mb,
    )
    if options.latent_cache_dir:
        from cnx.latent_cache import CachedClipDataset, describe, open_cache

        cache = open_cache(options)
        dataset = CachedClipDataset(cache, *dataset_args, **dataset_kwargs)
        if main:
            print(describe(cache, options.ref_augment))
    else:
        dataset = ClipDataset(*dataset_args, **dataset_kwargs)
    per_epoch = batches_per_epoch(len(dataset), world, options.per_gpu_batch_size)
    steps_per_epoch = max(1, per_epoch // options.gradient_accumulation_steps)
    total_steps = options.max_train_steps or options.num_train_epochs * steps_per_epoch

    if options.validation_image_folder:  # a broken validation folder fails now, not at the first validation
        from cnx.validation import read_validation_set

        read_validation_set(
            options.validation_image_folder, options.validation_control_folder, options.validation_image
        )

    check_resume_matches(options, runs.resolve_resume(options.resume_from_checkpoint, output_dir))

    # Models, what trains, optimizer and schedule.
    models, scheduler = build_models(options, accelerator.device, weight_dtype)
    kernels = contextlib.ExitStack()  # CPU kernel workarounds and the attention kernel order, until the end
    kernels.enter_context(cpu_kernel_workarounds(models.model.unet, accelerator.device, weight_dtype))
    kernels.enter_context(sdpa_priority(options.sdpa_backend))
    trainable = select_trainable(models.model, options.trainable, options.rank)
    if options.weights_dtype == "bf16":  # trained and frozen alike; the optimizer keeps the precision
        models.model.to(torch.bfloat16)
    if options.log_trainable_parameters and main:
        log_trainable_parameters(models.model, options.trainable, output_dir)
    learning_rate = options.learning_rate
    if options.scale_lr:
        learning_rate *= options.gradient_accumulation_steps * options.per_gpu_batch_size * world
    optimizer = build_optimizer(
        parameter_groups(models.model, options.adam_weight_decay), options, accelerator.device
    )
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = learning_rate
    lr_scheduler = build_lr_scheduler(optimizer, options, total_steps)
    # The EMA of every trainable weight, in float32: made before DeepSpeed casts to bf16 (pitfall 6),
    # and from float32 copies of bf16 weights (a bf16 EMA would round its small updates away).
    ema = None
    if options.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel([p.detach().float() for p in trainable], use_ema_warmup=True)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    model, optimizer = accelerator.prepare(models.model, optimizer)
    models.model = model
    accelerator.register_for_checkpointing(lr_scheduler)

    # Resume: weights, optimizer, schedule, EMA, RNG, step and data position (pitfall 4).
    resumed = runs.resolve_resume(options.resume_from_checkpoint, output_dir)
    step, position = 0, 0
    if resumed is not None:
        accelerator.load_state(str(resumed))
        state = runs.read_state(resumed)
        step, position = state["step"], state["batches"]
        if main:
            print(f"resumed from {resumed} at step {step}")
    if main and options.report_to != "none":
        accelerator.init_trackers(
            "cnx", config={k: v for k, v in vars(options).items() if isinstance(v, (int, float, str, bool))}
        )
    log = runs.StepLog(output_dir, main, step)
    data = loop_batches(dataset, options, world, accelerator.process_index, position)
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not main or os.environ.get("CNX_PROGRESS") == "off",
        dynamic_ncols=True,
    )
    start, samples_seen = time.perf_counter(), 0

    try:
        while step < total_steps:
            step_start = time.perf_counter()
            # Accumulate gradients over micro-batches, then update weights.
            epoch, position, loss, sigma, grad_norm = optimizer_step(
                accelerator, models, data, options, optimizer, trainable, step
            )
            lr_scheduler.step()
            step += 1
            # Update EMA.
            if ema is not None:
                ema.step(trainable)
            # Log.
            seconds = time.perf_counter() - step_start
            samples = options.per_gpu_batch_size * options.gradient_accumulation_steps * world
            samples_seen += samples
            record = {
                "step": step,
                "loss": loss,
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "sigma_mean": float(sigma.mean()),
                "samples_per_s": samples / seconds,
                "seconds": seconds,
                "epoch": epoch,
            }
            log.write(record)
            if main and options.report_to != "none":
                log_to_tensorboard(accelerator, record, sigma)
            bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", samples_s=f"{samples / seconds:.2f}"
            )
            bar.update()
            # Validate.
            if (
                options.validation_image_folder
                and options.num_validation_images
                and (step % options.validation_steps == 0 or step == total_steps)
            ):
                validate_during_training(accelerator, models, scheduler, ema, trainable, options, step)
            # Save a checkpoint.
            if step % options.checkpointing_steps == 0 or step == total_steps:
                state = {"step": step, "batches": position, "epoch": epoch}
                save_checkpoint(accelerator, output_dir, step, state, options)
                if main:
                    runs.rotate(output_dir, options.checkpoints_total_limit, keep=resumed)
    finally:  # the bar and the log close before any error is printed
        bar.close()
        log.close()
        kernels.close()

    # Export the final weights (and their EMA) as diffusers folders; upload them when asked.
    if main:
        final = output_dir / runs.FINAL
        export_folders(accelerator.unwrap_model(model), final, options.trainable, ema, trainable)
        if options.push_to_hub:
            push_to_hub(final, options)
    accelerator.wait_for_everyone()
    elapsed = time.perf_counter() - start
    if main:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else _peak_rss_gib()
        rate = samples_seen / max(elapsed, 1e-9)
        print(
            f"done: {step} steps; this run {elapsed:.1f} s, {rate:.2f} samples/s, peak memory {peak:.2f} GiB,"
            f" outputs in {output_dir} (final/, logs/)"
        )
    accelerator.end_training()
    return output_dir


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


# ---------------------------------------------------------------------------------------------
# Validation and export


def validate_during_training(accelerator, models, scheduler, ema, trainable, options, step: int) -> None:
    """The validation folder through the sampling pipeline on the main process (EMA weights when on).

    Other ranks wait at a barrier whose timeout (2 h) covers a full-size validation.
    """
    if accelerator.is_main_process:
        from cnx.pipeline import ControlNeXtSVDPipeline
        from cnx.validation import read_validation_set, run_validation

        unwrapped = accelerator.unwrap_model(models.model)
        validation = read_validation_set(
            options.validation_image_folder,
            options.validation_control_folder,
            options.validation_image,
            max_frames=options.num_frames,
        )
        pipe = ControlNeXtSVDPipeline(
            models.vae,
            models.image_encoder,
            unwrapped.unet,
            scheduler,
            models.feature_extractor,
            unwrapped.controlnext,
        )
        pipe.set_progress_bar_config(disable=True)
        if ema is not None:
            ema.store(trainable)
            ema.copy_to(trainable)
        log_path = Path(options.output_dir) / runs.VALIDATION_LOG
        try:
            for i in range(options.num_validation_images):
                out_dir = Path(options.output_dir) / "validation" / f"step-{step:06d}" / f"video-{i}"
                generator = stream_generator("validation", options.seed, i, device="cpu")
                with accelerator.autocast():  # frozen models in the weight dtype, trained ones in fp32
                    result = run_validation(
                        pipe,
                        validation,
                        out_dir,
                        options.height,
                        options.width,
                        control_scale=options.control_scale,
                        generator=generator,
                        decode_chunk_size=options.decode_chunk_size,
                    )
                with log_path.open("a") as file:
                    file.write(json.dumps({"step": step, "video": i, **result}) + "\n")
                if options.report_to != "none":
                    accelerator.log({f"validation/{k}": v for k, v in result.items()}, step=step)
                    _log_grid(accelerator, out_dir / "grid.png", step, i)
        finally:
            if ema is not None:
                ema.restore(trainable)
    accelerator.wait_for_everyone()


def _log_grid(accelerator, path: Path, step: int, index: int) -> None:
    import numpy as np
    from PIL import Image

    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    tracker.add_image(f"validation/grid-{index}", np.asarray(Image.open(path)), step, dataformats="HWC")


def main(argv: list[str] | None = None) -> int:
    from cnx.checks import DataCheckError
    from cnx.media import InputError
    from cnx.options import parse_options
    from cnx.weights import WeightLoadError

    options = parse_options(argv)
    bad_input = (DataCheckError, InputError, WeightLoadError, runs.RunLayoutError)  # found before training
    try:
        train(options)
    except bad_input as err:
        print(f"cnx train: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"cnx train: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
