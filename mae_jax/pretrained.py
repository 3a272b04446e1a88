"""Trained MAE weights from wherever they live: a parameter directory, a training workdir, an official file or a
Hugging Face directory (transformers' ViTMAE or ViT).

Visualization needs the decoder; fine-tuning and linear probing need the encoder only. Both read through
`load`, which returns what the location holds: the whole MAE, or `{"encoder": ...}` alone.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mae_jax import checkpointing, configuration, convert
from mae_jax.models.mae import MAE, MAEConfig
from mae_jax.models.vit import Compute, unrolled, unrolled_layout
from mae_jax.newest_checkpoint import CHECKPOINTS_DIR

# Official files trained on raw pixels (no norm-pix loss), whose names say so.
PIXEL_LOSS_PREFIX = "mae_visualize_"
# Files holding an official state_dict: PyTorch's (needs torch), or safetensors in the same key layout.
OFFICIAL_SUFFIXES = (".pth", convert.SAFETENSORS_SUFFIX)


class PretrainedError(ValueError):
    """A location that holds no usable MAE weights; the message is one line saying why."""


def load(path: str, norm_pix_loss: bool | None = None) -> tuple[MAEConfig, nnx.State]:
    """(config, state) of the MAE at `path`; the state has no "decoder" when the location holds none.

    `norm_pix_loss` applies to official files (.pth, .safetensors), which cannot say how they were trained
    (left out, it is False for `mae_visualize_*` files, trained on pixels, and True otherwise), and to Hugging
    Face directories (left out, their config.json's for ViTMAE, True for ViT). The
    config computes in float32 with XLA attention whatever the weights were trained with, so a checkpoint
    from any accelerator runs anywhere.
    """
    location = epath.Path(path)
    if location.suffix in OFFICIAL_SUFFIXES:
        config, state = _from_official_file(location, norm_pix_loss)
    elif (location / checkpointing.MODEL_CONFIG_FILE).exists():
        config, state = checkpointing.load_params(location)
    elif (location / CHECKPOINTS_DIR).is_dir():
        config, state = _from_workdir(location)
    elif convert.hf.is_model_dir(location):
        config, state = _from_hf_dir(location, norm_pix_loss)
    else:
        raise PretrainedError(
            f"{path} is not a parameter directory (model.json + params/), a training workdir (checkpoints/), "
            "an official .pth file, a .safetensors file in its layout or a Hugging Face directory (config.json)"
        )
    return dataclasses.replace(config, compute=Compute()), state


def _from_official_file(path: epath.Path, norm_pix_loss: bool | None) -> tuple[MAEConfig, nnx.State]:
    if norm_pix_loss is None:
        norm_pix_loss = not path.name.startswith(PIXEL_LOSS_PREFIX)
    try:
        state_dict = convert.load_state_dict(path)
    except convert.ConvertError as error:  # missing file, not a checkpoint, no PyTorch for a .pth
        raise PretrainedError(str(error)) from error
    try:
        config = convert.infer_config(state_dict, norm_pix_loss=norm_pix_loss)
        return config, convert.from_official(state_dict, config, fresh_decoder=False)
    except ValueError as error:
        raise PretrainedError(f"{path}: {error}") from error


def _from_hf_dir(directory: epath.Path, norm_pix_loss: bool | None) -> tuple[MAEConfig, nnx.State]:
    try:
        config, state_dict = convert.hf.load_dir(directory, norm_pix_loss=norm_pix_loss)
        return config, convert.from_official(state_dict, config, fresh_decoder=False)
    except ValueError as error:  # ConvertError: a config mae_jax cannot compute exactly, missing weights, ...
        raise PretrainedError(f"{directory}: {error}") from error


def _read_only_manager(workdir: epath.Path) -> ocp.CheckpointManager:
    # What read_only implies anyway; given explicitly, orbax does not warn about each.
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    return ocp.CheckpointManager(epath.Path(workdir).absolute() / CHECKPOINTS_DIR, options=options)


def _newest_run(manager: ocp.CheckpointManager) -> tuple[int, ml_collections.ConfigDict] | None:
    """(step, run config) of the newest complete checkpoint, keys added since the run at their defaults."""
    step = manager.latest_step()
    if step is None:
        return None
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    task = saved.get("task", "pretrain")
    config = configuration.base_config() if task == "pretrain" else configuration.downstream_config(task)
    config.update(ml_collections.ConfigDict(saved))
    return step, config


def run_config(workdir: str | epath.Path) -> ml_collections.ConfigDict | None:
    """The config a training workdir's newest checkpoint was saved with; None where `workdir` holds none."""
    if not (epath.Path(workdir) / CHECKPOINTS_DIR).is_dir():
        return None
    with _read_only_manager(workdir) as manager:
        newest = _newest_run(manager)
    return None if newest is None else newest[1]


def _from_workdir(workdir: epath.Path) -> tuple[MAEConfig, nnx.State]:
    """Parameters of the newest checkpoint, without the optimizer state, onto this process's first device.

    Read-only: a running job's workdir is left as it is. The target sharding lets a checkpoint written on a
    pod restore onto one device.
    """
    with _read_only_manager(workdir) as manager:
        newest = _newest_run(manager)
        if newest is None:
            raise PretrainedError(f"{workdir}/checkpoints holds no complete checkpoint yet")
        step, run = newest
        if run.task != "pretrain":
            raise PretrainedError(f"{workdir} is a {run.task} run, not MAE pretraining")
        config = configuration.model_config(run)
        _, params, fixed = nnx.split(nnx.eval_shape(lambda: MAE(config, rngs=nnx.Rngs(0))), nnx.Param, ...)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), {"params": params, "fixed": fixed}
        )
        restore = ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
        restored = manager.restore(step, args=ocp.args.Composite(state=restore)).state
    print(f"Loaded step {step} of {workdir}")
    # A run with scanned blocks saved them stacked; `load` gives every location's state unrolled.
    return unrolled(config), unrolled_layout(nnx.merge_state(restored["params"], restored["fixed"]))
