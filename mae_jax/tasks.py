"""The task table: what `config.task` names, and the two functions every task has.

`assemble(config, mesh, total_steps, warmup_steps)` builds the task's step (`loop.Assembly`);
`train_and_evaluate(config, workdir)` is its whole run. `main`, the benchmark and the tests look tasks up
here, so a new task is one more row (and its default config in `configuration.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from mae_jax import finetune, loop, train
from mae_jax.configuration import ConfigError


@dataclasses.dataclass(frozen=True)
class Task:
    assemble: Callable[[ml_collections.ConfigDict, jax.sharding.Mesh, int, int], loop.Assembly]
    train_and_evaluate: Callable[[ml_collections.ConfigDict, str], Any]


TASKS: dict[str, Task] = {
    "pretrain": Task(train.assemble, train.train_and_evaluate),
    "finetune": Task(finetune.assemble, finetune.train_and_evaluate),
    "linprobe": Task(finetune.assemble, finetune.train_and_evaluate),
}


def of(config: ml_collections.ConfigDict) -> Task:
    """The task `config.task` names (configs from before `task` existed pretrain)."""
    name = config.get("task", "pretrain")
    if name not in TASKS:
        raise ConfigError(f"task={name!r} must be one of {tuple(TASKS)}")
    return TASKS[name]
