"""cnx.edm: sigma samplers, preconditioning, denoiser and loss, checked against diffusers' SVD scheduler.

Pitfall numbers refer to docs/pitfalls.md.
"""

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from cnx import edm
from cnx.tiny import SVD_XT_SCHEDULER_CONFIG


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_append_dims_broadcasts_per_sample_values_over_video_latents():
    sigma = torch.tensor([1.0, 2.0])
    assert edm.append_dims(sigma, 5).shape == (2, 1, 1, 1, 1)
    assert edm.append_dims(sigma, 1).shape == (2,)
    with pytest.raises(ValueError, match="rank"):
        edm.append_dims(torch.ones(2, 3), 1)


def test_pitfall_13_sampler_medians_lognormal_2_vs_cosine_interpolated_0_71():
    """Pitfall 13: the original sampler (sigma_data 0.5) trains around sigma 0.71, log-normal around 2.0."""
    n = 200_000
    lognormal = edm.sample_sigmas(n, "lognormal", _generator(1))
    cosine = edm.sample_sigmas(n, "cosine_interpolated", _generator(2))
    assert lognormal.median().item() == pytest.approx(math.exp(0.7), rel=0.02)
    # The spread is pinned too (P_std = 1.6): the std of ln sigma and the 5% / 95% quantiles.
    assert lognormal.log().std().item() == pytest.approx(1.6, rel=0.02)
    tails = torch.quantile(lognormal, torch.tensor([0.05, 0.95]))
    expected_tails = torch.exp(0.7 + torch.tensor([-1.645, 1.645]) * 1.6)
    torch.testing.assert_close(tails, expected_tails, rtol=0.05, atol=0)
    assert cosine.median().item() == pytest.approx(0.71, rel=0.02)
    # The tails pin how the two shifted cosines are blended (a swapped blend has the same median):
    # reference quantiles of the original code's sampler at 5%, 25%, 75% and 95%.
    quantiles = edm.cosine_interpolated_sigma(torch.tensor([0.05, 0.25, 0.75, 0.95]))
    torch.testing.assert_close(quantiles, torch.tensor([0.043, 0.249, 2.04, 11.99]), rtol=0.03, atol=0)
    # The default is the sampler that matches the sigma_data = 1 preconditioning.
    assert torch.equal(
        edm.sample_sigmas(64, generator=_generator(3)), edm.lognormal_sigmas(64, _generator(3))
    )
    # Configurable log-normal parameters reach the draw.
    shifted = edm.sample_sigmas(n, "lognormal", _generator(4), p_mean=-1.0, p_std=0.5)
    assert shifted.median().item() == pytest.approx(math.exp(-1.0), rel=0.02)
    assert shifted.log().std().item() == pytest.approx(0.5, rel=0.02)
    for sigmas in (lognormal, cosine, shifted):
        assert sigmas.dtype == torch.float32 and sigmas.shape == (n,)


def test_cosine_interpolated_schedule_spans_svd_range_monotonically():
    t = torch.linspace(0, 1, 1001)
    sigma = edm.cosine_interpolated_sigma(t)
    assert sigma[0].item() == pytest.approx(edm.SIGMA_MIN, rel=1e-4)
    assert sigma[-1].item() == pytest.approx(edm.SIGMA_MAX, rel=1e-4)
    assert bool((sigma[1:] > sigma[:-1]).all())
    # At t = 1/2 the two shifted curves sit at about sigma_data and 2 * sigma_data: the blend is ~ sqrt(2)/2.
    assert edm.cosine_interpolated_sigma(torch.tensor(0.5)).item() == pytest.approx(
        0.5 * math.sqrt(2), rel=0.01
    )
    draws = edm.sample_sigmas(10_000, "cosine_interpolated", _generator(5))
    assert draws.min().item() >= edm.SIGMA_MIN and draws.max().item() <= edm.SIGMA_MAX


def test_sample_sigmas_rejects_missing_generator_and_unknown_kind():
    with pytest.raises(ValueError, match="Generator"):
        edm.sample_sigmas(4, "lognormal", None)
    with pytest.raises(ValueError, match="unknown sigma sampler 'uniform'"):
        edm.sample_sigmas(4, "uniform", _generator())


def test_pitfall_10_samplers_use_only_the_generator_passed_in():
    """Pitfall 10: no draw touches torch's global RNG; the same generator seed repeats the draw."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    latents = torch.zeros(2, 3, 4, 5, 6)
    a = (edm.sample_sigmas(8, "lognormal", _generator(7)), edm.gaussian_noise(latents, _generator(8)))
    b = (
        edm.sample_sigmas(8, "cosine_interpolated", _generator(7)),
        edm.gaussian_noise(latents, _generator(8)),
    )
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a[1], b[1]) and a[1].shape == latents.shape and a[1].dtype == torch.float32
    assert torch.equal(edm.sample_sigmas(8, "lognormal", _generator(7)), a[0])
    assert not torch.equal(edm.sample_sigmas(8, "lognormal", _generator(9)), a[0])


def test_precondition_is_svd_v_prediction_with_sigma_data_1():
    sigma = torch.tensor([0.002, 0.5, 1.0, 2.0, 80.0, 700.0])
    c_skip, c_out, c_in, c_noise = edm.precondition(sigma)
    s = sigma.double()
    torch.testing.assert_close(c_skip.double(), 1 / (s**2 + 1), rtol=1e-6, atol=0)
    torch.testing.assert_close(c_out.double(), -s / (s**2 + 1).sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(c_in.double(), 1 / (s**2 + 1).sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(c_noise.double(), 0.25 * s.log(), rtol=1e-6, atol=1e-7)
    # sigma_data = 1 identities: c_skip = c_in^2 and c_skip + c_out^2 = 1 (the target has unit variance).
    torch.testing.assert_close(c_skip, c_in**2)
    torch.testing.assert_close(c_skip + c_out**2, torch.ones_like(sigma))
    # The loss weight undoes c_out^2.
    torch.testing.assert_close(edm.loss_weight(sigma) * c_out**2, torch.ones_like(sigma))


def test_pitfall_11_bf16_inputs_give_float32_coefficients_and_loss():
    """Pitfall 11: sigmas, coefficients, denoised latents and the loss stay float32 under bf16 models."""
    sigma32 = edm.sample_sigmas(16, "lognormal", _generator(11))
    sigma16 = sigma32.to(torch.bfloat16)
    # Reference values in float64 from the formulas, for the (bf16-representable) sigmas given.
    s = sigma16.double()
    expected = {
        "c_skip": 1 / (s**2 + 1),
        "c_out": -s / (s**2 + 1).sqrt(),
        "c_in": 1 / (s**2 + 1).sqrt(),
        "c_noise": 0.25 * s.log(),
        "loss_weight": (1 + s**2) / s**2,
    }
    ours = dict(zip(expected, (*edm.precondition(sigma16), edm.loss_weight(sigma16)), strict=True))
    for name, value in ours.items():
        assert value.dtype == torch.float32, name
        # float32 precision: any of them computed in bf16 is off by ~1e-3 relative.
        torch.testing.assert_close(
            value.double(), expected[name], rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )

    latents = torch.randn(2, 3, 4, 6, 5, generator=_generator(12)).to(torch.bfloat16)
    output = torch.randn(2, 3, 4, 6, 5, generator=_generator(13)).to(torch.bfloat16)
    sigma = sigma32[:2]
    noisy = edm.add_noise(latents, sigma, output)
    denoised = edm.denoise(latents, output, sigma)
    loss = edm.denoising_loss(denoised, latents, sigma)
    assert noisy.dtype == denoised.dtype == loss.dtype == torch.float32
    assert edm.scale_input(latents, sigma).dtype == torch.float32
    torch.testing.assert_close(denoised, edm.denoise(latents.float(), output.float(), sigma), rtol=0, atol=0)


def _svd_scheduler(num_inference_steps: int | None = None) -> EulerDiscreteScheduler:
    scheduler = EulerDiscreteScheduler(**SVD_XT_SCHEDULER_CONFIG)
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    return scheduler


def test_c_noise_equals_diffusers_continuous_timesteps():
    """SVD's scheduler gives the UNet 0.25 ln(sigma) as its timestep, for training and sampling sigmas."""
    for scheduler in (_svd_scheduler(), _svd_scheduler(25)):
        sigmas = scheduler.sigmas[: len(scheduler.timesteps)]
        _, _, _, c_noise = edm.precondition(sigmas)
        torch.testing.assert_close(c_noise, scheduler.timesteps.to(torch.float32), rtol=1e-6, atol=1e-6)


def test_scale_model_input_and_v_prediction_step_agree_with_diffusers():
    """Walk SVD's sampler: each step's input scaling is c_in * x, its denoised latents c_skip x + c_out F."""
    scheduler = _svd_scheduler(12)
    generator = _generator(21)
    x = torch.randn(1, 3, 4, 6, 5, generator=generator) * scheduler.init_noise_sigma  # (B, F, C, H, W)
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].reshape(1)
        scaled = scheduler.scale_model_input(x, t)
        torch.testing.assert_close(scaled, edm.scale_input(x, sigma), rtol=1e-5, atol=1e-6)
        model_output = torch.randn(x.shape, generator=generator)  # any network output F(x)
        out = scheduler.step(model_output, t, x)
        torch.testing.assert_close(
            out.pred_original_sample, edm.denoise(x, model_output, sigma), rtol=1e-5, atol=1e-5
        )
        x = out.prev_sample


def test_exact_v_target_gives_zero_loss_and_the_loss_is_the_error_on_f():
    generator = _generator(31)
    latents = torch.randn(4, 3, 4, 6, 5, generator=generator)  # (B, F, C, H, W)
    noise = torch.randn(latents.shape, generator=generator)
    sigma = torch.tensor([0.01, 0.7, 2.0, 300.0])
    noisy = edm.add_noise(latents, sigma, noise)
    target = edm.v_target(latents, noise, sigma)
    denoised = edm.denoise(noisy, target, sigma)
    torch.testing.assert_close(denoised, latents, rtol=1e-4, atol=1e-4)
    loss = edm.denoising_loss(denoised, latents, sigma)
    assert loss.shape == (4,)
    assert loss.max().item() < 1e-6
    # Off by delta in F, the weighted loss on D is mean(delta^2): lambda(sigma) * c_out^2 = 1.
    delta = 0.1 * torch.randn(latents.shape, generator=generator)
    loss = edm.denoising_loss(edm.denoise(noisy, target + delta, sigma), latents, sigma)
    torch.testing.assert_close(loss, delta.pow(2).flatten(1).mean(1), rtol=1e-3, atol=1e-6)


def test_add_noise_and_v_target_work_on_image_latents_too():
    latents = torch.randn(2, 4, 6, 5, generator=_generator(32))  # (B, C, H, W)
    noise = torch.randn(latents.shape, generator=_generator(33))
    sigma = torch.tensor([0.5, 5.0])
    noisy = edm.add_noise(latents, sigma, noise)
    torch.testing.assert_close(noisy[1], latents[1] + 5.0 * noise[1])
    torch.testing.assert_close(edm.denoise(noisy, edm.v_target(latents, noise, sigma), sigma), latents)


def test_hand_weights_weights_the_pooled_latent_cells():
    """The weight map is area-pooled to latent size and multiplies the per-cell error."""
    batch, frames, channels, h, w = 2, 3, 4, 2, 3
    latents = torch.zeros(batch, frames, channels, h, w)
    denoised = torch.ones_like(latents)
    sigma = torch.ones(batch)  # lambda = 2
    plain = edm.denoising_loss(denoised, latents, sigma)
    torch.testing.assert_close(plain, torch.full((batch,), 2.0))
    ones = torch.ones(batch, frames, 1, 8 * h, 8 * w)  # (B, F, 1, H, W) pixels
    torch.testing.assert_close(edm.denoising_loss(denoised, latents, sigma, ones), plain)

    mask = ones.clone()
    mask[0, 1, 0, :8, :8] = 5.0  # sample 0, frame 1: the first latent cell's 8x8 pixel patch is a hand
    mask[1, 2, 0, :4, :8] = 5.0  # sample 1: half of that patch
    weighted = edm.denoising_loss(denoised, latents, sigma, mask)
    cells = frames * channels * h * w
    expected = torch.tensor([2.0 * (cells + channels * 4.0) / cells, 2.0 * (cells + channels * 2.0) / cells])
    torch.testing.assert_close(weighted, expected)
    assert edm.pool_to_latent(mask, (h, w)).shape == (batch, frames, 1, h, w)


def test_hand_weights_of_the_wrong_shape_is_a_clear_error():
    latents = torch.zeros(2, 3, 4, 2, 3)
    with pytest.raises(ValueError, match="hand_weights"):
        edm.denoising_loss(latents, latents, torch.ones(2), torch.ones(2, 5, 1, 16, 24))
    with pytest.raises(ValueError, match="differ in shape"):
        edm.denoising_loss(latents, latents[:, :2], torch.ones(2))


def test_check_finite_loss_names_the_step_and_the_sigma():
    edm.check_finite_loss(torch.tensor([0.1, 2.0]), step=3)
    with pytest.raises(FloatingPointError, match=r"step 17.*samples \[1\].*sigma \[0\.25\]"):
        edm.check_finite_loss(torch.tensor([0.1, float("nan")]), step=17, sigma=torch.tensor([3.0, 0.25]))
    with pytest.raises(FloatingPointError, match="step 4"):
        edm.check_finite_loss(torch.tensor(float("inf")), step=4)


def test_lognormal_quantiles_are_ordered_and_centred_on_the_median():
    sigmas = edm.lognormal_quantiles(4)
    assert torch.all(sigmas[1:] > sigmas[:-1])
    assert float(sigmas.log().mean()) == pytest.approx(edm.LOGNORMAL_P_MEAN, abs=1e-5)
    # The median quantile of an odd count is the log-normal's median.
    assert float(edm.lognormal_quantiles(3)[1]) == pytest.approx(math.exp(edm.LOGNORMAL_P_MEAN), rel=1e-5)
