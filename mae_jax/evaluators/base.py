"""What every evaluation of a training run is: set up once at start, run on the current model when due.

The training loops know evaluations only through this interface, so a new one needs no loop change: see
`mae_jax.evaluators` for how to add one.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar

import jax
import ml_collections
import numpy as np
from flax import nnx


class Evaluator(abc.ABC):
    """One evaluation, configured by its block `config.evals.<name>`, which holds at least `every_steps`.

    Everything that can fail on bad input (opening splits, checking labels) happens in `__init__`, at the
    start of the run, not at the first evaluation hours later. `run` jits its own functions, with
    replicated outputs, so every host returns the same numbers.
    """

    name: ClassVar[str]  # the key of its block in config.evals and of `mae_jax.evaluators.EVALUATORS`

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, source: Sequence):
        """`config` is the whole run config; `source` the run's (already opened) training source."""
        del mesh, source  # used by the evaluators that need them
        self.settings: ml_collections.ConfigDict = config.evals[self.name]
        self.every_steps: int = self.settings.every_steps

    def due(self, step: int, total_steps: int) -> bool:
        """Whether to run after step `step`: every `every_steps` steps, and after the last one."""
        return step % self.every_steps == 0 or step == total_steps

    @abc.abstractmethod
    def run(self, model: nnx.Module) -> dict[str, float | np.ndarray]:
        """Scalars (float) and images ((H, W, 3) uint8) of the run's merged model, named as TensorBoard shows
        them."""
