"""Reading what `cnx train` saved in a `checkpoint-<step>/` folder: its options, weights and EMA.

A checkpoint holds accelerate's `save_state` output (the weights, the
optimizer, the RNG states, the EMA) plus `training_options.json` and
`trainer_state.json` (`cnx.runs`). The model is rebuilt from the run's own
options on the meta device (shapes only: no pretrained weights are read, only a
UNet config), the same `select_trainable` is applied, and the weights are
loaded strictly:
- plain / DDP runs: `model.safetensors`, the state dict of ControlNeXtSVD;
- DeepSpeed runs: the fp32 master weights rebuilt from the ZeRO shards in
  `pytorch_model/` by DeepSpeed's own `zero_to_fp32`, its pickles read with
  `weights_only=True` (four DeepSpeed record classes allowed, nothing else).
`cnx export` writes them as diffusers folders; `cnx generate` / `cnx validate`
sample with them directly.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

from cnx.runs import OPTIONS_FILE, STATE_FILE, latest_checkpoint

PLAIN_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # accelerate's save_state, safe first
DEEPSPEED_TAG = "pytorch_model"  # the folder accelerate's save_state gives DeepSpeed's checkpoint
# cnx.train registers the EMA for checkpointing before the LR scheduler: it is custom object 0.
EMA_FILE = "custom_checkpoint_0.pkl"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read, found before any model is built; names the folder."""


@dataclass(frozen=True)
class Checkpoint:
    """A checked checkpoint folder: where its weights are and what the run trained."""

    path: Path
    options: object  # cnx.options.TrainingOptions
    step: int | None
    weights: Path  # model.safetensors (or .bin), or the DeepSpeed `pytorch_model/` folder
    deepspeed: bool


def inspect_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint at `path`, or a CheckpointError naming what is wrong (nothing heavy is loaded)."""
    from cnx.options import TrainingOptions

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    missing = [name for name in (STATE_FILE, OPTIONS_FILE) if not (path / name).is_file()]
    if missing:
        latest = latest_checkpoint(path)  # in case `path` is a run's output_dir
        hint = f"; a run folder? its latest checkpoint is {latest}" if latest else ""
        raise CheckpointError(f"{path}: not a cnx checkpoint (no {' or '.join(missing)}){hint}")
    try:
        options = TrainingOptions.from_json(path / OPTIONS_FILE)
        step = json.loads((path / STATE_FILE).read_text()).get("step")
    except (ValueError, AttributeError) as err:  # bad json, unknown options, not an object
        raise CheckpointError(str(err).splitlines()[0]) from None
    plain = [path / name for name in PLAIN_WEIGHTS if (path / name).is_file()]
    shards = path / DEEPSPEED_TAG
    if plain:
        weights, deepspeed = plain[0], False
    elif list(shards.glob("*model_states.pt")):
        weights, deepspeed = shards, True
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise CheckpointError(f"{path}: a DeepSpeed checkpoint; reading it needs deepspeed installed")
    else:
        found = sorted(p.name for p in path.iterdir())
        raise CheckpointError(
            f"{path}: no weights inside (expected {' or '.join(PLAIN_WEIGHTS)}, or DeepSpeed's "
            f"{DEEPSPEED_TAG}/*model_states.pt); found {found}"
        )
    if options.use_ema and not (path / EMA_FILE).is_file():
        raise CheckpointError(f"{path}: the run used --use_ema but its EMA state {EMA_FILE} is missing")
    return Checkpoint(path, options, step, weights, deepspeed)


def read_model_state(checkpoint: Checkpoint) -> dict:
    """The ControlNeXtSVD state dict (`unet.*`, `controlnext.*`) of a checkpoint, on the CPU."""
    from cnx.weights import read_state_dict

    if checkpoint.deepspeed:
        state = read_deepspeed_state(checkpoint.path)
    else:
        state = read_state_dict(checkpoint.weights)  # by extension; .bin with weights_only=True
    if state and all(key.startswith("module.") for key in state):  # a DDP / DeepSpeed wrapper's names
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


@contextlib.contextmanager
def _weights_only_loads(allowed: list):
    """Every torch.load inside reads with weights_only=True, `allowed` classes besides tensors.

    DeepSpeed's zero_to_fp32 calls torch.load(weights_only=False); torch's
    TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides that, so its pickles cannot run code.
    """
    import torch

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def read_deepspeed_state(checkpoint_dir: str | Path) -> dict:
    """Full fp32 weights of a DeepSpeed ZeRO checkpoint, from its optimizer's master copies.

    DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` merges the ranks'
    shards (frozen weights and buffers come from the model states file). Its
    progress lines and bars go nowhere. Tested with ZeRO-2; a stage or precision
    whose shards pickle another class is refused, naming it.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from cnx.weights import WeightLoadError

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]  # records, no code
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    try:
        with _weights_only_loads(allowed), quiet[0], quiet[1]:
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=DEEPSPEED_TAG)
    except pickle.UnpicklingError as err:  # an object outside the allowed records
        first = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), err)
        raise WeightLoadError(Path(checkpoint_dir) / DEEPSPEED_TAG, f"refused to unpickle: {first}") from None
    return {key: value.contiguous() for key, value in state.items()}


def read_ema_state(path: str | Path, parameters: list) -> dict:
    """diffusers' EMAModel state dict from the run's pickle, checked against `parameters`.

    Read with weights_only=True (floats, ints, a bool and a list of tensors).
    EMAModel.load_state_dict does not compare the shadow weights with the
    parameters (copy_to would zip a short list silently), so this does.
    """
    import torch

    from cnx.weights import WeightLoadError

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightLoadError(path, f"refused: holds objects other than tensors ({err})") from None
    shadow = state.get("shadow_params") if isinstance(state, dict) else None
    if not isinstance(shadow, list):
        raise WeightLoadError(path, "not a diffusers EMAModel state (no shadow_params list)")
    if len(shadow) != len(parameters):
        raise WeightLoadError(
            path, f"{len(shadow)} EMA weights for {len(parameters)} trainable parameters of this run"
        )
    mismatched = [
        (f"shadow_params[{i}]", tuple(s.shape), tuple(p.shape))
        for i, (s, p) in enumerate(zip(shadow, parameters, strict=True))
        if s.shape != p.shape
    ]
    if mismatched:
        raise WeightLoadError(path, "EMA weights do not fit the trainable parameters", mismatched=mismatched)
    return state


# ---------------------------------------------------------------------------------------------
# The model


def unet_config(options, pretrained_model_name_or_path: str | None = None) -> dict:
    """The config of the run's UNet (its config.json alone), or a CheckpointError in one line."""
    from diffusers import UNetSpatioTemporalConditionModel

    source = options.pretrain_unet or pretrained_model_name_or_path or options.pretrained_model_name_or_path
    subfolder = None if (Path(source) / "config.json").is_file() else "unet"
    hint = "moved? pass --pretrained_model_name_or_path"
    if source.startswith(("/", ".", "~")) and not Path(source).expanduser().exists():  # a path, not a hub id
        raise CheckpointError(f"{source}: the run's model folder does not exist ({hint})")
    try:
        config = UNetSpatioTemporalConditionModel.load_config(
            source, subfolder=subfolder, revision=options.non_ema_revision or options.revision
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read the UNet config.json of the run's model {source!r} ({hint}): {first}"
        ) from None
    return {**config, "_name_or_path": str(source)}  # as from_pretrained records it in unet/config.json


def build_model(options, config: dict):
    """(ControlNeXtSVD with uninitialised CPU weights, its trainable parameters) as `cnx.train` builds them.

    Built on the meta device from the UNet's config alone, then given empty CPU
    storage: every tensor is then set by the strict load (neither model has
    buffers outside its state dict, which `load_checkpoint` checks).
    """
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    from cnx.attention import use_single_token_cross_attention
    from cnx.controlnext import ControlNeXt, ControlNeXtSVD, controlnext_config_for
    from cnx.trainable import select_trainable

    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel.from_config(config)
        unet.register_to_config(_name_or_path=config.get("_name_or_path"))
        controlnext = ControlNeXt(**controlnext_config_for(unet.config.block_out_channels[0]))
        model = ControlNeXtSVD(unet, controlnext)
    if options.single_token_cross_attention:  # the run froze what it leaves unread: the same trained set
        use_single_token_cross_attention(unet)
    select_trainable(model, options.trainable, options.rank)
    model.to_empty(device="cpu")
    return model, [p for p in model.parameters() if p.requires_grad]  # in select_trainable's order


def load_checkpoint(checkpoint: Checkpoint, config: dict):
    """(model with the checkpoint's weights, trainable parameters, EMAModel or None), all strict."""
    from cnx.weights import WeightLoadError, load_state_strict

    model, trainable = build_model(checkpoint.options, config)
    state = read_model_state(checkpoint)
    load_state_strict(model, state, checkpoint.weights)
    del state
    names = set(model.state_dict())
    unsaved = [name for name, _ in model.named_buffers() if name not in names]
    if unsaved:  # they would stay uninitialised memory
        raise WeightLoadError(checkpoint.weights, f"buffers not in the state dict: {unsaved[:5]}")
    ema = None
    if checkpoint.options.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable, use_ema_warmup=True)
        ema.load_state_dict(read_ema_state(checkpoint.path / EMA_FILE, trainable))
    return model, trainable, ema
