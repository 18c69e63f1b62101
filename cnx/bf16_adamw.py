"""AdamW over bfloat16 weights (`cnx train --weights_dtype=bf16`): half the bytes of the weights and
their gradients, with the update kept as precise as float32 AdamW's.

A bf16 weight has 8 significant bits: an update smaller than half its spacing (about 0.2% of
the weight) rounds away to nothing, so plain bf16 AdamW at a fine-tuning learning rate stops
learning. Two cures, both with float32 moments:

- a float32 master copy of each weight that the update goes into; the bf16 weight is its
  nearest rounding (4 more bytes per trained parameter: the classic mixed-precision recipe);
- stochastic rounding (`--stochastic_rounding`): the update is computed in float32 from the bf16
  weight and rounded up or down at random, with the probabilities that make the expected bf16
  weight the float32 one, so small updates add up on average (no master copy).

Gradients are bf16 like their weights, so gradient accumulation sums in bf16 and clipping
measures their norm in bf16. The rounding draws from a ("stochastic-rounding", seed, step)
stream (`cnx.seeding`), the same on every rank (the weights stay identical across data-parallel
ranks) and again after a resume.
"""

from __future__ import annotations

import math

import torch

from cnx.seeding import stream_generator

BF16_DROPPED_BITS = 16  # float32 -> bfloat16 drops the low 16 bits of the mantissa
HIGH_BITS = -(1 << BF16_DROPPED_BITS)  # int32 mask 0xFFFF0000: the bits bfloat16 keeps


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`x` (float32) rounded to bfloat16, up or down at random so that E[result] = x.

    Adds a uniform random integer in [0, 2^16) to the float32 bit pattern, then drops the low
    16 bits: the magnitude rounds up with probability (its distance from the lower bf16 value) /
    (the spacing). Infinities and NaNs stay what they are (their low bits are zero or irrelevant).
    """
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic_round_to_bf16 takes float32, got {x.dtype}")
    noise = torch.randint(
        0, 1 << BF16_DROPPED_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator
    )
    bits = (x.view(torch.int32) + noise) & HIGH_BITS
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the dropped bits are zero


@torch.no_grad()
def adamw_update(
    weight: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step of `weight` in place (float32 tensors, all one shape), as torch.optim.AdamW
    computes it: decoupled decay, bias-corrected moments; `step` counts from 1."""
    beta1, beta2 = betas
    weight.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    weight.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


class BF16AdamW(torch.optim.Optimizer):
    """AdamW for bfloat16 parameters: float32 moments, and a float32 master copy per parameter or
    (`stochastic_rounding`) none, the update rounded stochastically into the bf16 weight.

    State per parameter: `step` (an int), `exp_avg`, `exp_avg_sq` and, without stochastic
    rounding, `master` (all float32). The update works one tensor at a time, so it needs float32
    room for one tensor beyond the state, not for the model.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        stochastic_rounding: bool = False,
        seed: int = 0,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.stochastic_rounding, self.seed = stochastic_rounding, seed
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    raise ValueError(f"BF16AdamW updates bfloat16 parameters, got one of {p.dtype}")

    def _generator(self, generators: dict, device: torch.device, step: int) -> torch.Generator:
        """This step's rounding stream on `device` (one per device and step, drawn tensor by tensor)."""
        key = (str(device), step)
        if key not in generators:
            generators[key] = stream_generator("stochastic-rounding", self.seed, step, device=device)
        return generators[key]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        generators: dict = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    if not self.stochastic_rounding:
                        state["master"] = p.float()
                state["step"] += 1
                weight = p.float() if self.stochastic_rounding else state["master"]
                adamw_update(
                    weight,
                    p.grad.float(),
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    state["step"],
                    group["lr"],
                    group["betas"],
                    group["eps"],
                    group["weight_decay"],
                )
                if self.stochastic_rounding:
                    generator = self._generator(generators, p.device, state["step"])
                    p.copy_(stochastic_round_to_bf16(weight, generator))
                else:
                    p.copy_(weight)  # round to nearest; the master keeps what it drops
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, keeping the saved float32 state float32 (torch casts it to the bf16 params')."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        indices = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in zip(indices, params, strict=True):
            for key, value in saved.get(index, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(p.device)
