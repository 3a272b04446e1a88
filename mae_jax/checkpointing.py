"""Orbax checkpoints: the full train state in a workdir, and standalone parameter directories.

A parameter directory holds `model.json` (the model config) and `params/` (an Orbax pytree of the
model's parameters and fixed position tables). It is what `convert` reads and writes.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mae_jax.models.mae import MAE, MAEConfig
from mae_jax.models.vit import Encoder

MODEL_CONFIG_FILE = "model.json"
PARAMS_DIR = "params"


def abstract_model_state(config: MAEConfig) -> nnx.State:
    """Shapes and dtypes of every variable of the model, without allocating it."""
    return nnx.state(nnx.eval_shape(lambda: MAE(config, rngs=nnx.Rngs(0))))


def save_params(directory: str | epath.Path, config: MAEConfig, state: nnx.State | dict) -> None:
    """Write a parameter directory of a whole MAE state or of its `{"encoder": ...}` part; never overwrites."""
    directory = epath.Path(directory)
    if (directory / PARAMS_DIR).exists():
        raise FileExistsError(f"{directory / PARAMS_DIR} already exists; choose a new output directory")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((directory / PARAMS_DIR).absolute(), nnx.to_pure_dict(nnx.State(state)))
    if jax.process_index() == 0:
        (directory / MODEL_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))


def load_params(directory: str | epath.Path) -> tuple[MAEConfig, nnx.State]:
    """Read a parameter directory written by `save_params`; an encoder-only one gives `{"encoder": ...}`."""
    directory = epath.Path(directory)
    config_file = directory / MODEL_CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"{directory} is not a mae_jax parameter directory: {MODEL_CONFIG_FILE} is missing")
    config = MAEConfig.from_dict(json.loads(config_file.read_text()))
    path = (directory / PARAMS_DIR).absolute()
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a mae_jax parameter directory: {PARAMS_DIR}/ is missing")
    state = abstract_model_state(config)
    with ocp.StandardCheckpointer() as checkpointer:
        parts = checkpointer.metadata(path).item_metadata.keys()
        state = nnx.State({part: state[part] for part in parts})
        pure = checkpointer.restore(path, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return config, state


def export_encoder(directory: str | epath.Path, config: MAEConfig, params: nnx.State, fixed: nnx.State) -> None:
    """The pretrained encoder alone (parameters and position table): the input of fine-tuning and `convert`."""
    encoder = nnx.merge_state(nnx.State({"encoder": params["encoder"]}), nnx.State({"encoder": fixed["encoder"]}))
    save_params(directory, config, encoder)


def load_encoder(directory: str | epath.Path) -> Encoder:
    """A standalone `Encoder` from a parameter directory (encoder-only or whole MAE)."""
    config, state = load_params(directory)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Encoder(config.encoder, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, state["encoder"])


# ---------------------------------------------------------------------------------------------------
# Train-state checkpoints in a workdir
# ---------------------------------------------------------------------------------------------------
# Keys whose change alters the parameters' shapes or meaning: a workdir's checkpoint must agree on them.
MODEL_KEYS = (
    "task",
    "image_size",
    "num_classes",
    "model.variant",
    "model.decoder_width",
    "model.decoder_depth",
    "model.decoder_heads",
    "model.global_pool",
)


class CheckpointError(RuntimeError):
    """The workdir cannot be used as asked; the message is one line saying why."""


def check_writable(workdir: epath.Path) -> None:
    """Fail at start, not at the first save hours later."""
    probe = workdir / f".write_test_{jax.process_index()}"
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise CheckpointError(f"workdir {workdir} is not writable: {error}") from error


def make_manager(workdir: epath.Path, keep: int) -> ocp.CheckpointManager:
    """Async manager of `workdir/checkpoints/<step>/{state,data,config}`.

    A save is written to a temporary folder and renamed when complete, so a run killed mid-save leaves the
    previous checkpoint as the newest; the leftover folder is removed here, at the next start.
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(workdir.absolute() / "checkpoints", options=options)


def check_same_model(manager: ocp.CheckpointManager, config: dict) -> None:
    """Refuse to resume (and later overwrite) a workdir whose newest checkpoint is of another model."""
    step = manager.latest_step()
    if step is None:
        return
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def lookup(tree: dict, dotted: str) -> Any:
        for part in dotted.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    differences = [
        f"{key}: {lookup(saved, key)!r} in the checkpoint, {lookup(config, key)!r} now"
        for key in MODEL_KEYS
        if lookup(saved, key) != lookup(config, key)
    ]
    if differences:
        raise CheckpointError(
            f"{manager.directory} holds step {step} of a different model ({'; '.join(differences)}); "
            "use another --workdir, or the checkpoint's settings to resume it"
        )


class PreemptionWatch:
    """Says when the run must save and stop: SIGTERM on one host; JAX's preemption sync point on several.

    With several hosts JAX's preemption notifier owns SIGTERM and makes every host agree on the step; a
    single process has no such service, so a handler records the signal and the loop stops at the next step.
    """

    def __init__(self):
        self._signalled = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        del signum, frame
        self._signalled = True

    def reached(self, manager: ocp.CheckpointManager, step: int) -> bool:
        return self._signalled or (jax.process_count() > 1 and manager.reached_preemption(step))

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


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
