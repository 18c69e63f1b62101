"""Does ControlNeXt training learn? Held-out figures of a model, before and after training.

Two figures on dancers no training step sees, each with the control at the
trained scale and off (scale 0):

- the denoising loss at fixed sigmas with fixed noise (`heldout_loss`): every
  model sees the same draws, so a difference is the weights' alone. It is also
  taken with each clip's poses in reverse order (`reversed_poses`): the same
  poses at the wrong times. A model that reads the poses does better with the
  right ones; one that merely got used to the control's features does not;
- the control fidelity of sampled videos (`cnx.metrics.control_fidelity`): its
  score (lower is better) and its contrast (higher is better, 0 for a video
  that does not move): does the generated dancer stand where the driving poses say.

Training learns when the loss falls, the right poses lower the loss more than
no control and than the same poses reversed, and the fidelity of videos sampled
with the control improves. `benchmarks/convergence.py`
measures all of it around a real training run; notebook 05 shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cnx import edm
from cnx.seeding import stream_generator

HELDOUT_SEED = 1  # `cnx samples --seed` of the held-out dancers (data_samples is seed 0)
HELDOUT_STREAM = "convergence-heldout"  # the noise of the held-out loss: no training step draws it
SAMPLING_STEPS = 12  # sampler steps of the scored videos
# The scored videos are sampled without classifier-free guidance: its unconditional half drops the
# control too, so guidance would scale what the control does; without it the figure is the model's
# own, and sampling is twice as fast.
SAMPLING_GUIDANCE = 1.0
# Frames per held-out clip: the pretrained tiny SVD's num_frames, whatever the run trains on.
HELDOUT_FRAMES = 8


def write_heldout(out_dir: str | Path, num_clips: int = 2, num_frames: int = 48) -> Path:
    """Held-out dancers in the training format (seed HELDOUT_SEED); returns their meta_info.json."""
    from cnx.synth import write_samples

    return write_samples(out_dir, seed=HELDOUT_SEED, num_clips=num_clips, num_frames=num_frames)


def heldout_batches(meta_info_path: str | Path, options) -> list[dict]:
    """One batch per clip, each the same for every call: centred crop, HELDOUT_FRAMES from the start."""
    from cnx.data import ClipDataset

    dataset = ClipDataset(
        meta_info_path,
        options.width,
        options.height,
        HELDOUT_FRAMES,
        max(options.interval_frame, 1),
        deterministic=True,
    )
    return [torch.utils.data.default_collate([dataset[i]]) for i in range(len(dataset))]


def reversed_poses(batches: list[dict]) -> list[dict]:
    """The same batches with every clip's pose frames in reverse order (B, F, 3, H, W) -> flipped F."""
    return [batch | {"pose_frames": batch["pose_frames"].flip(1)} for batch in batches]


class RememberedEncodes:
    """A frozen VAE whose `encode` returns the earlier output for an input equal to an earlier one.

    The held-out loss encodes each clip's frames once per sigma and control setting (12 times);
    the encoder is most of a tiny model's cost. Outputs are the same objects, so figures are unchanged.
    """

    def __init__(self, vae):
        self.vae, self.seen = vae, []  # [(input, output)]

    def __getattr__(self, name):
        return getattr(self.vae, name)

    def encode(self, pixels: torch.Tensor):
        for seen, output in self.seen:
            if seen.shape == pixels.shape and torch.equal(seen, pixels):
                return output
        output = self.vae.encode(pixels)
        self.seen.append((pixels.clone(), output))
        return output


def models_of(pipe):
    """The training step's `Models` for a `ControlNeXtSVDPipeline`'s components (float32)."""
    from cnx.controlnext import ControlNeXtSVD
    from cnx.step import Models

    model = ControlNeXtSVD(pipe.unet, pipe.controlnext)
    vae = RememberedEncodes(pipe.vae)
    return Models(vae, pipe.image_encoder, pipe.feature_extractor, model, torch.float32)


@torch.no_grad()
def heldout_loss(models, batches: list[dict], options, control_scale: float, num_sigmas: int = 4) -> float:
    """Mean training loss over clips x `num_sigmas` fixed sigmas (log-normal quantiles), fixed noise."""
    from cnx.step import heldout_step

    losses = []
    for b, batch in enumerate(batches):
        for i, sigma in enumerate(edm.lognormal_quantiles(num_sigmas)):
            generator = stream_generator(HELDOUT_STREAM, b, i)
            sigmas = sigma.expand(len(batch["pixel_values"]))
            out = heldout_step(models, batch, sigmas, control_scale, generator)
            losses.append(out.per_sample)
    return float(torch.cat(losses).mean())


def validation_sets(heldout_dir: str | Path, num_frames: int):
    """The two held-out validation dancers with their keypoints: `data_samples`' and `write_heldout`'s."""
    from cnx.profiles import DATA_SAMPLES
    from cnx.validation import read_validation_set

    return [
        read_validation_set(
            root / "validation" / "ground_truth",
            root / "validation" / "pose",
            root / "validation" / "reference_image.png",
            root / "keypoints" / "validation.npz",
            num_frames,
        )
        for root in (DATA_SAMPLES, Path(heldout_dir))
    ]


@torch.no_grad()
def sample_video(
    pipe, validations, index: int, options, control_scale: float, videos=None, steps=SAMPLING_STEPS
):
    """(F, H, W, 3) uint8: validation set `index` animated by `pipe`, with that set's fixed seed.

    `videos` (a dict) keeps what was sampled, keyed by set, scale and steps: a notebook that
    shows, measures and ablates one model samples each of its videos once.
    """
    from cnx.media import to_uint8

    key = (index, float(control_scale), steps)
    if videos is not None and key in videos:
        return videos[key]
    validation = validations[index]
    frames = pipe(
        validation.reference,
        validation.poses,
        height=options.height,
        width=options.width,
        num_inference_steps=steps,
        control_scale=control_scale,
        max_guidance_scale=SAMPLING_GUIDANCE,
        generator=stream_generator(HELDOUT_STREAM, "sample", index),
        decode_chunk_size=options.decode_chunk_size,
        output_type="np",
    ).frames[0]
    video = to_uint8(frames)
    if videos is not None:
        videos[key] = video
    return video


def sampled_fidelity(
    pipe, validations, options, control_scale: float, steps=SAMPLING_STEPS, videos=None
) -> dict:
    """Mean metrics (`cnx.validate.score`) of videos sampled for each validation set, fixed seeds."""
    from cnx.validation import score

    results = []
    for i, validation in enumerate(validations):
        video = sample_video(pipe, validations, i, options, control_scale, videos, steps)
        results.append(score(video, validation, options.height, options.width))
    return {key: sum(r[key] for r in results) / len(results) for key in results[0]}


@dataclass(frozen=True)
class Figures:
    """The held-out figures of one model (see the module docstring); lower is better except for contrast."""

    loss: float  # with the control at the trained scale
    loss_no_control: float  # control scale 0
    loss_reversed_poses: float  # control at the trained scale, each clip's poses in reverse order
    fidelity: float  # control fidelity score of videos sampled with the control
    fidelity_no_control: float
    contrast: float  # control fidelity contrast of the same videos: > 0 when they follow the poses
    contrast_no_control: float


def measure(
    pipe, batches, validations, options, num_sigmas: int = 4, steps: int = SAMPLING_STEPS, videos=None
) -> Figures:
    """All the figures of the model in `pipe` (a ControlNeXtSVDPipeline); `videos`: see `sample_video`."""
    models = models_of(pipe)
    scale = options.control_scale
    on = sampled_fidelity(pipe, validations, options, scale, steps, videos)
    off = sampled_fidelity(pipe, validations, options, 0.0, steps, videos)
    return Figures(
        loss=heldout_loss(models, batches, options, scale, num_sigmas),
        loss_no_control=heldout_loss(models, batches, options, 0.0, num_sigmas),
        loss_reversed_poses=heldout_loss(models, reversed_poses(batches), options, scale, num_sigmas),
        fidelity=on["control_score"],
        fidelity_no_control=off["control_score"],
        contrast=on["control_contrast"],
        contrast_no_control=off["control_contrast"],
    )


def initial_pipeline(options):
    """The pipeline training starts from: the pretrained SVD and ControlNeXt's seeded initial weights."""
    from cnx.pipeline import ControlNeXtSVDPipeline
    from cnx.step import build_models

    models, scheduler = build_models(options, "cpu", torch.float32)
    controlnext_svd = models.model
    pipe = ControlNeXtSVDPipeline(
        models.vae,
        models.image_encoder,
        controlnext_svd.unet,
        scheduler,
        models.feature_extractor,
        controlnext_svd.controlnext,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trained_pipeline(options, weights_path: str | Path):
    """The pipeline with the weights a training run wrote: an export, a checkpoint or its output_dir."""
    from cnx.sampler import find_trained_weights, load_pipeline

    weights = find_trained_weights(weights_path)
    pipe = load_pipeline(options.pretrained_model_name_or_path, weights, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def through_vae(vae, frames, chunk_size: int | None = None):
    """(F, H, W, 3) uint8 frames encoded and decoded by `vae` (latent means), `chunk_size` frames
    decoded together (None: all), as the pipeline decodes.

    The best any generated video can look: the UNet only ever makes latents, and this VAE
    turns them into pixels.
    """
    from cnx.media import to_uint8
    from cnx.pretrain_vae import reconstruct

    clip = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float() / 127.5 - 1  # (1, F, 3, H, W)
    chunks = clip.split(chunk_size or clip.shape[1], dim=1)
    decoded = torch.cat([reconstruct(vae, c.to(vae.device, vae.dtype))[0].float().cpu() for c in chunks])
    return to_uint8(((decoded + 1) / 2).permute(0, 2, 3, 1).numpy())


def run_options(folder: str | Path):
    """The TrainingOptions of a run folder (`cnx launch`), its relative paths made absolute."""
    from dataclasses import replace

    from cnx.options import TrainingOptions

    folder = Path(folder).resolve()
    options = TrainingOptions.from_json(folder)
    local = {
        name: str(folder / value)
        for name in ("pretrained_model_name_or_path", "output_dir")
        if (value := getattr(options, name)) and (folder / value).exists()
    }
    return replace(options, **local)


def read_steps(output_dir: str | Path) -> list[dict]:
    """The records of `logs/steps.jsonl`, one per optimizer step."""
    from cnx.runs import STEPS_LOG, read_log

    return read_log(Path(output_dir) / STEPS_LOG)


def long_sequence(folder: str | Path, name: str, num_frames: int, interval: int):
    """A ValidationSet of `num_frames` frames, `interval` apart, from a written clip (`write_heldout`).

    Its reference is the clip's first frame; it has the clip's known keypoints, so it scores.
    """
    from cnx.pose import load_keypoints
    from cnx.validation import ValidationSet
    from cnx.video import container_info, read_frames

    folder = Path(folder)
    video = folder / "videos" / f"{name}.mp4"
    indices = list(range(0, num_frames * interval, interval))
    available = container_info(video).num_frames
    if indices[-1] >= available:
        raise ValueError(f"{video}: {available} frames, too few for {num_frames} frames {interval} apart")
    truth = read_frames(video, indices)  # (F, H, W, 3) uint8
    poses = read_frames(folder / "poses" / f"{name}.mp4", indices)
    track = load_keypoints(folder / "keypoints" / f"{name}.npz")
    keypoints = {k: track[k][indices] for k in ("body", "body_scores", "hands", "hand_scores")}
    return ValidationSet(truth[0], poses, truth, keypoints)
