"""Resuming a workdir: what may change across a resume continues the run, what would change a step is refused.

`skip_nonfinite_steps` may be switched on or off (the NaN recovery the NonFiniteError suggests), also for a
checkpoint of mae_jax <= 07cd2d5 whose optimizer state had no apply_if_finite counters. A changed recipe key
(`checkpointing.RUN_KEYS` and what the config resolves to) is a one-line CheckpointError before compiling.
"""

from __future__ import annotations

import functools
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from etils import epath
from tensorboard.backend.event_processing import event_accumulator

from mae_jax import checkpointing, configuration, finetune, input_pipeline, loop, optim, train
from tests.conftest import tiny_downstream_config, tiny_train_config, with_overrides
from tests.test_checkpointing import ZeroImageMakesNaN

STEPS = 4


def run(workdir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, *, stop_after: int | None = None, **overrides):
    """The tiny run of STEPS steps; with `stop_after`, preempted (saved, `loop.Preempted`) after that step."""
    config = tiny_train_config(total_steps=STEPS, checkpoint_every_steps=100, log_every_steps=100, **overrides)
    if stop_after is None:
        return train.train_and_evaluate(config, str(workdir))
    with monkeypatch.context() as patch, pytest.raises(loop.Preempted, match=f"at step {stop_after}:"):
        patch.setattr(checkpointing.PreemptionWatch, "reached", lambda self, manager, step: step == stop_after)
        train.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """The parameters after STEPS steps of one uninterrupted run, skip_nonfinite_steps = 0."""
    state = run(tmp_path_factory.mktemp("uninterrupted"), pytest.MonkeyPatch())
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def saved_opt_state(workdir: pathlib.Path, step: int):
    """The layout (metadata) of the optimizer state saved at `step`."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.metadata(workdir / "checkpoints" / str(step) / "state").item_metadata["opt_state"]


def assert_same_params(state: loop.TrainState, expected: list[np.ndarray], *, exact: bool = True) -> None:
    """Bit for bit; or, where steps ran with skipping on, within a tenth of one step's largest change.

    apply_if_finite's conditional compiles the update apart, which moves it by an ulp, and Adam's m / sqrt(v)
    enlarges that where a gradient is ~0; a reset optimizer state or another learning rate would move
    parameters by a good part of a step.
    """
    assert int(state.step) == STEPS
    config = tiny_train_config()
    step_size = optim.learning_rate(config.base_lr, config.batch_size)
    for ours, theirs in zip(jax.tree.leaves(state.params), expected, strict=True):
        if exact:
            np.testing.assert_array_equal(np.asarray(ours), theirs)
        else:
            np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=0.1 * step_size)


# ---------------------------------------------------------------------------------------------------
# skip_nonfinite_steps across a resume
# ---------------------------------------------------------------------------------------------------
def optimizers(skip: int) -> dict[str, optax.GradientTransformation]:
    config = configuration.downstream_config("finetune")
    config.skip_nonfinite_steps = skip
    schedule = optax.constant_schedule(1e-3)
    return {
        "pretrain": optim.make_optimizer(config, schedule),
        "finetune": optim.make_finetune_optimizer(config, schedule, depth=1),
        "linprobe": optim.make_linprobe_optimizer(config, schedule),
    }


@pytest.mark.parametrize("kind", ["pretrain", "finetune", "linprobe"])
def test_optimizer_state_has_one_layout_whatever_skip_nonfinite_steps(kind: str):
    params = {"encoder": {"blocks": {"0": {"kernel": jnp.ones((2, 2))}}}, "head": {"bias": jnp.ones(2)}}
    layouts = {skip: jax.tree.structure(optimizers(skip)[kind].init(params)) for skip in (0, 1, 3)}
    assert layouts[0] == layouts[1] == layouts[3]


def test_skip_nonfinite_steps_0_updates_as_apply_if_finite_with_0_errors_allowed():
    """Off, every update is applied as optax's apply_if_finite(tx, 0) would, a non-finite one too (the run's
    guard stops there), without its conditional in the step."""
    config = configuration.base_config()
    schedule = optax.constant_schedule(1e-3)
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=optim.decay_mask)
    reference = optax.apply_if_finite(adamw, max_consecutive_errors=0)
    ours = optim.make_optimizer(config, schedule)
    params = {"kernel": jnp.arange(4.0).reshape(2, 2), "bias": jnp.ones(2)}
    state, expected_state = ours.init(params), reference.init(params)
    for grads in (jax.tree.map(lambda p: p * 0.5 + 1, params), jax.tree.map(lambda p: p * jnp.nan, params)):
        updates, state = ours.update(grads, state, params)
        expected, expected_state = reference.update(grads, expected_state, params)
        same = functools.partial(np.testing.assert_allclose, rtol=1e-6)  # the conditional compiles apart: 1 ulp
        jax.tree.map(same, (updates, state.inner_state), (expected, expected_state.inner_state))
    assert not all(np.isfinite(x).all() for x in jax.tree.leaves(updates))


def test_switching_skip_nonfinite_steps_on_and_off_across_resumes_continues_the_run(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: list[np.ndarray]
):
    run(tmp_path, monkeypatch, stop_after=1)  # off
    run(tmp_path, monkeypatch, stop_after=3, skip_nonfinite_steps=2)  # on
    assert_same_params(run(tmp_path, monkeypatch), uninterrupted, exact=False)  # off again


def test_checkpoint_without_apply_if_finite_counters_resumes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: list[np.ndarray]
):
    """mae_jax <= 07cd2d5 saved the bare optimizer state when skip_nonfinite_steps was 0."""
    with monkeypatch.context() as patch:
        patch.setattr(optim, "_skip_nonfinite", lambda tx, config: tx)  # what 07cd2d5 built with 0
        run(tmp_path, monkeypatch, stop_after=2)
    assert "inner_state" not in saved_opt_state(tmp_path, 2)
    assert_same_params(run(tmp_path, monkeypatch), uninterrupted)


def skip_config(skip: int):
    config = configuration.base_config()
    config.skip_nonfinite_steps = skip
    return config


def test_skip_nonfinite_steps_0_ends_a_streak_a_resumed_checkpoint_holds():
    """A checkpoint saved inside a streak of skipped steps (N > 0) resumed with 0: its finite step ends the streak,
    as apply_if_finite's count does, so a later resume with N > 0 does not count the old streak on."""
    schedule = optax.constant_schedule(1e-3)
    skipping, stopping = (optim.make_optimizer(config, schedule) for config in map(skip_config, (2, 0)))
    params = {"kernel": jnp.ones((2, 2))}
    state = skipping.init(params)
    for _ in range(2):
        _, state = skipping.update(jax.tree.map(lambda p: p * jnp.nan, params), state, params)
    assert optim.nonfinite_streak(state) == 2
    _, state = stopping.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert optim.nonfinite_streak(state) == 0


NONFINITE_STEPS = (2, 4, 5, 6)  # with skip_nonfinite_steps=2: 4 and 5 are skipped, 6 is the third in a row


def source_with_nonfinite_steps(config, steps: tuple[int, ...]) -> list[dict]:
    """Distinct gray images, and a black one (a NaN loss under `ZeroImageMakesNaN`) in each of `steps`' batches.

    The stream's order depends on the seed and the number of images alone, so a gray source shows where each
    image goes.
    """
    source = [{"image": np.full((16, 16, 3), i + 1, np.uint8), "label": i, "name": str(i)} for i in range(64)]
    batches = iter(input_pipeline.train_dataset(source, config, input_pipeline.SkippedImages()))
    for step in range(1, max(steps) + 1):
        labels = next(batches)["label"]
        if step in steps:
            source[labels[0]]["image"] = np.zeros((16, 16, 3), np.uint8)
    return source


def logged(workdir: pathlib.Path, key: str) -> dict[int, float]:
    """Step -> the value of `key` the run wrote to its TensorBoard events."""
    values = {}
    for events in sorted(workdir.glob("events.out.tfevents.*")):
        accumulator = event_accumulator.EventAccumulator(str(events))
        accumulator.Reload()
        values |= {event.step: event.value for event in accumulator.Scalars(key)}
    return values


def streak_config():
    return tiny_train_config(total_steps=7, checkpoint_every_steps=100, log_every_steps=1, skip_nonfinite_steps=2)


def inject_nonfinite_steps(patch: pytest.MonkeyPatch) -> None:
    """NONFINITE_STEPS of `streak_config`'s run get a NaN loss and gradients."""
    source = source_with_nonfinite_steps(streak_config(), NONFINITE_STEPS)
    patch.setattr(input_pipeline, "make_source", lambda dataset: source)
    patch.setattr(input_pipeline, "normalize", ZeroImageMakesNaN(input_pipeline.normalize))


@pytest.fixture(scope="module")
def preempted_in_a_streak(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A workdir whose run skipped steps 2, 4 and 5 and was preempted at 5, inside a streak of 2."""
    workdir = tmp_path_factory.mktemp("streak")
    with pytest.MonkeyPatch.context() as patch, pytest.raises(loop.Preempted, match="at step 5:"):
        inject_nonfinite_steps(patch)
        patch.setattr(checkpointing.PreemptionWatch, "reached", lambda self, manager, step: step == 5)
        train.train_and_evaluate(streak_config(), str(workdir))
    return workdir


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a summary of skipped steps only: NaN, no warning
def test_nonfinite_streak_across_a_resume_stops_the_run_before_its_update_is_saved(
    preempted_in_a_streak: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
):
    """Resumed at step 5, the run must stop at 6, the third non-finite step in a row: apply_if_finite, whose
    count came back with the checkpoint, applies it."""
    workdir = tmp_path / "run"
    shutil.copytree(preempted_in_a_streak, workdir)
    inject_nonfinite_steps(monkeypatch)
    with pytest.raises(loop.NonFiniteError, match=r"at step 6 .*3 in a row, skip_nonfinite_steps=2"):
        train.train_and_evaluate(streak_config(), str(workdir))
    assert max(int(p.name) for p in (workdir / "checkpoints").iterdir()) == 5
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.restore(workdir / "checkpoints" / "5" / "state")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["params"]))


def test_logged_lr_is_the_rate_applied_after_skipped_steps(preempted_in_a_streak: pathlib.Path):
    """The rate of update k is optax's schedule at the updates applied before it, which skipped steps do not
    advance (the train step does)."""
    config = streak_config()
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, optim.learning_rate(config.base_lr, config.batch_size), 1, config.total_steps, end_value=config.min_lr
    )
    lr = logged(preempted_in_a_streak, "lr")
    steps = [1, 2, 3, 4, 5]
    assert sorted(lr) == steps
    applied_before = [step - 1 - sum(bad < step for bad in NONFINITE_STEPS) for step in steps]
    np.testing.assert_allclose([lr[step] for step in steps], [schedule(n) for n in applied_before], rtol=1e-6)


@pytest.mark.parametrize("task", ["finetune", "linprobe"])
def test_downstream_run_resumes_with_skip_nonfinite_steps_switched(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, task: str
):
    def config(skip: int):  # a 2-step run from random init on mocked ImageNet
        return tiny_downstream_config(task, skip_nonfinite_steps=skip)

    with tfds.testing.mock_data(num_examples=16):
        with monkeypatch.context() as patch, pytest.raises(loop.Preempted, match="at step 1:"):
            patch.setattr(checkpointing.PreemptionWatch, "reached", lambda self, manager, step: step == 1)
            finetune.train_and_evaluate(config(0), str(tmp_path))
        finetune.train_and_evaluate(config(2), str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


# ---------------------------------------------------------------------------------------------------
# The run's recipe across a resume
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preempted(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A workdir holding step 1 of the tiny run: batch 8 of the 16 demo photos, total_steps 4, warmup 1."""
    workdir = tmp_path_factory.mktemp("preempted")
    run(workdir, pytest.MonkeyPatch(), stop_after=1)
    return workdir


def fewer_photos(dataset) -> list:
    """The demo source less 4 photos."""
    return list(input_pipeline.DemoPhotos())[:12]


REFUSED = [  # (overrides, what the one-line error says)
    ({"seed": 1}, "seed: 0 in the checkpoint, 1 now"),
    ({"batch_size": 16}, "batch_size: 8 in the checkpoint, 16 now"),
    ({"mask_ratio": 0.5}, "mask_ratio: 0.75 in the checkpoint, 0.5 now"),
    ({"model.mask_tokens_in_encoder": True}, "model.mask_tokens_in_encoder: False in the checkpoint, True now"),
    ({"model.norm_pix_loss": False}, "model.norm_pix_loss: True in the checkpoint, False now"),
    ({"model.masking": "block"}, "model.masking: 'random' in the checkpoint, 'block' now"),
    ({"dataset.mean": (0.5, 0.5, 0.5)}, "dataset.mean: [0.485, 0.456, 0.406] in the checkpoint, [0.5, 0.5, 0.5] now"),
    ({"base_lr": 1e-3}, "base_lr: 0.002 in the checkpoint, 0.001 now"),
    ({"min_lr": 1e-6}, "min_lr: 0.0 in the checkpoint, 1e-06 now"),
    ({"weight_decay": 0.0}, "weight_decay: 0.05 in the checkpoint, 0.0 now"),
    ({"b2": 0.999}, "b2: 0.95 in the checkpoint, 0.999 now"),
    ({"dataset.split": "test"}, "dataset.split: 'train' in the checkpoint, 'test' now"),
    ({"total_steps": 8}, "total steps (from num_epochs or total_steps): 4 in the checkpoint, 8 now"),
    ({"total_steps": -1, "num_epochs": 1}, "total steps (from num_epochs or total_steps): 4 in the checkpoint, 2 now"),
    ({"warmup_steps": 2}, "warmup steps (from warmup_epochs or warmup_steps): 1 in the checkpoint, 2 now"),
    ({"make_source": fewer_photos}, "training examples: 16 in the checkpoint, 12 now"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSED, ids=[message.split(":")[0] for _, message in REFUSED])
def test_changed_recipe_is_refused_in_one_line_before_compiling(
    preempted: pathlib.Path, monkeypatch: pytest.MonkeyPatch, overrides: dict, message: str
):
    overrides = dict(overrides)
    if "make_source" in overrides:
        monkeypatch.setattr(input_pipeline, "make_source", overrides.pop("make_source"))
    monkeypatch.setattr(checkpointing, "restore_train_state", lambda *args: pytest.fail("got past the set-up"))
    before = sorted(str(p) for p in preempted.rglob("*"))
    config = tiny_train_config(**{"total_steps": STEPS, "checkpoint_every_steps": 100, **overrides})
    with pytest.raises(checkpointing.CheckpointError) as error:
        train.train_and_evaluate(config, str(preempted))
    text = str(error.value)
    assert "\n" not in text and f"holds step 1 of a run with other settings ({message});" in text
    assert sorted(str(p) for p in preempted.rglob("*")) == before


def test_keys_that_do_not_change_a_step_may_change_across_a_resume(preempted: pathlib.Path, tmp_path: pathlib.Path):
    workdir = tmp_path / "run"
    shutil.copytree(preempted, workdir)
    free = {  # num_epochs 2 of the 16 photos in batches of 8 resolves to the same 4 steps
        "total_steps": -1, "num_epochs": 2, "grad_accum_steps": 2, "skip_nonfinite_steps": 3, "model.remat": True,
        "model.kernels": "autodiff",
        "log_every_steps": 1, "checkpoint_every_steps": 1, "keep_checkpoints": 1,
        "evals.reconstruction.every_steps": 2, "evals.reconstruction.num_images": 1, "input.num_threads": 1,
        "input.resize_on_device": False, "evals.knn.k": 5,
        "dataset.data_dir": "/elsewhere", "compilation_cache": False, "peak_tflops": 100.0,
    }  # fmt: skip
    state = train.train_and_evaluate(tiny_train_config(**free), str(workdir))
    assert int(state.step) == STEPS
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def saved_record(workdir: pathlib.Path, record: dict) -> ocp.CheckpointManager:
    """A manager of `workdir` holding step 1 with `record` as its saved config."""
    manager = checkpointing.make_manager(epath.Path(workdir), 1)
    checkpointing.save(manager, 1, {"x": jnp.zeros(1)}, record)
    manager.wait_until_finished()
    return manager


def finetune_record(config) -> dict:
    return checkpointing.run_record(config, num_examples=1000, total_steps=100, warmup_steps=10)


@pytest.mark.parametrize(
    ("task", "key", "old", "new"),
    [
        ("finetune", "layer_decay", 0.65, 0.75),
        ("finetune", "model.drop_path", 0.1, 0.2),
        ("finetune", "augment.mixup", 0.8, 0.0),
        ("finetune", "augment.random_erasing", 0.25, 0.0),
        ("linprobe", "dataset.num_train", -1, 100),
        ("linprobe", "base_lr", 0.1, 0.2),
    ],
)
def test_changed_downstream_recipe_is_refused(tmp_path: pathlib.Path, task: str, key: str, old, new):
    config = configuration.downstream_config(task)
    manager = saved_record(tmp_path, finetune_record(config))
    free = {
        "evals.classification.every_steps": 7, "evals.classification.batch_size": 64, "init": "elsewhere",
        "evals.classification.split": "test",
    }  # fmt: skip
    checkpointing.check_same_run(manager, finetune_record(with_overrides(configuration.downstream_config(task), free)))
    changed = with_overrides(configuration.downstream_config(task), {key: new})
    message = f"{key}: {old!r} in the checkpoint, {new!r} now"
    with pytest.raises(checkpointing.CheckpointError, match=re.escape(message)):
        checkpointing.check_same_run(manager, finetune_record(changed))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("augment.crop_scale", (0.5, 1.0), "augment.crop_scale: [0.08, 1.0] in the checkpoint, [0.5, 1.0] now"),
        ("augment.crop", "center", "augment.crop: 'random' in the checkpoint, 'center' now"),
    ],
)
def test_changed_training_crop_is_refused(tmp_path: pathlib.Path, key: str, value, message: str):
    manager = saved_record(tmp_path, finetune_record(configuration.downstream_config("linprobe")))
    changed = with_overrides(configuration.downstream_config("linprobe"), {key: value})
    with pytest.raises(checkpointing.CheckpointError, match=re.escape(message)):
        checkpointing.check_same_run(manager, finetune_record(changed))


def test_keys_a_checkpoint_lacks_count_as_unchanged(tmp_path: pathlib.Path):
    """Configs saved before a key existed (or before the resolved steps were saved) resume."""
    old = configuration.base_config().to_dict()
    del old["mask_ratio"], old["model"]["norm_pix_loss"]
    manager = saved_record(tmp_path, old)
    config = with_overrides(configuration.base_config(), {"mask_ratio": 0.5, "model.norm_pix_loss": False})
    checkpointing.check_same_run(
        manager, checkpointing.run_record(config, num_examples=9, total_steps=9, warmup_steps=1)
    )
