"""What trains (`--trainable`), how it is updated, and how it is written out as diffusers folders.

- full: UNet + ControlNeXt; selective: ControlNeXt + the UNet attention's to_out / to_v;
  lora: ControlNeXt + peft LoRA adapters on the UNet's attention; controlnext: ControlNeXt alone.
- AdamW over two parameter groups (no decay on norms and biases, pitfall 9): torch's, bitsandbytes'
  8-bit one, or `cnx.bf16_adamw`'s for bf16 weights; and
  diffusers' learning-rate schedules with warm-up for every name (pitfall 7).
- `export_folders` writes what a finished run leaves in `final/` (and `cnx export`
  from a checkpoint): `controlnext/`, `unet/` when the UNet trained (for LoRA the
  adapter in `unet_lora/` and the merged UNet in `unet/`), and their `_ema` copies.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cnx.attention import freeze_bypassed

TRAINABLE_ATTENTION = ("to_out", "to_v")  # what --trainable selective trains in the UNet's attention
EXPORT_FOLDERS = ("controlnext", "unet", "unet_lora")  # what export_folders writes, each also `_ema`
FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # --fused_adamw; elsewhere (and off) fused=None: torch's choice


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
    freeze_bypassed(model.unet)  # what the single-token cross-attention never reads (cnx.attention)
    return [p for p in model.parameters() if p.requires_grad]


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Two groups (pitfall 9): decay for weight matrices and kernels, none for norms and biases."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(groups: list[dict], options, device="cpu"):
    """The optimizer `options` ask for over `groups`: AdamW (torch's fused kernel with --fused_adamw),
    bitsandbytes' 8-bit AdamW (`--use_8bit_adam`), or cnx's AdamW for bf16 weights
    (`--weights_dtype=bf16`, `cnx.bf16_adamw`).

    The fused step is one pass over each tensor instead of a dozen: on 2 CPU cores the tiny
    profile's 2.7 M parameters step in 4.5 ms instead of 16.6 ms; on CUDA one launch per
    group instead of foreach's several (`device` is where the parameters will train).
    """
    kwargs = dict(
        lr=options.learning_rate, betas=(options.adam_beta1, options.adam_beta2), eps=options.adam_epsilon
    )
    if options.weights_dtype == "bf16":
        from cnx.bf16_adamw import BF16AdamW

        return BF16AdamW(groups, **kwargs, stochastic_rounding=options.stochastic_rounding, seed=options.seed)
    if options.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    fused = True if options.fused_adamw and torch.device(device).type in FUSED_ADAMW_DEVICES else None
    return torch.optim.AdamW(groups, **kwargs, fused=fused)


def check_8bit_adam(device) -> None:
    """Refuse `--use_8bit_adam` in one line unless bitsandbytes' 8-bit AdamW steps on `device` here.

    It steps a 4096-element tensor, the smallest whose moments bitsandbytes keeps in 8 bits.
    """
    where = "CUDA or ROCm GPUs, Intel XPUs and CPUs"
    try:
        import bitsandbytes as bnb
    except Exception as err:  # missing, or a build that does not load here
        raise SystemExit(
            f"cnx train: --use_8bit_adam needs bitsandbytes, which does not load here ({err}); "
            f"pip install 'cnx[bnb]' (its 8-bit AdamW runs on {where})"
        ) from None
    try:
        weight = torch.nn.Parameter(torch.zeros(4096, device=device))
        weight.grad = torch.ones_like(weight)
        bnb.optim.AdamW8bit([weight]).step()
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SystemExit(
            f"cnx train: --use_8bit_adam: bitsandbytes {bnb.__version__} cannot step its 8-bit AdamW "
            f"on {torch.device(device)} ({first}); it runs on {where}"
        ) from None


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
# Export


def export_folders(model, out_dir: Path, trainable: str, ema=None, parameters=None) -> Path:
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
