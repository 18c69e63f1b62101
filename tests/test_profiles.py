from dataclasses import replace
from pathlib import Path

import pytest

from cnx.profiles import PROFILES, TINY_SVD, cpu_flags, cpu_has_bfloat16, ensure_model, get_profile


def test_tiny_is_the_default_and_the_environment_overrides(monkeypatch):
    monkeypatch.delenv("CNX_PROFILE", raising=False)
    assert get_profile().name == "tiny"
    monkeypatch.setenv("CNX_PROFILE", "full")
    full = get_profile()
    assert (full.width, full.height, full.sample_n_frames, full.unet_width) == (576, 1024, 21, 320)
    assert full.pretrained_model_name_or_path == "stabilityai/stable-video-diffusion-img2vid-xt-1-1"


def test_meta_info_override_is_read_when_the_profile_is_asked_for(monkeypatch):
    monkeypatch.setenv("CNX_META_INFO", "/data/ubc/meta_info.json")
    assert get_profile("full").meta_info_path == "/data/ubc/meta_info.json"
    monkeypatch.delenv("CNX_META_INFO")
    assert get_profile("full").meta_info_path.endswith("data_samples/meta_info.json")


def test_unknown_profile_names_the_choices():
    with pytest.raises(ValueError, match="full"):
        get_profile("huge")


def test_the_tiny_profile_uses_the_shipped_pretrained_model():
    profile = get_profile("tiny")
    assert Path(profile.pretrained_model_name_or_path) == TINY_SVD
    assert ensure_model(profile) is profile  # shipped in data_samples: nothing to build


def test_a_missing_model_folder_stops_with_the_command_that_makes_it(tmp_path):
    profile = replace(PROFILES["tiny"], pretrained_model_name_or_path=str(tmp_path / "svd"))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'svd'}.*cnx tiny-model"):
        ensure_model(profile)
    missing_pretrained = replace(PROFILES["tiny"], pretrained_model_name_or_path=str(TINY_SVD) + "-gone")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        ensure_model(missing_pretrained)
    assert ensure_model(PROFILES["full"]) is PROFILES["full"]  # a hub id is diffusers' business


def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_bfloat16(cpuinfo)
    cpuinfo.write_text("processor : 0\nflags : fpu avx2 amx_bf16 amx_tile\n")
    assert cpu_has_bfloat16(cpuinfo)
    cpuinfo.write_text("processor : 0\nflags : fpu avx2 avx512f avx512bf16x\n")
    assert not cpu_has_bfloat16(cpuinfo)
    assert not cpu_has_bfloat16(tmp_path / "absent")  # not Linux


@pytest.mark.parametrize(
    ("flags", "native", "as_conv2d"),
    [
        ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile", True, False),  # Intel Sapphire Rapids and later
        ("avx2 avx512f avx512_bf16", True, True),  # AMD EPYC (Zen 4): bf16, with the Conv2d workaround
        ("avx2 avx512f", False, True),  # emulated bf16: slower, so off by default
    ],
)
def test_bfloat16_is_on_by_default_where_native_and_safe_without_amx_through_the_conv2d_workaround(
    tmp_path, flags, native, as_conv2d
):
    from cnx.cpu_kernels import conv3d_weight_grads_need_conv2d

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor : 0\nflags : fpu {flags}\n")
    assert cpu_flags(cpuinfo) >= {"fpu", "avx2"}
    assert cpu_has_bfloat16(cpuinfo) is native
    assert conv3d_weight_grads_need_conv2d(cpu_flags(cpuinfo), environ={}) is as_conv2d
