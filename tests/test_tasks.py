"""The task table, and the one assembly of each task's step that the loop, the benchmark and the tests share."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from mae_jax import configuration, sharding, tasks
from mae_jax.models.classifier import Classifier
from mae_jax.models.mae import MAE
from tests.conftest import tiny_downstream_config, tiny_train_config


def test_every_configurable_task_has_a_row_and_an_unknown_one_is_a_one_line_error():
    assert tuple(tasks.TASKS) == configuration.TASKS
    with pytest.raises(configuration.ConfigError, match=r"^task='pretrian' must be one of \('pretrain', "):
        tasks.of(ConfigDict({"task": "pretrian"}))
    assert tasks.of(ConfigDict({})) is tasks.TASKS["pretrain"]  # configs from before `task` existed


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_assembly_inits_restores_and_steps_as_one_layout(task: str):
    config = tiny_train_config() if task == "pretrain" else tiny_downstream_config(task, num_classes=10)
    mesh = sharding.make_mesh(config.mesh)
    assembly = tasks.of(config).assemble(config, mesh, 10, 1)
    model_type = MAE if task == "pretrain" else Classifier
    assert isinstance(assembly.model(assembly.init()), model_type)

    state = assembly.init()
    # The restore target is the state's own layout: shapes, dtypes and shardings, leaf by leaf.
    assert jax.tree.structure(assembly.abstract_state) == jax.tree.structure(state)
    for target, leaf in zip(jax.tree.leaves(assembly.abstract_state), jax.tree.leaves(state), strict=True):
        assert (target.shape, target.dtype, target.sharding) == (leaf.shape, leaf.dtype, leaf.sharding)

    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, 32, 32, 3), np.uint8), "label": rng.integers(0, 10, 8, np.int32)}
    params_before = nnx.to_pure_dict(state.params)
    new_state, metrics = assembly.train_step(state, *[batch[key] for key in assembly.batch_keys])
    assert int(new_state.step) == 1 and np.isfinite(metrics["loss"])
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(params_before))  # the step donates the old state
    assert assembly.flops_per_step > 0 and assembly.description
