"""Orbax checkpoints: the full train state in a workdir, and standalone parameter directories.

A parameter directory holds `model.json` (the model config) and `params/` (an Orbax pytree of the
model's parameters and fixed position tables). It is what `convert` reads and writes.
"""

from __future__ import annotations

import json

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mae_jax.models.mae import MAE, MAEConfig

MODEL_CONFIG_FILE = "model.json"
PARAMS_DIR = "params"


def abstract_model_state(config: MAEConfig) -> nnx.State:
    """Shapes and dtypes of every variable of the model, without allocating it."""
    return nnx.state(nnx.eval_shape(lambda: MAE(config, rngs=nnx.Rngs(0))))


def save_params(directory: str | epath.Path, config: MAEConfig, state: nnx.State) -> None:
    """Write a parameter directory; refuses to overwrite an existing one."""
    directory = epath.Path(directory)
    if (directory / PARAMS_DIR).exists():
        raise FileExistsError(f"{directory / PARAMS_DIR} already exists; choose a new output directory")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((directory / PARAMS_DIR).absolute(), nnx.to_pure_dict(state))
    if jax.process_index() == 0:
        (directory / MODEL_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))


def load_params(directory: str | epath.Path) -> tuple[MAEConfig, nnx.State]:
    """Read a parameter directory written by `save_params` into host arrays."""
    directory = epath.Path(directory)
    config_file = directory / MODEL_CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"{directory} is not a mae_jax parameter directory: {MODEL_CONFIG_FILE} is missing")
    config = MAEConfig.from_dict(json.loads(config_file.read_text()))
    state = abstract_model_state(config)
    with ocp.StandardCheckpointer() as checkpointer:
        pure = checkpointer.restore((directory / PARAMS_DIR).absolute(), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return config, state


# ---------------------------------------------------------------------------------------------------
# Train-state checkpoints in a workdir
# ---------------------------------------------------------------------------------------------------
def make_manager(workdir: str | epath.Path, keep: int) -> ocp.CheckpointManager:
    """Async manager of `workdir/checkpoints/<step>/{state,config}`; half-written saves are ignored on restore."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(epath.Path(workdir).absolute() / "checkpoints", options=options)


def save(manager: ocp.CheckpointManager, step: int, state, config: dict) -> None:
    """Start an async save of the train state and the config that produced it."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
    manager.save(step, args=args)


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
    """The newest complete train state, placed with the shardings of `abstract_state`; None if there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored.state
