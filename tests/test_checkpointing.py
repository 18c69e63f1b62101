"""Gradient checkpointing granularities: the same loss and gradients, less memory, the UNet unchanged."""

import copy
import functools

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

from cnx import checkpointing, memory
from cnx.checkpointing import is_whole, whole_transformers
from cnx.options import CHECKPOINTING, DEFAULT_CHECKPOINTING, parse_options
from cnx.profiles import DATA_SAMPLES
from cnx.step import Objective, build_models, training_step
from cnx.trainable import select_trainable

FRAMES, HEIGHT, WIDTH = 4, 64, 96


def options(tiny_svd_dir, *flags):
    return parse_options(
        [
            f"--pretrained_model_name_or_path={tiny_svd_dir}",
            f"--meta_info_path={DATA_SAMPLES / 'meta_info.json'}",
        ]
        + list(flags)
    )


def random_batch(seed: int = 0) -> dict:
    """A collated ClipDataset batch of one random clip (B, F, 3, H, W)."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, FRAMES, 3, HEIGHT, WIDTH)
    return {
        "pixel_values": torch.rand(shape, generator=g) * 2 - 1,
        "pose_frames": torch.rand(shape, generator=g),
        "reference_image": torch.rand(1, 3, HEIGHT, WIDTH, generator=g) * 2 - 1,
        "hand_weights": 1 + torch.rand(1, FRAMES, 1, HEIGHT, WIDTH, generator=g),
    }


@pytest.fixture(scope="module")
def models(tiny_svd_dir):
    built, _ = build_models(options(tiny_svd_dir), torch.device("cpu"), torch.float32)
    select_trainable(built.model, "full")  # all but what the single-token cross-attention never reads
    built.model.train()
    return built


class CheckpointCalls:
    """What torch.utils.checkpoint.checkpoint is asked to recompute (diffusers calls it by name)."""

    def __init__(self, monkeypatch):
        self.functions = []
        inner = torch.utils.checkpoint.checkpoint

        def counting(function, *args, **kwargs):
            self.functions.append(function)
            return inner(function, *args, **kwargs)

        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)

    def count(self, kind) -> int:
        """Calls that recompute a `kind` module: diffusers hands over `block.__call__`, cnx a partial."""
        owners = [f.__self__ for f in self.functions]  # a module, or cnx's functools.partial
        owners = [o.args[0] if isinstance(o, functools.partial) else o for o in owners]
        return sum(isinstance(owner, kind) for owner in owners)


def loss_and_gradients(models, granularity, control_scale=2.0):
    """(loss, {name: grad}) of one training step with every condition kept, float32."""
    model = models.model
    model.zero_grad(set_to_none=True)
    if granularity is None:
        model.disable_gradient_checkpointing()
    else:
        model.enable_gradient_checkpointing(granularity)
    objective = Objective(conditioning_dropout_prob=0.0, control_scale=control_scale)
    loss = training_step(models, random_batch(), objective, torch.Generator().manual_seed(1)).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.disable_gradient_checkpointing()
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_every_granularity_gives_the_loss_and_gradients_of_no_checkpointing(models, monkeypatch):
    transformers = len(whole_transformers(models.model.unet))
    plain_loss, plain_grads = loss_and_gradients(models, None)
    without_control, _ = loss_and_gradients(models, None, control_scale=0.0)
    assert not torch.isclose(plain_loss, without_control, rtol=1e-4, atol=0)  # the control is injected
    assert len(plain_grads) == len(select_trainable(models.model, "full"))  # all of it trains
    for granularity in CHECKPOINTING:
        calls = CheckpointCalls(monkeypatch)
        loss, grads = loss_and_gradients(models, granularity)
        # blocks: each spatio-temporal transformer whole, no spatial block checkpointed inside it again.
        whole = calls.count(TransformerSpatioTemporalModel)
        spatial = calls.count(BasicTransformerBlock)
        assert (whole, spatial) == ((transformers, 0) if granularity == "blocks" else (0, transformers))
        torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-6, msg=f"{granularity}: {name}")
        monkeypatch.undo()


def test_blocks_leave_the_unet_diffusers_own_and_come_off_again(models):
    unet = models.model.unet
    names = list(unet.state_dict())
    models.model.enable_gradient_checkpointing("blocks")
    try:
        assert type(unet).__name__ == "UNetSpatioTemporalConditionModel"
        assert list(unet.state_dict()) == names
        copied = copy.deepcopy(unet)  # the whole-block forward follows the copy, not the original
        assert all(t.forward.__self__ is t for t in whole_transformers(copied))
        assert all(is_whole(t) and not t.gradient_checkpointing for t in whole_transformers(unet))
    finally:
        models.model.disable_gradient_checkpointing()
    assert not any(is_whole(t) for t in whole_transformers(unet))
    models.model.enable_gradient_checkpointing("diffusers")
    assert all(not is_whole(t) and t.gradient_checkpointing for t in whole_transformers(unet))
    models.model.disable_gradient_checkpointing()
    with pytest.raises(ValueError, match="must be one of blocks, diffusers, got 'layers'"):
        models.model.enable_gradient_checkpointing("layers")


@pytest.mark.parametrize("granularity", CHECKPOINTING)
def test_the_trainer_builds_the_granularity_it_is_given(tiny_svd_dir, granularity):
    flags = ["--gradient_checkpointing", f"--checkpointing={granularity}"]
    built, _ = build_models(options(tiny_svd_dir, *flags), torch.device("cpu"), torch.float32)
    transformers = whole_transformers(built.model.unet)
    assert [is_whole(t) for t in transformers] == [granularity == "blocks"] * len(transformers)
    assert built.model.unet.is_gradient_checkpointing and built.model.controlnext.is_gradient_checkpointing


def test_a_bad_checkpointing_value_fails_in_one_line(tiny_svd_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        options(tiny_svd_dir, "--checkpointing=layers")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith("cnx train: --checkpointing: invalid choice: 'layers'")
    assert memory.main(["--profile", "tiny", "--checkpointing", "layers"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnx plan-memory: --checkpointing: invalid choice") and err.count("\n") == 1


def test_blocks_are_the_default_and_hold_fewer_activations_than_diffusers():
    assert DEFAULT_CHECKPOINTING == "blocks" == checkpointing.GRANULARITIES[0]
    model, _ = memory.meta_models("tiny", "full", 128)
    clip = (1, 4, 64, 96)  # (B, F, H, W)
    held = {g: memory.measure_saved(model, clip, torch.float32, True, g) for g in CHECKPOINTING}
    plain = memory.measure_saved(model, clip, torch.float32, False)
    assert held["blocks"].held < held["diffusers"].held < plain.held
    assert held["blocks"].total < held["diffusers"].total < plain.total
    tiny = dict(profile="tiny", sample_n_frames=4, height=64, width=96)
    plans = {g: memory.plan_memory(memory.MemoryOptions(**tiny, checkpointing=g)) for g in CHECKPOINTING}
    assert plans["blocks"].activations == held["blocks"].total
    assert plans["blocks"].activations < plans["diffusers"].activations
    assert memory.plan_memory(memory.MemoryOptions(**tiny)).activations == plans["blocks"].activations
