"""`cnx train` / `python -m cnx.train`: ControlNeXt on SVD, launchable with `accelerate launch`.

One optimizer step is `training_step` (a batch -> its loss), called by the loop,
the notebooks and the tests. The loop around it is `train`, split by phase
comments. What makes a run safe to stop and resume:
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

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from cnx import conditioning, edm
from cnx.latents import (
    FrameLatentCache,
    channels_last_on_cpu,
    embed_reference,
    encode_chunk_frames,
    encode_reference,
    encode_video_latents,
)
from cnx.seeding import stream_generator

VAE_CHUNK_FRAMES = 8  # frames through the VAE encoder at once (a 21 x 576x1024 clip never at once)
CHECKPOINT_PREFIX = "checkpoint-"
TRAINABLE_ATTENTION = ("to_out", "to_v")  # what --trainable selective trains in the UNet's attention


# ---------------------------------------------------------------------------------------------
# One step


@dataclass
class Models:
    """What a training step needs: the frozen VAE and image encoder, and the UNet + ControlNeXt wrapper."""

    vae: torch.nn.Module
    image_encoder: torch.nn.Module
    feature_extractor: object
    model: torch.nn.Module  # cnx.controlnext.ControlNeXtSVD, possibly wrapped by accelerate
    weight_dtype: torch.dtype  # of the frozen models and the forward pass
    latent_cache: FrameLatentCache | None = None  # --latent_cache_mb: each frame's posterior, once
    encode_chunk: int = VAE_CHUNK_FRAMES  # frames per VAE encoder call (`build_models`: 1 on a CPU)


@dataclass(frozen=True)
class StepOutput:
    loss: torch.Tensor  # () float32, the mean over the batch
    per_sample: torch.Tensor  # (B,) float32
    sigma: torch.Tensor  # (B,) float32


def training_step(
    models: Models,
    batch: dict,
    options,
    generator: torch.Generator,
    sigma: torch.Tensor | None = None,
    control_scale: float | None = None,
) -> StepOutput:
    """The loss of one batch: latents, conditioning and its dropout, noise, the UNet with the control.

    batch: `cnx.data.ClipDataset` items collated: pixel_values (B, F, 3, H, W) in [-1, 1],
    pose_frames (B, F, 3, H, W) in [0, 1], reference_image (B, 3, H, W), hand_weights
    (B, F, 1, H, W). Every random draw comes from `generator`, in a fixed order.
    Held-out evaluation fixes the noise level `sigma` (B,) and the `control_scale`:
    then nothing is dropped and no sigma is drawn.
    """
    device = models.vae.device
    pixels = batch["pixel_values"].to(device)
    reference = batch["reference_image"].to(device)
    batch_size, num_frames = pixels.shape[:2]

    # Latents and the reference's conditioning (frozen models, no gradients).
    latents = encode_video_latents(
        models.vae, pixels, models.encode_chunk, generator, models.latent_cache
    ).float()  # (B, F, C, h, w)
    noisy_reference = conditioning.noise_augment_reference(reference, generator)
    reference_latents = encode_reference(models.vae, noisy_reference).float()  # (B, C, h, w), unscaled
    embeddings = embed_reference(
        models.image_encoder, reference, models.feature_extractor
    ).float()  # (B, 1, D)

    if sigma is None:
        # Conditioning dropout: the unconditional case drops all three together (pitfall 12).
        dropout = conditioning.sample_conditioning_dropout(
            batch_size,
            generator,
            conditioning_dropout_prob=options.conditioning_dropout_prob,
            control_scale=options.control_scale,
        )
        embeddings, reference_latents = dropout.apply(embeddings, reference_latents)
        sigma = edm.sample_sigmas(batch_size, options.sigma_sampler, generator)  # (B,)
    else:
        scale = options.control_scale if control_scale is None else control_scale
        dropout = conditioning.ConditioningDropout.keep_all(batch_size, control_scale=scale)

    # Noise and preconditioning, in float32 (pitfall 11).
    sigma = sigma.to(device)
    noise = edm.gaussian_noise(latents, generator)
    noisy = edm.add_noise(latents, sigma, noise)  # (B, F, C, h, w)
    c_noise = edm.precondition(sigma)[3]
    model_input = torch.cat(
        [edm.scale_input(noisy, sigma), reference_latents[:, None].expand(-1, num_frames, -1, -1, -1)], dim=2
    )  # (B, F, 2C, h, w)
    time_ids = conditioning.added_time_ids(batch_size=batch_size, device=device)

    # The UNet with the control (autocast, when on, wraps only this forward).
    output = models.model(
        model_input.to(models.weight_dtype),
        c_noise,
        embeddings.to(models.weight_dtype),
        time_ids.to(models.weight_dtype),
        pose_frames=batch["pose_frames"].to(device, models.weight_dtype),
        control_scale=dropout.control_scale.to(device),
    ).sample
    denoised = edm.denoise(noisy, output, sigma)
    per_sample = edm.denoising_loss(denoised, latents, sigma, batch["hand_weights"].to(device))  # (B,)
    return StepOutput(loss=per_sample.mean(), per_sample=per_sample, sigma=sigma)


def step_generator(seed: int, rank: int, step: int, micro: int, device="cpu") -> torch.Generator:
    """The generator of one micro-batch: the ("train", seed, rank, step, micro) stream (pitfall 10)."""
    return stream_generator("train", seed, rank, step, micro, device=device)


# ---------------------------------------------------------------------------------------------
# What trains


def select_trainable(model, trainable: str, rank: int = 128) -> list[torch.nn.Parameter]:
    """Freeze what `--trainable` leaves alone; return the parameters that train.

    full: UNet + ControlNeXt; selective: ControlNeXt + the UNet attention's to_out / to_v;
    lora: ControlNeXt + LoRA adapters (rank `rank`) on the UNet's attention; controlnext: ControlNeXt.
    """
    model.unet.requires_grad_(trainable == "full")
    model.controlnext.requires_grad_(True)
    if trainable == "selective":
        for name, parameter in model.unet.named_parameters():
            if any(f".{part}." in name for part in TRAINABLE_ATTENTION):
                parameter.requires_grad_(True)
    elif trainable == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
        inject_adapter_in_model(config, model.unet)
    elif trainable not in ("full", "controlnext"):
        raise ValueError(f"unknown --trainable {trainable!r}")
    return [p for p in model.parameters() if p.requires_grad]


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Two groups (pitfall 9): decay for weight matrices and kernels, none for norms and biases."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(groups: list[dict], options, device="cpu"):
    """AdamW (or bitsandbytes' 8-bit AdamW) over `groups`; on a CPU torch's fused kernel.

    The fused CPU step is one pass over each tensor instead of a dozen: on 2 cores the tiny
    profile's 2.7 M parameters step in 4.5 ms instead of 16.6 ms.
    """
    kwargs = dict(
        lr=options.learning_rate, betas=(options.adam_beta1, options.adam_beta2), eps=options.adam_epsilon
    )
    if options.use_8bit_adam:
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, **kwargs)
        except Exception as err:  # missing, or no usable backend on this machine
            raise SystemExit(f"cnx train: --use_8bit_adam needs a working bitsandbytes ({err})") from None
    fused = True if torch.device(device).type == "cpu" else None  # None: torch's choice for the device
    return torch.optim.AdamW(groups, **kwargs, fused=fused)


def build_lr_scheduler(optimizer, options, total_steps: int):
    """diffusers' schedule with warm-up for every name (pitfall 7: "constant" ignored its warm-up)."""
    from diffusers.optimization import get_scheduler

    name = options.lr_scheduler
    if name == "constant" and options.lr_warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(
        name, optimizer, num_warmup_steps=options.lr_warmup_steps, num_training_steps=total_steps
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
# Checkpoints


def checkpoint_step(path: Path) -> int | None:
    """The step of a `checkpoint-<step>` folder, None for any other name (pitfall 3)."""
    suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary folders of a crashed save are skipped)."""
    found = [
        p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and checkpoint_step(p) is not None
    ]
    return sorted((p for p in found if (p / "trainer_state.json").is_file()), key=checkpoint_step)


def resolve_resume(value: str | None, output_dir: Path) -> Path | None:
    """The checkpoint to resume: None, "latest" (in output_dir; none yet is a fresh start) or any path."""
    if value is None:
        return None
    if value == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / "trainer_state.json").is_file():
        raise SystemExit(f"cnx train: {path}: not a complete cnx checkpoint (no trainer_state.json)")
    return path


def rotate(output_dir: Path, limit: int | None, keep: Path | None) -> None:
    """Delete the oldest checkpoints beyond `limit`, never `keep` (the one this run resumed from)."""
    if not limit:
        return
    found = complete_checkpoints(output_dir)
    for old in found[: max(0, len(found) - limit)]:
        if keep is None or old.resolve() != keep.resolve():
            shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------
# Logs


def truncate_log(path: Path, step: int) -> None:
    """Keep the json lines of `path` up to `step`: later ones are redone by a resumed run.

    A line cut short by a crash (not valid json) is dropped too.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in kept))


class StepLog:
    """`logs/steps.jsonl`: one json line per optimizer step, flushed as written (main process only)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.file = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            truncate_log(path, resume_step)
            truncate_log(path.parent / "validation.jsonl", resume_step)
            self.file = path.open("a")

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


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
# Models


@contextmanager
def _loading(source: str, error: type[Exception]):
    """An OSError while loading the pipeline's parts becomes one line naming the source."""
    try:
        yield
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise error(f"{source}: cannot load the SVD pipeline's parts: {first}") from err


def build_models(options, device, weight_dtype: torch.dtype):
    """(Models, unwrapped; the pipeline's scheduler) from the options' folders and weights."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from cnx.controlnext import ControlNeXt, ControlNeXtSVD, controlnext_config_for
    from cnx.generate import InputError
    from cnx.seeding import derive_seed
    from cnx.tiny import quiet_progress_bars
    from cnx.weights import load_controlnext_state, load_unet_state

    source, revision = options.pretrained_model_name_or_path, options.revision
    with quiet_progress_bars(), _loading(source, InputError):
        vae = AutoencoderKLTemporalDecoder.from_pretrained(source, subfolder="vae", revision=revision)
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            source, subfolder="image_encoder", revision=revision
        )
        feature_extractor = CLIPImageProcessor.from_pretrained(
            source, subfolder="feature_extractor", revision=revision
        )
        scheduler = EulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", revision=revision)
        unet_source = options.pretrain_unet or source
        subfolder = None if (Path(unet_source) / "config.json").is_file() else "unet"
        unet = UNetSpatioTemporalConditionModel.from_pretrained(
            unet_source, subfolder=subfolder, revision=options.non_ema_revision or revision
        )
    with torch.random.fork_rng():  # ControlNeXt's initial weights from --seed, the global RNG left alone
        torch.manual_seed(derive_seed("controlnext-init", options.seed))
        controlnext = ControlNeXt(**controlnext_config_for(unet.config.block_out_channels[0]))
    if (
        options.controlnet_model_name_or_path
    ):  # strict, each file read by its own extension (pitfalls 1, 2, 5)
        load_controlnext_state(controlnext, options.controlnet_model_name_or_path)
    if options.unet_model_name_or_path:
        load_unet_state(unet, options.unet_model_name_or_path)
    if options.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401

            unet.enable_xformers_memory_efficient_attention()
        except ImportError:
            print("cnx train: xformers is not installed; attention uses PyTorch SDPA", file=sys.stderr)
    model = ControlNeXtSVD(unet, controlnext)
    if options.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    for frozen in (vae, image_encoder):
        frozen.requires_grad_(False).eval().to(device)
        if frozen.dtype != weight_dtype:  # diffusers warns on every `to(dtype)`, even a no-op
            frozen.to(weight_dtype)
    channels_last_on_cpu(vae)
    cache = FrameLatentCache(options.latent_cache_mb * 2**20) if options.latent_cache_mb else None
    chunk = encode_chunk_frames(device, VAE_CHUNK_FRAMES)
    return Models(vae, image_encoder, feature_extractor, model, weight_dtype, cache, chunk), scheduler


# ---------------------------------------------------------------------------------------------
# The loop


def check_environment(options) -> None:
    """Refuse, before any model loads, what this machine cannot do for these options."""
    if options.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:
            raise SystemExit(
                f"cnx train: --use_8bit_adam needs bitsandbytes, which does not load here ({err})"
            ) from None
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


def make_accelerator(options):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

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
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    partial = output_dir / f".partial-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))  # every rank: DeepSpeed writes its shards from each
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        options.to_json(partial / "training_options.json")
        (partial / "trainer_state.json").write_text(json.dumps(record, indent=2) + "\n")  # written last
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
    for micro in range(options.gradient_accumulation_steps):
        epoch, position, batch = next(data)
        with accelerator.accumulate(models.model):
            out = training_step(models, batch, options, step_generator(options.seed, rank, step, micro))
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


def log_to_tensorboard(accelerator, record: dict, sigma: torch.Tensor) -> None:
    """The step's scalars and a histogram of its sigmas."""
    accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=record["step"])
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    tracker.add_histogram("sigma", sigma.float().cpu(), record["step"])


def train(options) -> Path:
    """Train as `options` say; return the output folder. Each phase below is one comment."""
    from tqdm.auto import tqdm

    from cnx.data import ClipDataset

    check_environment(options)
    accelerator = make_accelerator(options)
    world, main = accelerator.num_processes, accelerator.is_main_process
    output_dir = Path(options.output_dir)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    if options.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        options.to_json(output_dir / "training_options.json")
        if accelerator.state.deepspeed_plugin is not None:  # the configuration DeepSpeed really ran with
            config = accelerator.state.deepspeed_plugin.deepspeed_config
            (output_dir / "logs").mkdir(exist_ok=True)
            (output_dir / "logs" / "deepspeed.json").write_text(
                json.dumps(config, indent=2, default=str) + "\n"
            )

    # Data: checked up front (cnx check-data's cheap checks), never shuffled by the dataset itself.
    dataset = ClipDataset(
        options.meta_info_path,
        options.width,
        options.height,
        options.sample_n_frames,
        options.interval_frame,
        seed=options.seed,
        ref_augment=options.ref_augment,
        max_failure_fraction=options.max_bad_sample_fraction,
        video_cache_mb=options.video_cache_mb,
    )
    per_epoch = batches_per_epoch(len(dataset), world, options.per_gpu_batch_size)
    steps_per_epoch = max(1, per_epoch // options.gradient_accumulation_steps)
    total_steps = options.max_train_steps or options.num_train_epochs * steps_per_epoch

    if options.validation_image_folder:  # a broken validation folder fails now, not at the first validation
        from cnx.validate import read_validation_set

        read_validation_set(
            options.validation_image_folder, options.validation_control_folder, options.validation_image
        )

    # Models, what trains, optimizer and schedule.
    models, scheduler = build_models(options, accelerator.device, weight_dtype)
    trainable = select_trainable(models.model, options.trainable, options.rank)
    if options.log_trainable_parameters and main:
        total = sum(p.numel() for p in models.model.parameters())
        print(
            f"trainable parameters: {sum(p.numel() for p in trainable):,} of {total:,} ({options.trainable})"
        )
    learning_rate = options.learning_rate
    if options.scale_lr:
        learning_rate *= options.gradient_accumulation_steps * options.per_gpu_batch_size * world
    optimizer = build_optimizer(
        parameter_groups(models.model, options.adam_weight_decay), options, accelerator.device
    )
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = learning_rate
    lr_scheduler = build_lr_scheduler(optimizer, options, total_steps)
    ema = None
    if (
        options.use_ema
    ):  # of every trainable weight, in float32: made before DeepSpeed casts to bf16 (pitfall 6)
        from diffusers.training_utils import EMAModel

        ema = EMAModel([p for p in trainable], use_ema_warmup=True)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    model, optimizer = accelerator.prepare(models.model, optimizer)
    models.model = model
    accelerator.register_for_checkpointing(lr_scheduler)

    # Resume: weights, optimizer, schedule, EMA, RNG, step and data position (pitfall 4).
    resumed = resolve_resume(options.resume_from_checkpoint, output_dir)
    step, position = 0, 0
    if resumed is not None:
        accelerator.load_state(str(resumed))
        state = json.loads((resumed / "trainer_state.json").read_text())
        step, position = state["step"], state["batches"]
        if main:
            print(f"resumed from {resumed} at step {step}")
    if main and options.report_to != "none":
        accelerator.init_trackers(
            "cnx", config={k: v for k, v in vars(options).items() if isinstance(v, (int, float, str, bool))}
        )
    log = StepLog(output_dir / "logs" / "steps.jsonl", main, step)
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
                    rotate(output_dir, options.checkpoints_total_limit, keep=resumed)
    finally:  # the bar and the log close before any error is printed
        bar.close()
        log.close()

    # Export the final weights (and their EMA) as diffusers folders; upload them when asked.
    if main:
        export(accelerator.unwrap_model(model), output_dir / "final", options.trainable, ema, trainable)
        if options.push_to_hub:
            push_to_hub(output_dir / "final", options)
    accelerator.wait_for_everyone()
    elapsed = time.perf_counter() - start
    if main:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else _peak_rss_gib()
        rate = samples_seen / max(elapsed, 1e-9)
        print(
            f"done: {step} steps; this run {elapsed:.1f} s, {rate:.2f} samples/s, peak memory {peak:.2f} GiB,"
            f" outputs in {output_dir} (final/, logs/)"
        )
        if models.latent_cache is not None:
            print(models.latent_cache.summary())
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
        from cnx.validate import read_validation_set, run_validation

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
        log_path = Path(options.output_dir) / "logs" / "validation.jsonl"
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


def export(model, out_dir: Path, trainable: str, ema=None, parameters=None) -> Path:
    """Diffusers folders of the trained weights: controlnext/, unet/ (when trained) and their EMA copies."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def save(suffix: str) -> None:
        model.controlnext.save_pretrained(out_dir / f"controlnext{suffix}", safe_serialization=True)
        if trainable == "lora":
            from peft.utils import get_peft_model_state_dict
            from safetensors.torch import save_file

            adapter = {k: v.contiguous() for k, v in get_peft_model_state_dict(model.unet).items()}
            (out_dir / f"unet_lora{suffix}").mkdir(exist_ok=True)
            save_file(adapter, out_dir / f"unet_lora{suffix}" / "adapter_model.safetensors")
            merged_unet(model.unet).save_pretrained(out_dir / f"unet{suffix}", safe_serialization=True)
        elif trainable != "controlnext":
            model.unet.save_pretrained(out_dir / f"unet{suffix}", safe_serialization=True)

    save("")
    if ema is not None:
        ema.store(parameters)
        ema.copy_to(parameters)
        try:
            save("_ema")
        finally:
            ema.restore(parameters)
    return out_dir


def merged_unet(unet):
    """A plain diffusers UNet whose weights are `unet`'s with its LoRA adapters merged in."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(unet)
    for module in merged.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    state = {
        key.replace(".base_layer.", "."): value
        for key, value in merged.state_dict().items()
        if "lora_" not in key
    }
    plain = type(unet).from_config(unet.config)
    plain.load_state_dict(state, strict=True)
    return plain


def main(argv: list[str] | None = None) -> int:
    from cnx.checks import DataCheckError
    from cnx.generate import InputError
    from cnx.options import parse_options
    from cnx.weights import WeightLoadError

    options = parse_options(argv)
    try:
        train(options)
    except (DataCheckError, InputError, WeightLoadError) as err:  # bad input, found before training
        print(f"cnx train: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"cnx train: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
