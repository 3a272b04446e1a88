"""Orbax checkpoints: the full train state in a workdir, and standalone parameter directories.

A parameter directory holds `model.json` (the model config) and `params/` (an Orbax pytree of the
model's parameters and fixed position tables). It is what `convert` reads and writes. The encoder a
pretraining run exports (`export_encoder`) also has `step.json`, the training step it holds. Parameter
directories are always in the unrolled layout (one entry per block), whichever layout the run computed in
(`Compute.scan_blocks`); a workdir's train state keeps the run's layout.

`model.json` and `step.json` are written after `params/` is complete, in the directory's final place: they
are what says the directory is whole. On `gs://` a directory rename is a copy and then a delete, in no
guaranteed order, so a directory caught in the middle of one holds some of its files; without its markers no
reader takes it.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from mae_jax.models.mae import MAEConfig, abstract_model_state
from mae_jax.models.vit import Encoder, unrolled, unrolled_layout
from mae_jax.newest_checkpoint import CHECKPOINTS_DIR

MODEL_CONFIG_FILE = "model.json"
PARAMS_DIR = "params"
EXPORT_STEP_FILE = "step.json"  # next to an exported encoder: the training step it holds


def save_params(directory: str | epath.Path, config: MAEConfig, state: nnx.State | dict) -> None:
    """Write a parameter directory of a whole MAE state or of its `{"encoder": ...}` part; never overwrites.

    Stacked blocks are written unrolled, and `model.json` says so (scan_blocks false): the directory loads
    into either layout (`models.vit.scanned_layout`).
    """
    directory = epath.Path(directory)
    if (directory / PARAMS_DIR).exists():
        raise FileExistsError(f"{directory / PARAMS_DIR} already exists; choose a new output directory")
    directory.mkdir(parents=True, exist_ok=True)
    _save_param_tree(directory / PARAMS_DIR, state)
    if jax.process_index() == 0:
        _write_model_config(directory, config)


def _save_param_tree(path: epath.Path, state: nnx.State | dict) -> None:
    """The `params/` part of a parameter directory, unrolled; every process writes its shards."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path.absolute(), unrolled_layout(nnx.to_pure_dict(nnx.State(state))))


def _write_model_config(directory: epath.Path, config: MAEConfig) -> None:
    """`model.json`: written once `params/` is complete, it marks the parameter directory whole."""
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(unrolled(config).to_dict(), indent=2))


def load_params(directory: str | epath.Path) -> tuple[MAEConfig, nnx.State]:
    """Read a parameter directory written by `save_params`; an encoder-only one gives `{"encoder": ...}`."""
    directory = epath.Path(directory)
    config_file = directory / MODEL_CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(
            f"{directory} is not a mae_jax parameter directory: {MODEL_CONFIG_FILE} is missing "
            "(it is written last: a directory whose writing or move was interrupted has none)"
        )
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


def exported_step(directory: str | epath.Path) -> int | None:
    """The training step of the encoder exported to `directory`; None when there is none or it is incomplete.

    `step.json` is the last file an export writes: without it, whatever the directory holds is not trusted.
    """
    directory = epath.Path(directory)
    if not (directory / PARAMS_DIR).exists() or not (directory / EXPORT_STEP_FILE).exists():
        return None
    return int(json.loads((directory / EXPORT_STEP_FILE).read_text())["step"])


def export_encoder(
    directory: str | epath.Path, config: MAEConfig, params: nnx.State, fixed: nnx.State, *, step: int
) -> None:
    """The pretrained encoder alone (parameters and position table) of training `step`: the input of
    fine-tuning and `convert`. It replaces an earlier export whole.

    `params/` is written to a sibling directory and moved into place once complete, so a crash while writing
    leaves the previous export as it was. The previous export's markers go before any of its files, and the new
    markers (`model.json`, then `step.json`) are written last in the final place: a crash while moving, where a
    move is a copy and then a delete (`gs://`), leaves a directory that no reader takes and the rerun redoes.
    """
    directory = epath.Path(directory)
    staging = directory.parent / f".{directory.name}.tmp"
    primary = jax.process_index() == 0
    if primary and staging.exists():  # a crashed export's leftovers
        staging.rmtree()
    ocp.multihost.sync_global_processes(f"export_encoder_{step}_staging")  # every host writes its part
    encoder = nnx.merge_state(nnx.State({"encoder": params["encoder"]}), nnx.State({"encoder": fixed["encoder"]}))
    staging.mkdir(parents=True, exist_ok=True)
    _save_param_tree(staging / PARAMS_DIR, encoder)
    if primary:
        for marker in (EXPORT_STEP_FILE, MODEL_CONFIG_FILE):  # from here on the previous export is not trusted
            (directory / marker).unlink(missing_ok=True)
        if directory.exists():
            directory.rmtree()
        staging.rename(directory)
        _write_model_config(directory, config)
        (directory / EXPORT_STEP_FILE).write_text(json.dumps({"step": step}))  # last: the export is whole
    ocp.multihost.sync_global_processes(f"export_encoder_{step}_done")


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
    "num_channels",
    "num_classes",
    "model.variant",
    "model.decoder_width",
    "model.decoder_depth",
    "model.decoder_heads",
    "model.global_pool",
    "model.scan_blocks",  # the train state's layout: stacked blocks or a list
)
# Model keys that a checkpoint saved before they existed has at these values.
MODEL_KEY_DEFAULTS = {"model.scan_blocks": False}


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
    return ocp.CheckpointManager(workdir.absolute() / CHECKPOINTS_DIR, options=options)


def _saved_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The config saved with `step`: a `run_record`, or a plain config where mae_jax <= 07cd2d5 wrote it."""
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def _lookup(tree: dict, dotted: str) -> Any:
    """tree["a"]["b"] for "a.b"; None where a part is missing."""
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def check_same_model(manager: ocp.CheckpointManager, config: dict) -> None:
    """Refuse to resume (and later overwrite) a workdir whose newest checkpoint is of another model."""
    step = manager.latest_step()
    if step is None:
        return
    saved = _saved_config(manager, step)

    def saved_value(key: str) -> Any:
        value = _lookup(saved, key)
        return MODEL_KEY_DEFAULTS.get(key) if value is None else value

    differences = [
        f"{key}: {saved_value(key)!r} in the checkpoint, {_lookup(config, key)!r} now"
        for key in MODEL_KEYS
        if saved_value(key) != _lookup(config, key)
    ]
    if differences:
        raise CheckpointError(
            f"{manager.directory} holds step {step} of a different model ({'; '.join(differences)}); "
            "use another --workdir, or the checkpoint's settings to resume it"
        )


# The run's recipe: changed across a resume, step k would no longer be the saved run's step k (another data
# order or position, masking noise, loss, learning rate or update rule), so a resume must keep them. Every
# other key may change: intervals, input threads, mesh, compute dtype, attention, kernels, remat, grad_accum_steps
# (the same batch gradient), skip_nonfinite_steps, profiling, peak_tflops, kNN, evaluation, init, dataset.data_dir.
RUN_KEYS = (
    "seed",
    "batch_size",
    "dataset.source",
    "dataset.name",
    "dataset.split",
    "dataset.num_train",
    "dataset.mean",
    "dataset.std",
    "mask_ratio",
    "model.masking",
    "model.mask_tokens_in_encoder",
    "model.norm_pix_loss",
    "model.drop_path",
    "base_lr",
    "min_lr",
    "weight_decay",
    "b1",
    "b2",
    "layer_decay",
    "augment.crop",
    "augment.crop_scale",
    "augment.rand_augment",
    "augment.mixup",
    "augment.cutmix",
    "augment.mixup_switch_prob",
    "augment.label_smoothing",
    "augment.random_erasing",
)
# What the config resolves to on the run's data, saved beside it: epochs become steps through the dataset size.
RESOLVED_KEY = "resolved"
RESOLVED_NAMES = {
    "num_examples": "training examples",
    "total_steps": "total steps (from num_epochs or total_steps)",
    "warmup_steps": "warmup steps (from warmup_epochs or warmup_steps)",
}


def run_record(config: ml_collections.ConfigDict, *, num_examples: int, total_steps: int, warmup_steps: int) -> dict:
    """The config a checkpoint saves: the run's config with what it resolved to (`RESOLVED_KEY`)."""
    resolved = {"num_examples": num_examples, "total_steps": total_steps, "warmup_steps": warmup_steps}
    return config.to_dict() | {RESOLVED_KEY: resolved}


def check_same_run(manager: ocp.CheckpointManager, record: dict) -> None:
    """Refuse to resume a workdir whose newest checkpoint has another recipe (`RUN_KEYS`, `RESOLVED_NAMES`).

    `record` is this run's `run_record`. A key the checkpoint's config lacks (saved before it existed)
    counts as unchanged.
    """
    step = manager.latest_step()
    if step is None:
        return
    saved = _saved_config(manager, step)
    record = json.loads(json.dumps(record))  # as saved: tuples (dataset.mean) come back as lists
    labels = {key: key for key in RUN_KEYS} | {f"{RESOLVED_KEY}.{k}": name for k, name in RESOLVED_NAMES.items()}
    differences = [
        f"{label}: {_lookup(saved, key)!r} in the checkpoint, {_lookup(record, key)!r} now"
        for key, label in labels.items()
        if _lookup(saved, key) is not None and _lookup(saved, key) != _lookup(record, key)
    ]
    if differences:
        raise CheckpointError(
            f"{manager.directory} holds step {step} of a run with other settings ({'; '.join(differences)}); "
            "a resumed run must keep them: use the checkpoint's values, or another --workdir"
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


def save(manager: ocp.CheckpointManager, step: int, state, config: dict) -> None:
    """Start an async save of the train state, the data position and the config.

    The data position is global: the `step * batch_size` examples of the training stream read so far
    (`input_pipeline.train_dataset`), the same on every host and for any host count. It is written for
    the record; a restore derives it from the step.
    """
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"position": step * config["batch_size"]}),
        config=ocp.args.JsonSave(config),
    )
    manager.save(step, args=args)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Any:
    """The newest complete train state, placed as `abstract_state` says, or None in an empty workdir.

    The data stream resumes at position `step * batch_size`; the "data" item is not read, so a checkpoint
    restores on any number of hosts, also one whose "data" holds grain's per-process iterator states.
    """
    step = manager.latest_step()
    if step is None:
        return None
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    try:
        return manager.restore(step, args=args).state
    except ValueError as error:  # Orbax: the saved tree is not this train state's (another mae_jax version)
        cause = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"{manager.directory}/{step} holds a train state of another layout than this run's ({cause}); it was "
            "written by another mae_jax version: resume it with that version, or use another --workdir"
        ) from error


def restore_train_state(manager: ocp.CheckpointManager, abstract_state: Any) -> Any:
    """`restore_latest`, also of a workdir whose optimizer state lacks `optax.apply_if_finite`'s counters.

    The optimizer state always has apply_if_finite's layout now (`optim._skip_nonfinite`); mae_jax up to
    07cd2d5 saved the bare optimizer state when skip_nonfinite_steps was 0. Such a checkpoint restores as the
    inner state, with the counters at their initial values.
    """
    step = manager.latest_step()
    target = abstract_state.opt_state
    if step is None or not isinstance(target, optax.ApplyIfFiniteState):
        return restore_latest(manager, abstract_state)
    path = ocp.step.build_step_path(manager.directory, ocp.step.standard_name_format(), step) / "state"
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.metadata(path).item_metadata["opt_state"]
    if isinstance(saved, dict) and "inner_state" in saved:
        return restore_latest(manager, abstract_state)
    state = restore_latest(manager, abstract_state.replace(opt_state=target.inner_state))

    def place(value: jax.Array, like: jax.ShapeDtypeStruct) -> jax.Array:  # as the target says, on every host
        return jax.make_array_from_callback(like.shape, like.sharding, lambda index: np.asarray(value)[index])

    initial = optax.apply_if_finite(optax.identity(), 0).init({})._replace(inner_state=None)
    counters = jax.tree.map(place, initial, target._replace(inner_state=None))
    logging.info("Step %d holds the optimizer state without apply_if_finite's counters (mae_jax <= 07cd2d5)", step)
    return state.replace(opt_state=counters._replace(inner_state=state.opt_state))
