"""`cnx.bf16_adamw`: unbiased stochastic rounding, torch's AdamW maths, and bf16 weights that learn."""

import copy
import io

import pytest
import torch

from cnx.bf16_adamw import BF16AdamW, adamw_update, stochastic_round_to_bf16


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest bf16 value to each float32 and the bf16 value on x's other side (float32 both)."""
    near = x.bfloat16()
    toward = torch.where(near.float() < x, torch.inf, -torch.inf).bfloat16()
    other = torch.where(near.float() == x, near, torch.nextafter(near, toward))
    return near.float(), other.float()


def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, generator=g) * torch.logspace(-3, 3, 500)  # many exponents
    draws = 4000
    rounded = torch.stack([stochastic_round_to_bf16(x, g) for _ in range(draws)]).float()  # (draws, 500)
    near, other = neighbours(x)
    assert ((rounded == near) | (rounded == other)).all()
    # Each draw is off by at most one spacing, so the mean's standard error is below spacing / (2 sqrt N).
    spacing = (other - near).abs()
    error = (rounded.mean(0) - x).abs()
    assert (error <= 6 * spacing / (2 * draws**0.5) + 1e-12).all()
    # Rounding to the nearest would be off by |x - near|: most values here are farther than that bound.
    assert ((x - near).abs() > 6 * spacing / (2 * draws**0.5)).float().mean() > 0.5


def test_stochastic_rounding_keeps_bf16_values_and_infinities_and_repeats_with_its_generator():
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, torch.inf, -torch.inf]).bfloat16().float()
    assert torch.equal(stochastic_round_to_bf16(exact, torch.Generator().manual_seed(1)).float(), exact)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    a = stochastic_round_to_bf16(x, torch.Generator().manual_seed(3))
    b = stochastic_round_to_bf16(x, torch.Generator().manual_seed(3))
    c = stochastic_round_to_bf16(x, torch.Generator().manual_seed(4))
    assert a.dtype == torch.bfloat16 and torch.equal(a, b) and not torch.equal(a, c)
    assert stochastic_round_to_bf16(torch.tensor([torch.nan]), torch.Generator()).isnan().all()
    with pytest.raises(ValueError, match="float32"):
        stochastic_round_to_bf16(x.double(), torch.Generator())


def test_adamw_update_is_torchs_adamw():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 16, generator=g)
    grads = [torch.randn(32, 16, generator=g) for _ in range(5)]
    reference = torch.nn.Parameter(weight.clone())
    torch_adamw = torch.optim.AdamW([reference], lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    mine, exp_avg, exp_avg_sq = weight.clone(), torch.zeros_like(weight), torch.zeros_like(weight)
    for step, grad in enumerate(grads, start=1):
        reference.grad = grad
        torch_adamw.step()
        adamw_update(mine, grad, exp_avg, exp_avg_sq, step, 3e-3, (0.8, 0.99), 1e-6, 0.1)
    torch.testing.assert_close(mine, reference.detach())
    torch.testing.assert_close(exp_avg_sq, torch_adamw.state[reference]["exp_avg_sq"])
    assert not torch.allclose(mine, weight)


def regression_losses(make_optimizer, dtype, steps=300):
    """Loss of a least-squares fit from weights at 1.0 toward targets near 1.0, every 100 steps.

    AdamW moves a weight by about the learning rate (1e-3) a step, under half bf16's spacing at
    1.0 (2^-7): rounded to the nearest, a bf16 weight never moves.
    """
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 64, generator=g)
    targets = inputs @ (1 + 0.1 * torch.randn(64, generator=g))
    weight = torch.nn.Parameter(torch.ones(64, dtype=dtype))
    optimizer = make_optimizer([weight])
    losses = []
    for step in range(steps + 1):
        loss = ((inputs @ weight.float() - targets) ** 2).mean()
        if step % 100 == 0:
            losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def test_bf16_weights_learn_as_float32_ones_with_a_master_copy_or_stochastic_rounding():
    kwargs = dict(lr=1e-3, weight_decay=0.0)
    fp32 = regression_losses(lambda p: torch.optim.AdamW(p, **kwargs), torch.float32)
    nearest = regression_losses(lambda p: torch.optim.AdamW(p, **kwargs), torch.bfloat16)
    master = regression_losses(lambda p: BF16AdamW(p, **kwargs), torch.bfloat16)
    rounded = regression_losses(lambda p: BF16AdamW(p, **kwargs, stochastic_rounding=True), torch.bfloat16)
    assert fp32[-1] < 0.05 * fp32[0]  # the problem is solvable in the steps given
    assert nearest[-1] > 0.9 * nearest[0]  # plain bf16 updates round away
    for losses in (master, rounded):
        assert all(abs(a - b) <= 0.1 * a + 0.02 * fp32[0] for a, b in zip(fp32, losses, strict=True)), (
            fp32,
            losses,
        )


@pytest.mark.parametrize("stochastic_rounding", [False, True])
def test_a_reloaded_optimizer_steps_exactly_as_the_one_saved(stochastic_rounding):
    """torch casts loaded state to the parameters' dtype; BF16AdamW keeps its float32 state float32."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 8, generator=g).bfloat16()) for _ in range(2)]
    grads = [[torch.randn(8, 8, generator=g).bfloat16() for _ in params] for _ in range(5)]

    def step(optimizer, weights, grad):
        for p, gr in zip(weights, grad, strict=True):
            p.grad = gr
        optimizer.step()

    def build(weights):
        groups = [{"params": weights[:1], "weight_decay": 0.1}, {"params": weights[1:], "weight_decay": 0}]
        return BF16AdamW(groups, lr=1e-3, stochastic_rounding=stochastic_rounding, seed=7)

    straight = build(params)
    for grad in grads[:3]:
        step(straight, params, grad)
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = build(copies)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    state = resumed.state[copies[0]]
    assert state["step"] == 3 and state["exp_avg"].dtype == torch.float32
    assert ("master" in state) != stochastic_rounding
    for grad in grads[3:]:
        step(straight, params, grad)
        step(resumed, copies, copy.deepcopy(grad))
    assert all(torch.equal(a, b) for a, b in zip(params, copies, strict=True))
    assert all(p.dtype == torch.bfloat16 for p in copies)


def test_bf16_adamw_refuses_float32_parameters():
    with pytest.raises(ValueError, match="bfloat16 parameters"):
        BF16AdamW([torch.nn.Parameter(torch.zeros(3))])
