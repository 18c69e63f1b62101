"""Strict weight loading: released .bin files, safetensors, diffusers folders, training-wrapper prefixes.

Pitfall numbers refer to docs/pitfalls.md.
"""

from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import UNetSpatioTemporalConditionModel
from safetensors.torch import save_file

from cnx.controlnext import ControlNeXt, ControlNeXtSVD, controlnext_config_for
from cnx.tiny import build_tiny_components, write_tiny_svd
from cnx.weights import (
    WeightLoadError,
    load_controlnext,
    load_controlnext_state,
    load_unet_state,
    read_state_dict,
    unwrap_state_dict,
)


class Payload:
    """An arbitrary object: unpickling it would run code (here it would create a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def unet():
    return build_tiny_components(seed=0, num_frames=4)[0]


def fresh_controlnext(seed):
    torch.manual_seed(seed)
    return ControlNeXt(**controlnext_config_for(32))


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_released_bin_loads_strictly_into_the_published_config(tmp_path):
    torch.manual_seed(0)
    released = ControlNeXt()
    torch.save(released.state_dict(), tmp_path / "controlnet.bin")  # the release's file name and format
    loaded = load_controlnext(tmp_path / "controlnet.bin")
    assert same_weights(loaded, released)
    assert loaded.config.control_channels == 320


def test_pitfall_5_bin_holding_an_arbitrary_object_is_refused(tmp_path):
    """Pitfall 5: a .bin is read with weights_only=True; an object inside is refused, never built."""
    marker = tmp_path / "code-ran"
    state = dict(fresh_controlnext(0).state_dict(), payload=Payload(marker))
    torch.save(state, tmp_path / "evil.bin")
    with pytest.raises(WeightLoadError, match=r"evil\.bin: refused"):
        load_controlnext(tmp_path / "evil.bin", **controlnext_config_for(32))
    assert not marker.exists()


def test_non_tensor_entries_are_named(tmp_path):
    torch.save({"weight": torch.zeros(2), "step": 3}, tmp_path / "mixed.pt")  # allowed by weights_only
    with pytest.raises(WeightLoadError, match=r"mixed\.pt: entries that are not tensors: \['step'\]"):
        read_state_dict(tmp_path / "mixed.pt")


def test_pitfall_2_controlnext_prefixed_keys_from_a_training_wrapper_load(tmp_path, unet):
    """Pitfall 2: keys saved through a wrapper (`controlnext.`, `unet.`, `module.`) are unwrapped."""
    trained = fresh_controlnext(1)
    wrapper_state = ControlNeXtSVD(unet, trained).state_dict()
    assert any(k.startswith("unet.") for k in wrapper_state) and any(
        k.startswith("controlnext.") for k in wrapper_state
    )
    save_file(wrapper_state, tmp_path / "wrapper.safetensors")
    torch.save({f"module.{k}": v for k, v in wrapper_state.items()}, tmp_path / "deepspeed.bin")
    for name in ("wrapper.safetensors", "deepspeed.bin"):
        model = load_controlnext_state(fresh_controlnext(2), tmp_path / name)
        assert same_weights(model, trained), name
        other_unet = build_tiny_components(seed=5, num_frames=4)[0]
        assert same_weights(load_unet_state(other_unet, tmp_path / name), unet), name


def test_pitfall_2_unet_only_keys_given_to_the_controlnext_loader_raise(tmp_path, unet):
    """Pitfall 2: never load nothing silently; a file with only `unet.` keys fails and says why."""
    save_file({f"unet.{k}": v for k, v in unet.state_dict().items()}, tmp_path / "unet_only.safetensors")
    model = fresh_controlnext(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightLoadError) as info:
        load_controlnext_state(model, tmp_path / "unet_only.safetensors")
    message = str(info.value)
    assert "unet_only.safetensors" in message
    assert "none of its keys belong to it; they start with ['unet']" in message
    n_model, n_file = len(before), len(unet.state_dict())
    assert f"{n_model} missing keys, first 5: ['time_embedding.linear_1.weight'" in message
    assert f"{n_file} unexpected keys, first 5: ['unet." in message
    assert len(info.value.missing) == n_model and len(info.value.unexpected) == n_file
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was loaded


def test_pitfall_1_unet_safetensors_loads_while_controlnext_is_a_bin(tmp_path, unet, monkeypatch):
    """Pitfall 1: each loader reads its own file's extension, not the other model's."""
    # Spy on the readers: this torch's torch.load also reads a .safetensors file (through
    # safetensors' load_file), so success alone would not show which reader cnx called first.
    read_by = {}

    def spy(reader, real):
        def read(path, *args, **kwargs):
            read_by.setdefault(Path(path).name, reader)
            return real(path, *args, **kwargs)

        return read

    monkeypatch.setattr(safetensors.torch, "load_file", spy("safetensors", safetensors.torch.load_file))
    monkeypatch.setattr(torch, "load", spy("torch.load", torch.load))
    trained = fresh_controlnext(4)
    torch.save(trained.state_dict(), tmp_path / "controlnet.bin")
    save_file(unet.state_dict(), tmp_path / "unet.safetensors")
    controlnext = load_controlnext(tmp_path / "controlnet.bin", **controlnext_config_for(32))
    other_unet = build_tiny_components(seed=6, num_frames=4)[0]
    load_unet_state(other_unet, tmp_path / "unet.safetensors")
    assert same_weights(controlnext, trained) and same_weights(other_unet, unet)
    assert read_by == {"controlnet.bin": "torch.load", "unet.safetensors": "safetensors"}
    # And the other way round: a safetensors ControlNeXt with a .bin UNet.
    save_file(trained.state_dict(), tmp_path / "controlnext.safetensors")
    torch.save(unet.state_dict(), tmp_path / "unet.bin")
    assert same_weights(
        load_controlnext(tmp_path / "controlnext.safetensors", **controlnext_config_for(32)), trained
    )
    assert same_weights(
        load_unet_state(build_tiny_components(seed=7, num_frames=4)[0], tmp_path / "unet.bin"), unet
    )
    assert read_by["controlnext.safetensors"] == "safetensors" and read_by["unet.bin"] == "torch.load"


def test_unet_loads_from_pipeline_unet_and_sharded_folders(tmp_path):
    pipeline = write_tiny_svd(tmp_path / "svd", seed=0)
    reference = UNetSpatioTemporalConditionModel.from_pretrained(pipeline, subfolder="unet")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    for path in (pipeline, pipeline / "unet", tmp_path / "sharded"):
        unet = build_tiny_components(seed=9)[0]
        assert not same_weights(unet, reference)
        assert same_weights(load_unet_state(unet, path), reference), path


def test_controlnext_folder_round_trip_with_and_without_subfolder(tmp_path):
    trained = fresh_controlnext(5)
    trained.save_pretrained(tmp_path / "run" / "controlnext")
    for path in (tmp_path / "run", tmp_path / "run" / "controlnext"):
        loaded = load_controlnext(path)
        assert loaded.config.out_channels == [32, 64]
        assert same_weights(loaded, trained)


def test_shape_mismatch_lists_the_keys(tmp_path):
    torch.save(ControlNeXt().state_dict(), tmp_path / "controlnet.bin")
    with pytest.raises(WeightLoadError) as info:
        load_controlnext(tmp_path / "controlnet.bin", **controlnext_config_for(32))
    message = str(info.value)
    assert "controlnet.bin: does not fit ControlNeXt" in message
    assert "keys with other shapes" in message
    assert "time_embedding.linear_1.weight: file (256, 128) vs model (64, 128)" in message
    assert "missing" not in message and "unexpected" not in message


def test_partial_state_dict_reports_first_five_and_counts(tmp_path):
    state = fresh_controlnext(6).state_dict()
    dropped = [k for k in state if k.startswith("down_res.")]
    for key in dropped:
        del state[key]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(WeightLoadError) as info:
        load_controlnext_state(fresh_controlnext(7), tmp_path / "partial.safetensors")
    message = str(info.value)
    assert f"{len(dropped)} missing keys, first 5: {dropped[:5]}" in message
    assert "1 unexpected keys, first 1: ['extra.weight']" in message
    assert "none of its keys" not in message


def test_bad_paths_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.bin: no such weights file"):
        load_controlnext(tmp_path / "nowhere.bin")
    (tmp_path / "weights.npz").write_bytes(b"\0")
    with pytest.raises(WeightLoadError, match=r"weights\.npz: unknown weights format '\.npz'"):
        read_state_dict(tmp_path / "weights.npz")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(
        WeightLoadError, match=r"empty: no diffusion_pytorch_model\.safetensors or \.bin here"
    ):
        load_unet_state(build_tiny_components(seed=0)[0], tmp_path / "empty")


def test_unwrap_state_dict_rules():
    t = torch.zeros(1)
    wrapped = {"controlnext.a": t, "unet.b": t}
    assert unwrap_state_dict(wrapped, "controlnext") == {"a": t}
    assert unwrap_state_dict(wrapped, "unet") == {"b": t}
    assert unwrap_state_dict({"module.unet.b": t}, "unet") == {"b": t}
    assert unwrap_state_dict({"a": t}, "controlnext") == {"a": t}  # already plain
    # A stray key next to the wrapper's models is kept, so the strict load reports it.
    assert unwrap_state_dict({"controlnext.a": t, "ema.a": t}, "controlnext") == {"a": t, "ema.a": t}
