"""Orbax checkpoints: the full train state in a workdir, and standalone parameter directories.

A parameter directory holds `model.json` (the model config) and `params/` (an Orbax pytree of the
model's parameters and fixed position tables). It is what `convert` reads and writes.
"""

from __future__ import annotations

import json
from typing import Any

import grain
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


class DataState:
    """A data-iterator state taken with its batch; grain's Orbax handler writes one file per process."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        """grain's handler calls this after `set_state`; a snapshot has nothing to start."""


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict, config: dict) -> None:
    """Start an async save of the train state, every host's data-iterator state and the config."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(DataState(data_state)),
        config=ocp.args.JsonSave(config),
    )
    manager.save(step, args=args)


def restore_latest(manager: ocp.CheckpointManager, abstract_state) -> tuple[Any, dict] | None:
    """The newest complete (train state, this host's data-iterator state), placed as `abstract_state` says."""
    step = manager.latest_step()
    if step is None:
        return None
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(DataState())
    )
    restored = manager.restore(step, args=args)
    return restored.state, restored.data.state
