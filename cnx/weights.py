"""Strict loading of ControlNeXt and UNet weights: published releases, diffusers folders, training output.

Every load is strict, so a wrong file fails loudly instead of silently
loading nothing (pitfall 2); the reader is chosen from each file's own
extension (pitfall 1); `.bin` files are read with `weights_only=True`, which
refuses anything but tensors and plain containers (pitfall 5). Pitfall numbers
refer to docs/pitfalls.md.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from cnx.controlnext import ControlNeXt

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WRAPPER_PREFIXES = ("unet", "controlnext")  # attribute names of cnx.controlnext.ControlNeXtSVD
WEIGHTS_NAME = "diffusion_pytorch_model"  # diffusers' file stem inside a model folder
SHOW = 5  # keys listed per kind in an error message


class WeightLoadError(ValueError):
    """Weights that do not fit a model, or a file that cannot be read safely; names the file."""

    def __init__(self, path, problem: str, missing=(), unexpected=(), mismatched=()):
        self.path, self.missing, self.unexpected = str(path), list(missing), list(unexpected)
        self.mismatched = list(mismatched)
        lines = [f"{path}: {problem}"]
        for kind, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"  {len(keys)} {kind} keys, first {min(SHOW, len(keys))}: {keys[:SHOW]}")
        if self.mismatched:
            shown = [f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched[:SHOW]]
            lines.append(f"  {len(self.mismatched)} keys with other shapes, first {len(shown)}: {shown}")
        super().__init__("\n".join(lines))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of one weights file, read by that file's own extension (pitfall 1), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if suffix in PICKLE_SUFFIXES:
        try:  # pitfall 5: weights_only refuses to build arbitrary objects (and so to run their code)
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise WeightLoadError(path, f"refused: holds objects other than tensors ({error})") from error
        return _plain_state_dict(state, path)
    raise WeightLoadError(path, f"unknown weights format {suffix!r}; expected .safetensors or .bin/.pt/.pth")


def _plain_state_dict(state, path) -> dict[str, torch.Tensor]:
    # Some trainers nest the tensors one level down; take them from there, by name, never by guess.
    if isinstance(state, Mapping) and len(state) == 1 and next(iter(state)) in ("state_dict", "module"):
        state = next(iter(state.values()))
    if not isinstance(state, Mapping):
        raise WeightLoadError(path, f"expected a dict of tensors, found {type(state).__name__}")
    not_tensors = [k for k, v in state.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise WeightLoadError(
            path, f"entries that are not tensors: {not_tensors[:SHOW]} ({len(not_tensors)})"
        )
    return dict(state)


def folder_weights_files(folder: str | Path, variant: str | None = None) -> list[Path]:
    """The weights file(s) of a diffusers model folder: single or sharded, safetensors before .bin."""
    folder = Path(folder)
    infix = f".{variant}" if variant else ""
    for ext in (".safetensors", ".bin"):
        single = folder / f"{WEIGHTS_NAME}{infix}{ext}"
        if single.is_file():
            return [single]
        index = folder / f"{WEIGHTS_NAME}{infix}{ext}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise WeightLoadError(folder, f"no {WEIGHTS_NAME}{infix}.safetensors or .bin here; found {found}")


def read_weights(path: str | Path, subfolder: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a weights file, a diffusers model folder, or a folder holding `subfolder/`."""
    path = Path(path)
    if not path.is_dir():
        return read_state_dict(path)
    if not (path / "config.json").is_file() and (path / subfolder / "config.json").is_file():
        path = path / subfolder  # a pipeline or training-output folder
    state = {}
    for file in folder_weights_files(path, variant):
        state.update(read_state_dict(file))
    return state


def unwrap_state_dict(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The `prefix.` part of a training wrapper's state dict, with the prefix removed.

    A DeepSpeed/DDP `module.` in front is dropped first. A state dict without
    any `prefix.` key comes back unchanged, so a strict load then reports it.
    Keys of the wrapper's other models (`unet.` when unwrapping `controlnext`)
    are left behind; any other key stays and is reported as unexpected.
    """
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    mine = f"{prefix}."
    if not any(key.startswith(mine) for key in state):
        return dict(state)
    siblings = tuple(f"{name}." for name in WRAPPER_PREFIXES if name != prefix)
    return {
        key.removeprefix(mine): value
        for key, value in state.items()
        if key.startswith(mine) or not key.startswith(siblings)
    }


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path) -> nn.Module:
    """Load `state` into `model` if names and shapes match exactly; else a WeightLoadError listing them."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        (key, tuple(state[key].shape), tuple(expected[key].shape))
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        problem = f"does not fit {type(model).__name__}"
        if not any(key in expected for key in state):
            heads = sorted({key.split(".")[0] for key in state})
            problem += f" (none of its keys belong to it; they start with {heads[:SHOW]})"
        raise WeightLoadError(path, problem, missing, unexpected, mismatched)
    model.load_state_dict(state, strict=True)
    return model


def load_controlnext_state(model: ControlNeXt, path: str | Path, variant: str | None = None) -> ControlNeXt:
    """Load ControlNeXt weights (file, diffusers folder, or folder with `controlnext/`) into `model`."""
    state = unwrap_state_dict(read_weights(path, "controlnext", variant), "controlnext")
    return load_state_strict(model, state, path)


def load_unet_state(unet: nn.Module, path: str | Path, variant: str | None = None) -> nn.Module:
    """Load UNet weights (file, diffusers unet folder, or pipeline folder with `unet/`) into `unet`."""
    state = unwrap_state_dict(read_weights(path, "unet", variant), "unet")
    return load_state_strict(unet, state, path)


def load_controlnext(path: str | Path, variant: str | None = None, **config_overrides) -> ControlNeXt:
    """A ControlNeXt with weights from `path`, loaded strictly.

    A diffusers folder brings its own config.json (overrides apply on top); a
    single file (e.g. the released `controlnet.bin`) is loaded into
    `ControlNeXt(**config_overrides)`, the published config by default.
    """
    path = Path(path)
    folder = path if (path / "config.json").is_file() else path / "controlnext"
    if path.is_dir() and (folder / "config.json").is_file():
        config = {**ControlNeXt.load_config(folder), **config_overrides}
        model = ControlNeXt.from_config(config)
    else:
        model = ControlNeXt(**config_overrides)
    return load_controlnext_state(model, path, variant)
