"""Weighted k-nearest-neighbour accuracy of frozen encoder features, as DINO's `eval_knn`.

A cheap online signal of representation quality that needs no trained head: each test image's k most
cosine-similar training images vote for their class with weight exp(similarity / temperature). The
features are the encoder's cls token after its final norm, on center-cropped images.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mae_jax.evaluators import eval_input
from mae_jax.evaluators.base import Evaluator
from mae_jax.models.mae import MAE


def _l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # torch's F.normalize


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "chunk_size"))
def knn_votes(
    train_features: jax.Array,
    train_labels: jax.Array,
    test_features: jax.Array,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> jax.Array:
    """(test rows, num_classes) summed neighbour weights; `chunk_size` test rows at a time bound the memory.

    Features need not be normalized (similarity is cosine); k is capped at the number of training rows.
    """
    train = _l2_normalize(train_features)
    k = min(k, train.shape[0])

    def vote(query: jax.Array) -> jax.Array:
        similarity, neighbours = jax.lax.top_k(jnp.dot(train, query, precision="highest"), k)
        return jnp.exp(similarity / temperature) @ jax.nn.one_hot(train_labels[neighbours], num_classes)

    return jax.lax.map(vote, _l2_normalize(test_features), batch_size=chunk_size)


def knn_classify(
    train_features: jax.Array,
    train_labels: jax.Array,
    test_features: jax.Array,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> jax.Array:
    """The predicted class of every test row: the class with the largest vote (`knn_votes`)."""
    return jnp.argmax(
        knn_votes(train_features, train_labels, test_features, num_classes, k=k, temperature=temperature), axis=-1
    )


class KnnEvaluator(Evaluator):
    """kNN top-1 of an MAE's encoder on `evals.knn`'s splits of `config.dataset`; every host computes the same
    number.

    The sources are opened here, so a missing split or unlabeled data fails at start. Each split is a subset
    of `num_train` / `num_eval` examples drawn with `config.seed` (`eval_input.labeled_subsets`: stratified
    by class where labels are cheap, disjoint when both are of one split), the same at every evaluation, on every
    host; `features` extracts their cls features (`eval_input.ClsFeatures`), replicated to every host.
    """

    name = "knn"

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, source: Sequence):
        super().__init__(config, mesh, source)
        self._train, self._test = eval_input.labeled_subsets(config, self.name)
        self.features = eval_input.ClsFeatures(config, mesh, self.settings.batch_size)

    def run(self, model: MAE) -> dict[str, float]:
        """{"knn_top1": accuracy in [0, 1]} of the MAE encoder's current features."""
        train_features, train_labels = self.features(model.encoder, self._train)
        test_features, test_labels = self.features(model.encoder, self._test)
        predictions = knn_classify(
            train_features,
            train_labels,
            test_features,
            int(train_labels.max()) + 1,
            k=self.settings.k,
            temperature=self.settings.temperature,
        )
        return {"knn_top1": float(np.mean(np.asarray(predictions) == test_labels))}
