from dataclasses import replace

import pytest

from cnx.profiles import PROFILES, ensure_model, get_profile


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


def test_tiny_model_is_built_on_first_use(tmp_path):
    profile = replace(PROFILES["tiny"], pretrained_model_name_or_path=str(tmp_path / "svd"))
    ensure_model(profile)
    assert (tmp_path / "svd" / "model_index.json").exists()
