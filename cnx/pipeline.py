"""Sampling: `ControlNeXtSVDPipeline`, diffusers' SVD pipeline plus the pose control.

The pipeline is diffusers' `StableVideoDiffusionPipeline` with three additions,
each a small pure function here so it can be tested alone:
- the pose control (`controlnext`, at `control_scale`, injected as in training
  by `cnx.controlnext.ControlNeXtSVD`);
- classifier-free guidance whose unconditional half is exactly the input
  conditioning dropout trains (`ConditioningDropout.drop_all`: no image
  embedding, no reference latent, control off), with SVD's per-frame guidance
  ramp, in one batched UNet call;
- long videos denoised in overlapping windows (`frame_windows`,
  `blend_weights`), the model outputs blended before each scheduler step.
With the control off and one window it computes what diffusers' pipeline
computes, step for step; the steps themselves are the folder's own
`EulerDiscreteScheduler`. The defaults for fps, motion bucket and noise
augmentation are training's (`cnx.conditioning`), and the caller's values reach
the UNet unchanged (pitfall 14 in docs/pitfalls.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import StableVideoDiffusionPipeline
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
    StableVideoDiffusionPipelineOutput,
)

from cnx.checks import MAX_ASPECT_GAP
from cnx.conditioning import (
    DEFAULT_CONTROL_SCALE,
    DEFAULT_FPS,
    DEFAULT_MOTION_BUCKET_ID,
    DEFAULT_NOISE_AUG_STRENGTH,
    ConditioningDropout,
    added_time_ids,
    noise_augment_reference,
)
from cnx.controlnext import ControlNeXt, ControlNeXtSVD
from cnx.data import crop_resize, crop_window
from cnx.edm import append_dims
from cnx.latents import embed_reference, encode_reference

DEFAULT_OVERLAP = 4  # frames shared by neighbouring windows (the published inference uses 4)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


# ---------------------------------------------------------------------------------------------
# Small pure pieces


def frame_windows(num_frames: int, frames_per_batch: int, overlap: int) -> list[range]:
    """Windows of `frames_per_batch` frames covering `num_frames`, neighbours sharing `overlap` frames.

    The stride is frames_per_batch - overlap; the last window is aligned to the
    end (so it may share more than `overlap` frames with the one before). A
    sequence that fits in one window is one window.
    """
    if num_frames < 1 or frames_per_batch < 1:
        raise ValueError(
            f"num_frames and frames_per_batch must be positive, got {num_frames}, {frames_per_batch}"
        )
    if not 0 <= overlap < frames_per_batch:
        raise ValueError(f"overlap must lie in [0, frames_per_batch), got {overlap} for {frames_per_batch}")
    if num_frames <= frames_per_batch:
        return [range(num_frames)]
    stride = frames_per_batch - overlap
    starts = list(range(0, num_frames - frames_per_batch, stride)) + [num_frames - frames_per_batch]
    return [range(start, start + frames_per_batch) for start in starts]


def blend_weights(windows: list[range], num_frames: int) -> torch.Tensor:
    """(W, F) float32 weights of each window's prediction for each frame; every column sums to one.

    Inside a window a frame's raw weight grows with its distance from the
    window's nearer edge (a tent, at least 1), so where windows overlap each
    one counts most where it sees the most context; frames outside a window get 0.
    """
    raw = torch.zeros(len(windows), num_frames, dtype=torch.float64)
    for w, window in enumerate(windows):
        length = len(window)
        position = torch.arange(length, dtype=torch.float64)
        raw[w, window.start : window.stop] = torch.minimum(position + 1, length - position)
    total = raw.sum(0)
    if (total == 0).any():
        raise ValueError(f"frames {torch.nonzero(total == 0).flatten().tolist()} are in no window")
    return (raw / total).to(torch.float32)


def guidance_ramp(num_frames: int, min_guidance_scale: float, max_guidance_scale: float) -> torch.Tensor:
    """(F,) guidance weight per frame, rising linearly from the first frame to the last (SVD's ramp).

    The first frame reproduces the reference and needs little guidance; frames
    further away drift more and get more.
    """
    return torch.linspace(min_guidance_scale, max_guidance_scale, num_frames)


def guidance_conditions(
    batch_size: int, control_scale: float, guided: bool, device=None
) -> ConditioningDropout:
    """What each half of the UNet batch keeps: [unconditional; conditional] when `guided`, else conditional.

    The unconditional half is `ConditioningDropout.drop_all`, the input the
    training's dropout shows the model, so guidance never asks for anything untrained.
    """
    cond = ConditioningDropout.keep_all(batch_size, device=device, control_scale=control_scale)
    if not guided:
        return cond
    uncond = ConditioningDropout.drop_all(batch_size, device=device)
    return ConditioningDropout(
        keep_image_embedding=torch.cat([uncond.keep_image_embedding, cond.keep_image_embedding]),
        keep_reference_latent=torch.cat([uncond.keep_reference_latent, cond.keep_reference_latent]),
        control_scale=torch.cat([uncond.control_scale, cond.control_scale]),
    )


def apply_guidance(model_output: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """uncond + w * (cond - uncond) for a (2B, F, C, h, w) batch [uncond; cond] and weights (F,)."""
    uncond, cond = model_output.chunk(2)
    guidance = guidance.to(model_output.device, model_output.dtype)
    weight = append_dims(guidance, uncond.ndim - 1)  # (F, 1, 1, 1)
    return uncond + weight * (cond - uncond)


# ---------------------------------------------------------------------------------------------
# Inputs


def reference_tensor(image) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1] from a PIL image, an (H, W, 3) uint8/float array, or a tensor
    (3, H, W) / (1, 3, H, W) in [0, 1]."""
    if isinstance(image, PIL.Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"a reference image array must be (H, W, 3), got {image.shape}")
        scale = 255.0 if image.dtype == np.uint8 else 1.0
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / scale
    if not torch.is_tensor(image):
        raise TypeError(f"reference_image must be a PIL image, a numpy array or a tensor, got {type(image)}")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[:2] != (1, 3):
        raise ValueError(
            f"a reference image tensor must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}"
        )
    return image.float()


def pose_uint8(pose_frames) -> np.ndarray:
    """(F, H, W, 3) uint8 from PIL images, an (F, H, W, 3) uint8 array or an (F, 3, H, W) tensor in [0, 1]."""
    if isinstance(pose_frames, (list, tuple)):
        if not pose_frames:
            raise ValueError("pose_frames is empty")
        pose_frames = np.stack([np.asarray(frame.convert("RGB")) for frame in pose_frames])
    if torch.is_tensor(pose_frames):
        if pose_frames.ndim != 4 or pose_frames.shape[1] != 3:
            raise ValueError(f"a pose tensor must be (F, 3, H, W) in [0, 1], got {tuple(pose_frames.shape)}")
        pose_frames = (
            (pose_frames.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        )
    pose_frames = np.asarray(pose_frames)
    if pose_frames.ndim != 4 or pose_frames.shape[-1] != 3 or pose_frames.dtype != np.uint8:
        raise ValueError(
            f"pose frames must be (F, H, W, 3) uint8, got {pose_frames.shape} {pose_frames.dtype}"
        )
    if len(pose_frames) == 0:
        raise ValueError("pose_frames is empty")
    return pose_frames


def pose_track_frames(
    track: dict,
    reference: torch.Tensor,
    align: bool,
    reference_keypoints=None,
    pose_detector=None,
) -> np.ndarray:
    """(F, h, w, 3) uint8 pose images drawn from a keypoint track, aligned to the reference person if `align`.

    track: `cnx.pose.load_keypoints`' dict (body, body_scores, hands, hand_scores,
    size (H, W) of the driving video). Aligned poses are drawn at the reference's
    size (they are normalised to it), others at the driving video's size; both
    are then cropped and resized like any pose frames.
    """
    from cnx.pose import align_track, render_pose_track

    if "size" not in track:
        raise ValueError("a keypoint track needs 'size' (height, width) of the video it was read from")
    if not align:
        height, width = (int(v) for v in track["size"])
        return render_pose_track(track, height, width)
    reference_size = (reference.shape[2], reference.shape[3])
    if reference_keypoints is None:
        if pose_detector is None:
            raise ValueError(
                "align_poses needs the reference's keypoints: pass reference_keypoints or pose_detector"
            )
        image = (reference[0].permute(1, 2, 0) * 255).round().byte().numpy()  # (H, W, 3) uint8
        body, body_scores, *_ = pose_detector(image)
        reference_keypoints = {"body": body, "body_scores": body_scores}
    aligned = align_track(track, reference_keypoints, tuple(int(v) for v in track["size"]), reference_size)
    return render_pose_track(aligned, *reference_size)


def crop_to_aspect(reference: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The (1, 3, H, W) reference centre-cropped to the output's aspect when they differ by more than 1%."""
    source_aspect, aspect = reference.shape[3] / reference.shape[2], width / height
    if abs(source_aspect / aspect - 1) <= MAX_ASPECT_GAP:
        return reference
    box = crop_window(reference.shape[3], reference.shape[2], width, height)
    left, top, right, bottom = box.pixels(reference.shape[3], reference.shape[2])
    return reference[:, :, top:bottom, left:right]


def fit_frames(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F, 3, height, width) uint8: centre crop to the output's aspect, then resize.

    The same crop-and-resize as the training data (`cnx.data`), so a pose drawn
    for the reference's framing lands where training put it.
    """
    box = crop_window(frames.shape[2], frames.shape[1], width, height)
    return crop_resize(frames, box, width, height)


# ---------------------------------------------------------------------------------------------
# The pipeline


class ControlNeXtSVDPipeline(StableVideoDiffusionPipeline):
    """Stable Video Diffusion driven by pose frames through ControlNeXt.

    Load it like SVD: `ControlNeXtSVDPipeline.from_pretrained(svd_folder_or_hub_id,
    controlnext=model_or_path)`; without `controlnext` it is SVD itself. `save_pretrained`
    writes all six components, `.to()`, `enable_model_cpu_offload()` and the
    progress bar are diffusers'.
    """

    model_cpu_offload_seq = "image_encoder->controlnext->unet->vae"
    _optional_components = ["controlnext"]

    def __init__(
        self, vae, image_encoder, unet, scheduler, feature_extractor, controlnext: ControlNeXt | None = None
    ):
        super().__init__(vae, image_encoder, unet, scheduler, feature_extractor)
        self.register_modules(controlnext=controlnext)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, controlnext=None, **kwargs):
        """Load an SVD folder or hub id; `controlnext` is a model, or a path `cnx.weights` loads strictly."""
        if isinstance(controlnext, (str, Path)):
            from cnx.weights import load_controlnext

            controlnext = load_controlnext(controlnext)
        if controlnext is not None:
            kwargs["controlnext"] = controlnext
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        reference_image,
        pose_frames,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        min_guidance_scale: float = 1.0,
        max_guidance_scale: float = 3.0,
        fps: float = DEFAULT_FPS,
        motion_bucket_id: float = DEFAULT_MOTION_BUCKET_ID,
        noise_aug_strength: float = DEFAULT_NOISE_AUG_STRENGTH,
        control_scale: float = DEFAULT_CONTROL_SCALE,
        frames_per_batch: int | None = None,
        overlap: int = DEFAULT_OVERLAP,
        decode_chunk_size: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        align_poses: bool = False,
        reference_keypoints=None,
        pose_detector=None,
    ):
        """Animate `reference_image` along `pose_frames`; one video of len(pose_frames) frames.

        reference_image: PIL image, (H, W, 3) array or (3, H, W) tensor in [0, 1];
        centre-cropped to the output's aspect when it differs by more than 1%, then
        resized as diffusers' pipeline does. pose_frames: list of PIL images,
        (F, H, W, 3) uint8 array or (F, 3, H, W) tensor in [0, 1], or a keypoint track
        (`cnx.pose.load_keypoints`' dict) drawn here; cropped and resized like the
        training data. `align_poses` moves and scales a track from another person onto
        the reference person (`reference_keypoints`, or found by `pose_detector`, a
        `cnx.pose.PoseDetector`). height/width default to the reference's size
        (multiples of 8). `control_scale` 0 switches the control off;
        `max_guidance_scale` <= 1 skips the unconditional half. Windows of
        `frames_per_batch` frames (default: the UNet's `num_frames`) sharing
        `overlap` frames cover long sequences. output_type: "pil" | "np" | "pt" | "latent".
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        reference = reference_tensor(reference_image)  # (1, 3, H0, W0) in [0, 1]
        height = height or reference.shape[2]
        width = width or reference.shape[3]
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
        reference = crop_to_aspect(reference, height, width)
        if isinstance(pose_frames, dict):
            pose_frames = pose_track_frames(
                pose_frames, reference, align_poses, reference_keypoints, pose_detector
            )
        elif align_poses:
            raise ValueError("align_poses needs the driving keypoints: pass pose_frames as a keypoint track")
        poses = pose_uint8(pose_frames)  # (F, h0, w0, 3) uint8
        num_frames = len(poses)
        frames_per_batch = frames_per_batch or self.unet.config.num_frames
        windows = frame_windows(num_frames, frames_per_batch, min(overlap, frames_per_batch - 1))
        decode_chunk_size = decode_chunk_size or num_frames
        device = self._execution_device
        guided = max_guidance_scale > 1
        use_control = self.controlnext is not None and control_scale != 0

        # 1. The reference, as SVD sees it: CLIP embedding, and the noised VAE latent.
        image_embeddings = embed_reference(self.image_encoder, reference * 2 - 1, self.feature_extractor)
        vae_input = self._vae_input(reference_image, reference, height, width).to(device)  # (1, 3, H, W)
        if generator is None:  # diffusers draws from the global RNG then; so does this, once
            generator = torch.Generator(device).manual_seed(int(torch.randint(0, 2**62, ()).item()))
        vae_input = noise_augment_reference(vae_input, generator, noise_aug_strength)
        reference_latents = self._encode_reference(vae_input).to(image_embeddings.dtype)  # (1, C, h, w)
        reference_latents = reference_latents[:, None].repeat(1, num_frames, 1, 1, 1)  # (1, F, C, h, w)

        # 2. What each half of the batch keeps ([uncond; cond] when guided); micro-conditioning unchanged.
        conditions = guidance_conditions(1, control_scale, guided, device=device)
        batch = len(conditions.control_scale)
        image_embeddings, reference_latents = conditions.apply(
            image_embeddings.repeat(batch, 1, 1), reference_latents.repeat(batch, 1, 1, 1, 1)
        )
        time_ids = added_time_ids(
            fps, motion_bucket_id, noise_aug_strength, batch, image_embeddings.dtype, device
        )
        pose = None
        if use_control:
            pose = fit_frames(poses, height, width).to(device=device, dtype=torch.float32) / 255.0
            pose = pose[None].repeat(batch, 1, 1, 1, 1)  # (batch, F, 3, H, W) in [0, 1]
        model = ControlNeXtSVD(self.unet, self.controlnext) if use_control else None

        # 3. Steps and the initial noise.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(
            1,
            num_frames,
            self.unet.config.in_channels,
            height,
            width,
            image_embeddings.dtype,
            device,
            generator,
            latents,
        )  # (1, F, C, h, w)
        guidance = guidance_ramp(num_frames, min_guidance_scale, max_guidance_scale).to(device, latents.dtype)
        weights = blend_weights(windows, num_frames).to(device, latents.dtype)  # (W, F)

        # 4. Denoise: per step, every window's (guided) prediction, blended, then one scheduler step.
        self._num_timesteps = len(self.scheduler.timesteps)
        with self.progress_bar(total=len(self.scheduler.timesteps)) as progress:
            for t in self.scheduler.timesteps:
                scaled = self.scheduler.scale_model_input(latents, t)  # c_in * x
                prediction = torch.zeros_like(latents)
                for w, window in enumerate(windows):
                    frames = slice(window.start, window.stop)
                    sample = scaled[:, frames].repeat(batch, 1, 1, 1, 1)
                    sample = torch.cat([sample, reference_latents[:, frames]], dim=2)  # (2B, Fw, 2C, h, w)
                    inputs = dict(
                        encoder_hidden_states=image_embeddings, added_time_ids=time_ids, return_dict=False
                    )
                    if model is None:
                        output = self.unet(sample, t, **inputs)[0]
                    else:
                        scale = conditions.control_scale.to(device, sample.dtype)
                        output = model(sample, t, pose_frames=pose[:, frames], control_scale=scale, **inputs)[
                            0
                        ]
                    if guided:
                        output = apply_guidance(output, guidance[frames])
                    prediction[:, frames] += append_dims(weights[w, frames], 4) * output
                latents = self.scheduler.step(prediction, t, latents).prev_sample
                progress.update()

        # 5. Decode in chunks of frames.
        if output_type == "latent":
            frames = latents
        else:
            frames = self.decode_latents(latents, num_frames, decode_chunk_size)  # (1, 3, F, H, W)
            frames = self.video_processor.postprocess_video(video=frames, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return frames
        return StableVideoDiffusionPipelineOutput(frames=frames)

    # Pieces of __call__ that follow diffusers' own handling (preprocessing, fp16 upcasting).

    def _vae_input(self, original, reference: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1]: diffusers' preprocessing of the reference (a PIL image stays PIL)."""
        same = isinstance(original, PIL.Image.Image) and original.size == (
            reference.shape[3],
            reference.shape[2],
        )
        image = original.convert("RGB") if same else reference
        return self.video_processor.preprocess(image, height=height, width=width)

    def _encode_reference(self, image: torch.Tensor) -> torch.Tensor:
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(dtype=torch.float32)
        latents = encode_reference(self.vae, image)
        if upcast:
            self.vae.to(dtype=torch.float16)
        return latents
