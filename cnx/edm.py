"""The maths of one SVD training step: noise levels, preconditioning, denoiser and loss.

Stable Video Diffusion is an EDM-style denoiser (Karras et al. 2022) with a
v-prediction network F. Given clean latents y, a noise level sigma and
Gaussian noise n, training builds x = y + sigma * n and asks

    D(x; sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x; c_noise(sigma))

to equal y. Every function here is pure and shape-agnostic: sigma has one
entry per sample, shape (B,), and is broadcast against latents of any rank
((B, F, C, H, W) for video, (B, C, H, W) for images) by `append_dims`.

Precision: sigmas, coefficients and the loss are always float32, even when the
model runs in bf16 or fp16. In bf16, 0.25 * ln(sigma) keeps only 8 bits of
mantissa, so nearby noise levels collapse onto the same timestep and
(1 + sigma^2) / sigma^2 loses about two significant digits.

Randomness always comes from a `torch.Generator` passed in, never from torch's
global generator, so each rank of a multi-GPU run draws its own stream
(see `cnx.conditioning.rank_generator`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# SVD-xt's noise range (its EulerDiscreteScheduler's sigma_min / sigma_max).
SIGMA_MIN = 0.002
SIGMA_MAX = 700.0

# Log-normal sigma sampler: ln(sigma) ~ N(P_mean, P_std^2); median exp(0.7) ~= 2.0.
# The values SVD fine-tuning projects use with SVD's sigma_data = 1 preconditioning.
LOGNORMAL_P_MEAN = 0.7
LOGNORMAL_P_STD = 1.6

# The original training code's "cosine interpolated" sampler, kept for comparison (median ~= 0.71).
COSINE_IMAGE_D = 64  # resolution the schedule is calibrated for
COSINE_NOISE_D_LOW = 32  # schedule shifted as for a 32-pixel image: more noise, used at high noise
COSINE_NOISE_D_HIGH = 64  # schedule shifted as for a 64-pixel image: no shift, used at low noise
COSINE_SIGMA_DATA = 0.5  # the data std this sampler assumes (SVD's preconditioning assumes 1)

SIGMA_SAMPLERS = ("lognormal", "cosine_interpolated")


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a (B,) tensor broadcasts against a tensor of rank `ndim`."""
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"cannot broadcast a tensor of rank {x.ndim} to rank {ndim}")
    return x[(...,) + (None,) * missing]


def _as_float32(sigma: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(sigma).to(torch.float32)


# ---------------------------------------------------------------------------
# Sigma samplers
# ---------------------------------------------------------------------------


def lognormal_sigmas(
    n: int, generator: torch.Generator, p_mean: float = LOGNORMAL_P_MEAN, p_std: float = LOGNORMAL_P_STD
) -> torch.Tensor:
    """(n,) float32 sigmas with ln(sigma) ~ N(p_mean, p_std^2), on the generator's device."""
    normal = torch.randn(n, generator=generator, device=generator.device, dtype=torch.float32)
    return torch.exp(p_mean + p_std * normal)


def lognormal_quantiles(
    count: int, p_mean: float = LOGNORMAL_P_MEAN, p_std: float = LOGNORMAL_P_STD
) -> torch.Tensor:
    """(count,) fixed sigmas for held-out losses: the log-normal's quantiles at (i + 0.5) / count."""
    q = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    normal = math.sqrt(2.0) * torch.erfinv(2 * q - 1)
    return torch.exp(p_mean + p_std * normal).float()


def cosine_interpolated_sigma(
    t: torch.Tensor,
    image_d: float = COSINE_IMAGE_D,
    noise_d_low: float = COSINE_NOISE_D_LOW,
    noise_d_high: float = COSINE_NOISE_D_HIGH,
    sigma_data: float = COSINE_SIGMA_DATA,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
) -> torch.Tensor:
    """The cosine-interpolated schedule as a function of t in [0, 1] (0: sigma_min, 1: sigma_max).

    Work in log signal-to-noise ratio relative to the data, logsnr = -2 ln(sigma / sigma_data).
    A cosine schedule spanning [logsnr_lo, logsnr_hi] is logsnr(t) = -2 ln tan(a + t (b - a)),
    a = atan(exp(-logsnr_hi / 2)), b = atan(exp(-logsnr_lo / 2)). "Shifting" it for a
    resolution noise_d adds s = 2 ln(noise_d / image_d) to the logsnr (s < 0 means more noise:
    a smaller image needs less noise to destroy), with the range pre-shifted so the endpoints
    stay at sigma_min and sigma_max. The interpolated schedule blends the two shifted curves,
    weighting the noise_d_low one by t: (1 - t) * high(t) + t * low(t).
    """
    t = _as_float32(t).to(torch.float64)  # float64 inside: tan near pi/2 is steep
    logsnr_hi = -2.0 * math.log(sigma_min / sigma_data)  # least noise
    logsnr_lo = -2.0 * math.log(sigma_max / sigma_data)  # most noise

    def shifted_cosine(noise_d: float) -> torch.Tensor:
        shift = 2.0 * math.log(noise_d / image_d)
        a = math.atan(math.exp(-0.5 * (logsnr_hi - shift)))
        b = math.atan(math.exp(-0.5 * (logsnr_lo - shift)))
        return -2.0 * torch.log(torch.tan(a + t * (b - a))) + shift

    logsnr = torch.lerp(shifted_cosine(noise_d_high), shifted_cosine(noise_d_low), t)
    sigma = sigma_data * torch.exp(-0.5 * logsnr)
    return sigma.clamp(sigma_min, sigma_max).to(torch.float32)


def cosine_interpolated_sigmas(n: int, generator: torch.Generator, **schedule: float) -> torch.Tensor:
    """(n,) float32 sigmas from the cosine-interpolated schedule at uniform t (the original code's sampler).

    The original code stratified t over the batch; that changes which sample gets which
    sigma, not the distribution of sigmas, so plain uniform t is used here.
    """
    t = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float32)
    return cosine_interpolated_sigma(t, **schedule)


def sample_sigmas(
    n: int,
    kind: str = "lognormal",
    generator: torch.Generator | None = None,
    p_mean: float = LOGNORMAL_P_MEAN,
    p_std: float = LOGNORMAL_P_STD,
) -> torch.Tensor:
    """(n,) float32 training noise levels, one per sample, drawn from `generator` only.

    `kind="lognormal"` (default) matches SVD's sigma_data = 1 preconditioning;
    `"cosine_interpolated"` is the original code's sampler, whose sigma_data = 0.5 does not
    (pitfall 13 in docs/pitfalls.md).
    """
    if generator is None:
        raise ValueError(
            "sample_sigmas needs an explicit torch.Generator (no global RNG; see rank_generator)"
        )
    if kind == "lognormal":
        return lognormal_sigmas(n, generator, p_mean, p_std)
    if kind == "cosine_interpolated":
        return cosine_interpolated_sigmas(n, generator)
    raise ValueError(f"unknown sigma sampler {kind!r}; choose one of {SIGMA_SAMPLERS}")


def gaussian_noise(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 standard normal noise of `like`'s shape, drawn from `generator`, on `like`'s device."""
    noise = torch.randn(like.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(like.device)


# ---------------------------------------------------------------------------
# Preconditioning and the denoiser
# ---------------------------------------------------------------------------


def precondition(
    sigma: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD's v-prediction preconditioning: (c_skip, c_out, c_in, c_noise), float32, shaped like sigma.

    c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1) and
    c_in = 1 / sqrt(sigma^2 + 1) are EDM's formulas with sigma_data = 1: they
    make the network's input and its training target unit-variance *if the
    clean latents have std 1*. c_noise = 0.25 ln sigma does not involve
    sigma_data; it is the "timestep" the UNet is given (diffusers' continuous
    timesteps for v-prediction).

    The sigma sampler must assume the same sigma_data: the sampler decides at
    which noise levels the network is trained, and the noise level where
    denoising is hardest (signal and noise of equal size) is sigma = sigma_data.
    A sampler built for sigma_data = 0.5 concentrates training around sigma ~ 0.7,
    about a third of the log-normal median 2.0 that suits these coefficients,
    under-training the high noise levels every sample starts from (pitfall 13).
    """
    sigma = _as_float32(sigma)
    c_skip = 1.0 / (sigma**2 + 1.0)
    c_out = -sigma / torch.sqrt(sigma**2 + 1.0)
    c_in = 1.0 / torch.sqrt(sigma**2 + 1.0)
    c_noise = 0.25 * torch.log(sigma)
    return c_skip, c_out, c_in, c_noise


def add_noise(latents: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Noisy latents x = latents + sigma * noise, float32; sigma (B,) broadcast over (B, ...)."""
    sigma = append_dims(_as_float32(sigma), latents.ndim)
    return latents.to(torch.float32) + sigma * noise.to(torch.float32)


def scale_input(noisy_latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The UNet's input c_in * x (float32; cast to the model's dtype at the call)."""
    _, _, c_in, _ = precondition(sigma)
    return append_dims(c_in, noisy_latents.ndim) * noisy_latents.to(torch.float32)


def denoise(noisy_latents: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Denoised latents D = c_skip * x + c_out * F, in float32 whatever the model's dtype."""
    c_skip, c_out, _, _ = precondition(sigma)
    c_skip, c_out = append_dims(c_skip, noisy_latents.ndim), append_dims(c_out, noisy_latents.ndim)
    return c_skip * noisy_latents.to(torch.float32) + c_out * model_output.to(torch.float32)


def v_target(latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact network output F = (noise - sigma * latents) / sqrt(sigma^2 + 1), float32.

    Solving c_skip * (y + sigma n) + c_out * F = y for F gives the usual
    v-prediction target; a model that outputs it has zero loss.
    """
    sigma = append_dims(_as_float32(sigma), latents.ndim)
    return (noise.to(torch.float32) - sigma * latents.to(torch.float32)) / torch.sqrt(sigma**2 + 1.0)


# ---------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------


def loss_weight(sigma: torch.Tensor | float) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 with sigma_data = 1, float32.

    It equals 1 / c_out^2, so the weighted error on D is exactly the unweighted
    error on the network output F: every noise level contributes on one scale.
    """
    sigma = _as_float32(sigma)
    return (1.0 + sigma**2) / sigma**2


def pool_to_latent(hand_weights: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Average-pool a pixel-size weight map (..., H, W) to the latents' (..., h, w), float32.

    Average pooling keeps the map's mean, so a hand covering a quarter of an
    8x8 pixel patch raises that latent's weight by a quarter of the hand weight.
    """
    *lead, height, width = hand_weights.shape
    pooled = F.adaptive_avg_pool2d(hand_weights.to(torch.float32).reshape(-1, 1, height, width), latent_size)
    return pooled.reshape(*lead, *latent_size)


def denoising_loss(
    denoised: torch.Tensor,
    latents: torch.Tensor,
    sigma: torch.Tensor,
    hand_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) float32 per-sample loss: mean of lambda(sigma) * (D - y)^2 * hand weight.

    `hand_weights` is a pixel-size *weight map* broadcastable to the latents after
    pooling, e.g. (B, F, 1, H, W) for (B, F, C, h, w) latents: 1 away from
    hands, larger on hands (the data pipeline's 1 + 4 * 0.8 = 4.2), so small hands
    count more than their area. None weighs every position 1.
    """
    if denoised.shape != latents.shape:
        raise ValueError(
            f"denoised {tuple(denoised.shape)} and latents {tuple(latents.shape)} differ in shape"
        )
    error = (denoised.to(torch.float32) - latents.to(torch.float32)) ** 2
    error = append_dims(loss_weight(sigma), latents.ndim) * error
    if hand_weights is not None:
        weight = pool_to_latent(hand_weights, tuple(latents.shape[-2:]))
        try:
            error = error * weight
        except RuntimeError as err:
            raise ValueError(
                f"hand_weights {tuple(hand_weights.shape)} pooled to {tuple(weight.shape)} does not "
                f"broadcast against latents {tuple(latents.shape)}"
            ) from err
        if error.shape != latents.shape:
            raise ValueError(
                f"hand_weights {tuple(hand_weights.shape)} would broadcast latents {tuple(latents.shape)} "
                f"to {tuple(error.shape)}"
            )
    return error.reshape(error.shape[0], -1).mean(dim=1)


def check_finite_loss(
    loss: torch.Tensor, step: int, sigma: torch.Tensor | None = None, what: str = "loss"
) -> None:
    """Raise FloatingPointError naming the step (and the offending samples' sigmas) on NaN or inf.

    `what` names the value in the message (the trainer checks the gradient norm the same way).
    """
    finite = torch.isfinite(loss)
    if bool(finite.all()):
        return
    bad = (~finite).reshape(-1).nonzero().reshape(-1).tolist()
    message = f"non-finite {what} at step {step}: values {loss.detach().reshape(-1).tolist()}"
    if loss.ndim > 0:
        message += f", samples {bad}"
        if sigma is not None:
            message += f" with sigma {[float(s) for s in sigma.reshape(-1)[bad]]}"
    raise FloatingPointError(message)
