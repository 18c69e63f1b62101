"""cnx.attention: the single-token cross-attention is exact and freezes only what it leaves unread."""

import copy
import json

import pytest
import torch

from cnx import attention
from cnx.attention import (
    SingleTokenCrossAttention,
    bypassed_modules,
    sdpa_priority,
    use_default_cross_attention,
    use_single_token_cross_attention,
)
from cnx.controlnext import ControlNeXt, ControlNeXtSVD, controlnext_config_for
from cnx.trainable import select_trainable


@pytest.fixture(scope="module")
def model(tiny_svd_dir):
    from diffusers import UNetSpatioTemporalConditionModel

    unet = UNetSpatioTemporalConditionModel.from_pretrained(tiny_svd_dir, subfolder="unet")
    torch.manual_seed(0)
    return ControlNeXtSVD(unet, ControlNeXt(**controlnext_config_for(unet.config.block_out_channels[0])))


def inputs(model, batch_size=2, frames=3, height=64, width=96):
    g = torch.Generator().manual_seed(0)
    return dict(
        sample=torch.randn(batch_size, frames, 8, height // 8, width // 8, generator=g),
        timestep=torch.rand(batch_size, generator=g) + 0.5,
        encoder_hidden_states=torch.randn(batch_size, 1, model.unet.config.cross_attention_dim, generator=g),
        added_time_ids=torch.randn(batch_size, 3, generator=g),
        pose_frames=torch.rand(batch_size, frames, 3, height, width, generator=g),
    )


def forward_backward(model, trainable: str):
    """The output and every parameter's gradient after a float32 forward and backward."""
    torch.manual_seed(0)  # LoRA's initial adapters
    select_trainable(model, trainable, rank=4)
    model.zero_grad(set_to_none=True)
    out = model(**inputs(model)).sample
    out.square().mean().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def one_thread():
    """One thread: every GEMM sums in one order. With two, a 1-row and an N-row to_out split their
    work differently and the output differed by up to 1.1e-6 (float rounding, not the shortcut)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_same_output_and_gradients_for_every_trained_parameter(model, trainable, one_thread):
    original, fast = copy.deepcopy(model), copy.deepcopy(model)
    use_default_cross_attention(original.unet)
    assert use_single_token_cross_attention(fast.unet) == 8  # the tiny UNet's spatial + temporal blocks
    out, grads = forward_backward(original, trainable)
    fast_out, fast_grads = forward_backward(fast, trainable)

    torch.testing.assert_close(fast_out, out, rtol=1e-6, atol=1e-6)
    bypassed = {
        f"unet.{name}.{p}" for name, m in bypassed_modules(fast.unet) for p, _ in m.named_parameters()
    }
    assert bypassed and set(fast_grads) == set(grads) - bypassed  # trained: all but the unread ones
    assert all(fast_grads[name] is not None for name in fast_grads)
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-6, atol=1e-6, msg=name)
    # What the original gave the unread tensors: zero, up to rounding (LoRA's B starts at zero: exactly).
    unread = [grads[name] for name in bypassed if name in grads]
    assert unread and max(g.abs().max() for g in unread) < 1e-6 * max(g.abs().max() for g in grads.values())


def test_only_the_query_path_of_the_cross_attention_is_frozen(model):
    fast = copy.deepcopy(model)
    use_single_token_cross_attention(fast.unet)
    trained_ids = {id(p) for p in select_trainable(fast, "full")}
    trained = {name for name, p in fast.named_parameters() if id(p) in trained_ids}
    frozen = {name for name, p in fast.named_parameters()} - trained
    assert frozen and all(name.split(".")[-2] in ("norm2", "to_q", "to_k") for name in frozen)
    assert all(".attn2." in name or ".norm2." in name for name in frozen)
    assert not any("resnets" in name for name in frozen)  # the resnets' norm2 is another module
    use_default_cross_attention(fast.unet)
    assert len(select_trainable(fast, "full")) == len(list(fast.parameters()))  # the original: all train


def test_the_shortcut_refuses_what_it_cannot_compute_exactly(model):
    attn = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    x = torch.randn(2, 5, attn.query_dim)
    two_tokens = torch.randn(2, 2, attn.cross_attention_dim)
    with pytest.raises(ValueError, match="one token"):
        SingleTokenCrossAttention()(attn, x, two_tokens)
    with pytest.raises(ValueError, match="no attention mask"):
        SingleTokenCrossAttention()(attn, x, two_tokens[:, :1], attention_mask=torch.ones(2, 1, 1))
    dropout = copy.deepcopy(model)
    dropout.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_out[1].p = 0.1
    with pytest.raises(ValueError, match="not exact for down_blocks.0.attentions.0.transformer_blocks.0"):
        use_single_token_cross_attention(dropout.unet)


def test_sdpa_priority_puts_the_backend_first_and_restores_the_order():
    before = torch._C._get_sdp_priority_order()
    q = torch.randn(1, 2, 16, 8)
    plain = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    with sdpa_priority("cudnn"):
        assert torch._C._get_sdp_priority_order()[0] == int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)
        torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, q, q), plain)
    assert torch._C._get_sdp_priority_order() == before
    with sdpa_priority("auto"):
        assert torch._C._get_sdp_priority_order() == before
    with pytest.raises(ValueError, match="--sdpa_backend"), sdpa_priority("fastest"):
        pass


def test_the_options_offer_the_backends_and_old_runs_read_as_without_the_shortcut(tmp_path):
    from cnx import options

    assert options.SDPA_BACKENDS == attention.SDPA_BACKENDS
    assert options.TrainingOptions().single_token_cross_attention  # on by default
    old = options.TrainingOptions(meta_info_path="m.json").to_json(tmp_path)
    values = json.loads(old.read_text())
    del values["single_token_cross_attention"]  # a run folder from before the flag
    old.write_text(json.dumps(values))
    assert not options.TrainingOptions.from_json(tmp_path).single_token_cross_attention


def test_a_resume_across_the_flag_stops_before_loading_models(tmp_path):
    from cnx import runs
    from cnx.options import TrainingOptions
    from cnx.train import check_resume_matches

    with_shortcut = TrainingOptions(meta_info_path="m.json")
    with_shortcut.to_json(tmp_path / runs.OPTIONS_FILE)
    check_resume_matches(with_shortcut, tmp_path)  # the same setting: nothing to say
    check_resume_matches(with_shortcut, None)
    without = TrainingOptions(meta_info_path="m.json", single_token_cross_attention=False)
    with pytest.raises(SystemExit, match="resume it with --single_token_cross_attention"):
        check_resume_matches(without, tmp_path)
