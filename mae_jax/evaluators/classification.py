"""Top-1 and top-5 accuracy of a classifier on a held-out split: the paper's fine-tuning and linear-probing
metric, as the official `engine_finetune.evaluate` reports it."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mae_jax import input_pipeline, sharding
from mae_jax.evaluators import eval_input
from mae_jax.evaluators.base import Evaluator
from mae_jax.models.classifier import Classifier


def _hit_counts(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    *,
    top: int,
    stats: input_pipeline.PixelStats,
) -> dict[str, jax.Array]:
    """Counts of top-1 and top-`top` hits among the valid rows of one batch (padding rows are not counted)."""
    logits = nnx.merge(graphdef, state)(input_pipeline.normalize(images, stats))
    best = jax.lax.top_k(logits, top)[1]
    return {
        "top1": jnp.sum((best[:, 0] == labels) & valid),
        "top5": jnp.sum(jnp.any(best == labels[:, None], axis=1) & valid),
        "count": jnp.sum(valid),
    }


class ClassificationEvaluator(Evaluator):
    """Top-1 and top-5 accuracy (%) over the whole `evals.classification.split` of the run's dataset.

    The split is opened and its labels checked against `num_classes` and the training split's classes here,
    at start. Each host reads its own part; top-5 is top-`num_classes` when there are fewer classes.
    """

    name = "classification"

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, source: Sequence):
        super().__init__(config, mesh, source)
        self._source = eval_input.open_split(config.dataset, self.settings.split)
        input_pipeline.check_labels(self._source, config.num_classes)
        input_pipeline.check_same_classes(source, self._source)
        self._config, self._mesh = config, mesh
        self._top = min(5, config.num_classes)
        self._counts = jax.jit(
            functools.partial(_hit_counts, stats=input_pipeline.pixel_stats(config.dataset)),
            static_argnums=0,
            static_argnames="top",
            out_shardings=sharding.replicated(mesh),
        )
        self._skipped = input_pipeline.SkippedImages()

    @property
    def num_examples(self) -> int:
        """Examples in the evaluated split (unreadable ones included, which the evaluation skips)."""
        return len(self._source)

    def run(self, model: Classifier) -> dict[str, float]:
        """{"eval_top1": %, "eval_top5": %} of the classifier's predictions on the readable examples."""
        graphdef, state = nnx.split(model)
        totals = {"top1": 0, "top5": 0, "count": 0}
        for arrays in eval_input.global_batches(
            self._source,
            self._mesh,
            self._config.image_size,
            self.settings.batch_size,
            num_threads=self._config.input.num_threads,
            skipped=self._skipped,
            num_classes=self._config.num_classes,
            num_channels=self._config.num_channels,
        ):
            counts = jax.device_get(self._counts(graphdef, state, *arrays, top=self._top))
            totals = {k: totals[k] + int(counts[k]) for k in totals}
        return {f"eval_{k}": 100 * totals[k] / max(totals["count"], 1) for k in ("top1", "top5")}
