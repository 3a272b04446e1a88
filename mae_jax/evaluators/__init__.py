"""Evaluations of a model while it trains, chosen by the config's `evals` block (as big_vision's `config.evals`).

Each entry `config.evals.<name>` configures the evaluator registered under that name; those with
`every_steps` > 0 run every that many steps and after the last one, and the loop writes what they return
to TensorBoard. To add one:

1. subclass `base.Evaluator` in a module here, with `name = "<name>"`: open and check its data in
   `__init__` (bad input fails at start), return {TensorBoard name: float or (H, W, 3) uint8 image} from
   `run(model)`, jitting its functions with replicated outputs;
2. register the class in `EVALUATORS` below;
3. give its block a default in `mae_jax/configuration.py` (`evals.<name>.every_steps` and its own keys, in
   `base_config` for pretraining or `downstream_config` for fine-tuning and linear probing) and check the
   values there, so a bad one fails before anything compiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections

from mae_jax.evaluators.base import Evaluator
from mae_jax.evaluators.classification import ClassificationEvaluator
from mae_jax.evaluators.knn import KnnEvaluator
from mae_jax.evaluators.probe import ProbeEvaluator
from mae_jax.evaluators.reconstruction import ReconstructionEvaluator

EVALUATORS: dict[str, type[Evaluator]] = {
    evaluator.name: evaluator
    for evaluator in (ReconstructionEvaluator, KnnEvaluator, ProbeEvaluator, ClassificationEvaluator)
}


def make_evaluators(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, source: Sequence) -> list[Evaluator]:
    """The evaluators of `config.evals` whose `every_steps` is > 0, by name, set up (data opened
    and checked); `source` is the run's training source."""
    return [EVALUATORS[name](config, mesh, source) for name, block in config.evals.items() if block.every_steps > 0]
