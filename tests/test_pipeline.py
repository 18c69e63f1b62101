"""ControlNeXtSVDPipeline: diffusers' SVD pipeline plus the control, windows and guidance as trained."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline

from cnx import conditioning
from cnx.controlnext import ControlNeXt, ControlNeXtSVD, controlnext_config_for
from cnx.pipeline import (
    ControlNeXtSVDPipeline,
    apply_guidance,
    blend_weights,
    frame_windows,
    guidance_conditions,
    guidance_ramp,
)

H, W, F = 48, 32, 5  # output size and frames: latents (F, 4, 6, 4)


@pytest.fixture(scope="module")
def controlnext():
    torch.manual_seed(0)
    return ControlNeXt(**controlnext_config_for(32)).eval()


@pytest.fixture(scope="module")
def svd(tiny_svd_dir):
    pipe = StableVideoDiffusionPipeline.from_pretrained(tiny_svd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_svd_dir, controlnext):
    pipe = ControlNeXtSVDPipeline.from_pretrained(tiny_svd_dir, controlnext=controlnext)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    reference = PIL.Image.fromarray(rng.integers(0, 256, (2 * H, 2 * W, 3), dtype=np.uint8))  # same aspect
    poses = rng.integers(0, 256, (F, H, W, 3), dtype=np.uint8)
    latents = torch.randn(1, F, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(1))
    return reference, poses, latents


def run(pipe, inputs, seed=5, **kwargs):
    reference, poses, latents = inputs
    kwargs = {"height": H, "width": W, "num_inference_steps": 2, "output_type": "np", **kwargs}
    return pipe(
        reference, poses, generator=torch.Generator().manual_seed(seed), latents=latents, **kwargs
    ).frames


# ---------------------------------------------------------------------------------------------
# The small pieces


@pytest.mark.parametrize(
    "num_frames, per_batch, overlap", [(5, 8, 4), (8, 8, 4), (9, 8, 4), (30, 14, 4), (21, 7, 0), (13, 5, 4)]
)
def test_windows_cover_every_frame_share_overlap_and_end_at_the_last_frame(num_frames, per_batch, overlap):
    windows = frame_windows(num_frames, per_batch, overlap)
    covered = sorted({i for w in windows for i in w})
    assert covered == list(range(num_frames))
    assert windows[0].start == 0 and windows[-1].stop == num_frames
    assert all(len(w) == min(per_batch, num_frames) for w in windows)
    for before, after in zip(windows, windows[1:], strict=False):
        assert before.stop - after.start >= overlap  # neighbours share at least `overlap` frames
    if num_frames <= per_batch:
        assert windows == [range(num_frames)]


def test_windows_reject_an_overlap_as_long_as_the_window():
    with pytest.raises(ValueError, match="overlap"):
        frame_windows(20, 4, 4)
    with pytest.raises(ValueError, match="positive"):
        frame_windows(0, 4, 1)


def test_blend_weights_sum_to_one_per_frame_and_vanish_outside_a_window():
    windows = frame_windows(30, 14, 4)
    weights = blend_weights(windows, 30)  # (W, F)
    torch.testing.assert_close(weights.sum(0), torch.ones(30))
    for w, window in enumerate(windows):
        outside = [i for i in range(30) if i not in window]
        assert (weights[w, outside] == 0).all() and (weights[w, window.start : window.stop] > 0).all()
    # In an overlap the window whose middle is nearer gets more weight.
    first, second = windows[0], windows[1]
    assert weights[0, second.start] > weights[1, second.start]
    assert weights[1, first.stop - 1] > weights[0, first.stop - 1]
    assert torch.equal(blend_weights([range(6)], 6), torch.ones(1, 6))


def test_guidance_rises_linearly_from_first_to_last_frame_and_mixes_as_cfg():
    ramp = guidance_ramp(5, 1.0, 3.0)
    torch.testing.assert_close(ramp, torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))
    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 1, 5, 4, 3, 2, generator=g)
    mixed = apply_guidance(torch.cat([uncond, cond]), ramp)
    for t in range(5):
        torch.testing.assert_close(mixed[0, t], uncond[0, t] + ramp[t] * (cond[0, t] - uncond[0, t]))
    torch.testing.assert_close(mixed[0, 0], cond[0, 0])  # weight 1 is the conditional prediction


def test_unconditional_half_is_the_dropout_trainings_drop_all():
    """Pitfall 12: guidance's unconditional input is the one conditioning dropout trains."""
    both = guidance_conditions(2, 0.3, guided=True)
    drop = conditioning.ConditioningDropout.drop_all(2)
    keep = conditioning.ConditioningDropout.keep_all(2, control_scale=0.3)
    assert torch.equal(
        both.keep_image_embedding, torch.cat([drop.keep_image_embedding, keep.keep_image_embedding])
    )
    assert torch.equal(
        both.keep_reference_latent, torch.cat([drop.keep_reference_latent, keep.keep_reference_latent])
    )
    torch.testing.assert_close(both.control_scale, torch.tensor([0.0, 0.0, 0.3, 0.3]))
    assert both.unconditional.tolist() == [True, True, False, False]
    assert guidance_conditions(2, 0.3, guided=False).control_scale.tolist() == pytest.approx([0.3, 0.3])


# ---------------------------------------------------------------------------------------------
# Agreement with diffusers


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"fps": 12, "motion_bucket_id": 40, "noise_aug_strength": 0.1},
        {"min_guidance_scale": 2.0, "max_guidance_scale": 4.0, "num_inference_steps": 3},
        {"max_guidance_scale": 1.0, "fps": 3},  # no guidance
    ],
)
def test_control_off_equals_diffusers_svd_pipeline(svd, pipe, inputs, tiny_svd_dir, options):
    """Nothing but the control is added: with it off, the same frames as StableVideoDiffusionPipeline."""
    reference, poses, latents = inputs
    kwargs = {"height": H, "width": W, "num_inference_steps": 2, "output_type": "np", **options}
    expected = svd(
        reference, num_frames=F, generator=torch.Generator().manual_seed(5), latents=latents, **kwargs
    ).frames
    off = run(pipe, inputs, control_scale=0.0, **options)
    np.testing.assert_allclose(off, expected, atol=1e-6)
    bare = ControlNeXtSVDPipeline.from_pretrained(tiny_svd_dir)  # no ControlNeXt at all
    bare.set_progress_bar_config(disable=True)
    assert bare.controlnext is None
    np.testing.assert_allclose(run(bare, inputs, **options), expected, atol=1e-6)
    assert np.abs(run(pipe, inputs, control_scale=0.5, **options) - expected).max() > 1e-3  # control acts


# ---------------------------------------------------------------------------------------------
# What reaches the UNet


class Spy:
    """Records every UNet call of the pipeline (and ControlNeXtSVD's control scale)."""

    def __init__(self, pipe, monkeypatch):
        self.unet_calls, self.scales = [], []
        unet_forward = type(pipe.unet).forward
        wrapper_forward = ControlNeXtSVD.forward

        def record_unet(module, sample, timestep, encoder_hidden_states, added_time_ids, **kw):
            self.unet_calls.append((sample.clone(), encoder_hidden_states.clone(), added_time_ids.clone()))
            return unet_forward(module, sample, timestep, encoder_hidden_states, added_time_ids, **kw)

        def record_scale(module, *args, control_scale=None, **kw):
            self.scales.append(torch.as_tensor(control_scale).clone())
            return wrapper_forward(module, *args, control_scale=control_scale, **kw)

        monkeypatch.setattr(type(pipe.unet), "forward", record_unet)
        monkeypatch.setattr(ControlNeXtSVD, "forward", record_scale)


def test_one_batched_unet_call_per_step_and_window_with_the_trained_unconditional_input(
    pipe, inputs, monkeypatch
):
    spy = Spy(pipe, monkeypatch)
    reference, poses, latents = inputs
    long_poses = np.concatenate([poses, poses])  # 10 frames in windows of 4 sharing 2: 4 windows
    pipe(
        reference,
        long_poses,
        height=H,
        width=W,
        num_inference_steps=2,
        frames_per_batch=4,
        overlap=2,
        control_scale=0.4,
        max_guidance_scale=2.0,
        output_type="latent",
    )
    assert len(spy.unet_calls) == 2 * len(frame_windows(10, 4, 2)) == 8
    for sample, embeddings, _ in spy.unet_calls:
        assert sample.shape[:2] == (2, 4)  # [uncond; cond] in one call, one window of frames
        assert (embeddings[0] == 0).all() and (embeddings[1] != 0).any()  # CLIP embedding dropped
        assert (sample[0, :, 4:] == 0).all() and (sample[1, :, 4:] != 0).any()  # reference latent dropped
    assert all(s.tolist() == pytest.approx([0.0, 0.4]) for s in spy.scales)  # control off in the uncond half


def test_no_guidance_skips_the_unconditional_half(pipe, inputs, monkeypatch):
    spy = Spy(pipe, monkeypatch)
    run(pipe, inputs, max_guidance_scale=1.0, output_type="latent")
    assert [sample.shape[0] for sample, _, _ in spy.unet_calls] == [1, 1]


def test_pitfall_14_callers_micro_conditioning_and_control_scale_reach_the_unet(pipe, inputs, monkeypatch):
    """Pitfall 14: no fps/motion-bucket override, and the caller's control scale is used."""
    spy = Spy(pipe, monkeypatch)
    run(
        pipe,
        inputs,
        fps=11,
        motion_bucket_id=33,
        noise_aug_strength=0.07,
        control_scale=0.9,
        output_type="latent",
    )
    for _, _, time_ids in spy.unet_calls:
        torch.testing.assert_close(time_ids, torch.tensor([[10.0, 33.0, 0.07]] * 2))
    assert spy.scales[0].tolist() == pytest.approx([0.0, 0.9])
    spy.unet_calls.clear()
    run(pipe, inputs, output_type="latent")  # the defaults are training's
    expected = [conditioning.DEFAULT_FPS - 1, conditioning.DEFAULT_MOTION_BUCKET_ID]
    assert spy.unet_calls[0][2][0, :2].tolist() == expected
    assert spy.unet_calls[0][2][0, 2].item() == pytest.approx(conditioning.DEFAULT_NOISE_AUG_STRENGTH)
    assert spy.scales[-1].tolist() == pytest.approx([0.0, conditioning.DEFAULT_CONTROL_SCALE])


# ---------------------------------------------------------------------------------------------
# Long videos, inputs, outputs


def test_a_sequence_that_fits_one_window_gives_the_one_window_result(pipe, inputs):
    one = run(pipe, inputs, frames_per_batch=F)
    torch.testing.assert_close(
        torch.from_numpy(run(pipe, inputs, frames_per_batch=F + 3)), torch.from_numpy(one)
    )
    assert not np.array_equal(run(pipe, inputs, frames_per_batch=3, overlap=1), one)  # windows do change it


def test_pose_and_reference_formats_give_the_same_video(pipe, inputs):
    reference, poses, latents = inputs
    expected = run(pipe, inputs, output_type="pt")
    as_pil = [PIL.Image.fromarray(p) for p in poses]
    as_tensor = torch.from_numpy(poses).permute(0, 3, 1, 2).float() / 255
    for pose in (as_pil, as_tensor):
        got = run(pipe, (reference, pose, latents), output_type="pt")
        torch.testing.assert_close(got, expected)
    small = reference.resize((W, H))  # at the output size no resize differs between PIL and arrays
    expected = run(pipe, (small, poses, latents), output_type="pt")
    for ref in (np.array(small), torch.from_numpy(np.array(small)).permute(2, 0, 1).float() / 255):
        # PIL and array references reach the VAE through diffusers' two preprocessing paths: float noise.
        torch.testing.assert_close(
            run(pipe, (ref, poses, latents), output_type="pt"), expected, atol=1e-4, rtol=0
        )


def test_output_types_and_decoding_in_chunks(pipe, inputs, monkeypatch):
    frames = run(pipe, inputs, output_type="pil")[0]
    assert len(frames) == F and frames[0].size == (W, H)
    assert run(pipe, inputs, output_type="latent").shape == (1, F, 4, H // 8, W // 8)
    decoded = []
    decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z, **kw: decoded.append(len(z)) or decode(z, **kw))
    assert run(pipe, inputs, output_type="np").shape == (1, F, H, W, 3)
    assert decoded == [F]  # all frames at once by default
    decoded.clear()
    run(pipe, inputs, output_type="np", decode_chunk_size=2)
    assert decoded == [2, 2, 1]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"height": 50}, "multiples of 8"),
        ({"output_type": "gif"}, "output_type"),
        ({"poses": np.zeros((0, H, W, 3), np.uint8)}, "empty"),
        ({"poses": np.zeros((F, H, W), np.uint8)}, r"\(F, H, W, 3\)"),
        ({"reference": np.zeros((H, W), np.uint8)}, r"\(H, W, 3\)"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_error(pipe, inputs, change, message):
    reference, poses, latents = inputs
    reference, poses = change.pop("reference", reference), change.pop("poses", poses)
    with pytest.raises(ValueError, match=message):
        pipe(reference, poses, **{"height": H, "width": W, "num_inference_steps": 1, **change})


def test_save_and_load_with_the_controlnext_from_a_path(pipe, inputs, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    again = ControlNeXtSVDPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(again.controlnext, ControlNeXt)
    pipe.controlnext.save_pretrained(tmp_path / "cn")
    from_path = ControlNeXtSVDPipeline.from_pretrained(tmp_path / "pipe", controlnext=tmp_path / "cn")
    for loaded in (again, from_path):
        loaded.set_progress_bar_config(disable=True)
        np.testing.assert_array_equal(run(loaded, inputs), run(pipe, inputs))


# ---------------------------------------------------------------------------------------------
# Driving poses from another person


def dancer_track(seed, width, height, num_frames=6):
    from cnx.synth import dancer_keypoints, random_dancer

    dancer = random_dancer(np.random.default_rng([seed, 0]), num_frames, width=width, height=height)
    points = [dancer_keypoints(dancer, t) for t in range(num_frames)]
    track = {
        name: np.stack([getattr(k, name) for k in points])
        for name in ("body", "body_scores", "hands", "hand_scores")
    }
    return dancer, {**track, "size": np.array([height, width])}


def torso_gap(body, reference_body, size):
    """Mean pixel distance between neck, shoulders and hips of two normalised bodies (18, 2)."""
    torso = [1, 2, 5, 8, 11]
    return np.linalg.norm((body[torso] - reference_body[torso]) * np.array(size[::-1]), axis=1).mean()


def test_align_poses_moves_another_dancers_motion_onto_the_reference_person(pipe, monkeypatch):
    from cnx.pipeline import fit_frames
    from cnx.pose import align_track, render_pose_track
    from cnx.synth import render_frame

    dancer, reference_track = dancer_track(1, 128, 192)
    _, driving = dancer_track(7, 192, 160)  # another dancer, another framing and aspect
    reference_image = render_frame(dancer, 0)[0]  # (192, 128, 3)
    reference_keypoints = {
        "body": reference_track["body"][0],
        "body_scores": reference_track["body_scores"][0],
    }
    aligned = align_track(driving, reference_keypoints, (160, 192), (192, 128))
    before = torso_gap(driving["body"][0], reference_keypoints["body"], (192, 128))
    after = torso_gap(aligned["body"][0], reference_keypoints["body"], (192, 128))
    assert after < 0.25 * before, (before, after)
    assert np.array_equal(aligned["body_scores"], driving["body_scores"]) and aligned["hands"].shape == (
        6,
        2,
        21,
        2,
    )

    # The pipeline draws the aligned track and feeds it to ControlNeXt; a detector may find the keypoints.
    seen = []
    forward = ControlNeXt.forward
    monkeypatch.setattr(
        ControlNeXt, "forward", lambda m, pose, t: seen.append(pose[-1]) or forward(m, pose, t)
    )
    kwargs = {
        "height": 48,
        "width": 32,
        "num_inference_steps": 1,
        "output_type": "latent",
        "align_poses": True,
    }
    pipe(reference_image, driving, reference_keypoints=reference_keypoints, **kwargs)
    given = seen[-1]

    def detector(image):  # a stand-in PoseDetector that finds the reference's keypoints
        return reference_keypoints["body"], reference_keypoints["body_scores"], None, None, None

    pipe(reference_image, driving, pose_detector=detector, **kwargs)
    torch.testing.assert_close(seen[-1], given)
    expected = fit_frames(render_pose_track(aligned, 192, 128), 48, 32).float() / 255
    torch.testing.assert_close(given, expected)
    with pytest.raises(ValueError, match="reference_keypoints or pose_detector"):
        pipe(reference_image, driving, **kwargs)
    with pytest.raises(ValueError, match="driving keypoints"):
        pipe(reference_image, render_pose_track(driving, 160, 192), **kwargs)
