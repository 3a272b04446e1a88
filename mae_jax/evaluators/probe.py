"""Online linear probe: a linear classifier trained from scratch on the frozen encoder's features at every
evaluation, the paper's linear-probing protocol shrunk to a monitor.

kNN accuracy is a weak signal for MAE, whose features are read by a trained head; this evaluator reads the
number the paper reports, on the features the offline probe (`task="linprobe"`) trains on: the cls token
after the encoder's final norm, on center-cropped images. The head is the official probe's, BatchNorm without
affine (eps 1e-6) then a linear layer, trained with cross-entropy on cached features, so that a whole
training is one jitted call. It differs from the offline probe in what makes it cheap: no augmentation (one
feature vector per image), Adam with a cosine decay instead of LARS, and the BatchNorm statistics of all the
training features instead of running averages of batch statistics: training normalizes with their mean and
biased variance, evaluation with the unbiased one, as torch's BatchNorm1d after one pass over them as a batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mae_jax.evaluators import eval_input
from mae_jax.evaluators.base import Evaluator
from mae_jax.models.mae import MAE

BATCH_NORM_EPSILON = 1e-6  # the official probe's BatchNorm1d(affine=False, eps=1e-6)
HEAD_INIT_STD = 0.01  # the official probe's head: trunc_normal_(std=0.01), zero bias


def standardize(features: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    """BatchNorm without affine: (features - mean) / sqrt(var + eps), per feature."""
    return (features - mean) / jnp.sqrt(var + BATCH_NORM_EPSILON)


class LinearHead(NamedTuple):
    """A trained probe head: the training features' mean and unbiased variance (torch's running statistics), then
    logits = x @ kernel + bias."""

    mean: jax.Array  # (width,)
    var: jax.Array  # (width,)
    kernel: jax.Array  # (width, num_classes)
    bias: jax.Array  # (num_classes,)

    def __call__(self, features: jax.Array) -> jax.Array:
        """Logits (n, num_classes) of features (n, width)."""
        x = standardize(jnp.asarray(features, jnp.float32), self.mean, self.var)
        return jnp.dot(x, self.kernel, precision="highest") + self.bias


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"))
def fit_linear_head(
    features: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
) -> LinearHead:
    """The head trained on (features (n, width), labels (n,)): `epochs` passes over shuffled mini-batches of
    `batch_size` rows (at most n; each epoch drops the n % batch_size rows its shuffle puts last), Adam with
    a cosine decay from `learning_rate` to 0, softmax cross-entropy, no weight decay (as the official probe).

    The initialization and the shuffles are drawn from `seed`, so the same inputs give the same head. Training
    normalizes with the biased variance, the head keeps the unbiased one, as BatchNorm1d in train and eval mode.
    """
    features = jnp.asarray(features, jnp.float32)
    mean, var = jnp.mean(features, axis=0), jnp.var(features, axis=0)
    x = standardize(features, mean, var)
    n, width = x.shape
    running_var = var * n / max(n - 1, 1)  # torch's running_var of one batch of all n rows (n > 1)
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    init_key, shuffle_key = jax.random.split(jax.random.key(seed))
    params = {
        "kernel": HEAD_INIT_STD * jax.random.normal(init_key, (width, num_classes)),
        "bias": jnp.zeros(num_classes),
    }
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch))

    def loss(params: dict[str, jax.Array], rows: jax.Array) -> jax.Array:
        logits = jnp.dot(x[rows], params["kernel"], precision="highest") + params["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels[rows]).mean()

    def step(carry: tuple, rows: jax.Array) -> tuple[tuple, None]:
        params, optimizer_state = carry
        updates, optimizer_state = optimizer.update(jax.grad(loss)(params, rows), optimizer_state)
        return (optax.apply_updates(params, updates), optimizer_state), None

    def epoch(carry: tuple, key: jax.Array) -> tuple[tuple, None]:
        order = jax.random.permutation(key, n)[: steps_per_epoch * batch_size]
        return jax.lax.scan(step, carry, order.reshape(steps_per_epoch, batch_size))[0], None

    start = (params, optimizer.init(params))
    (params, _), _ = jax.lax.scan(epoch, start, jax.random.split(shuffle_key, epochs))
    return LinearHead(mean, running_var, params["kernel"], params["bias"])


class ProbeEvaluator(Evaluator):
    """Linear-probe top-1 of an MAE's encoder on `evals.probe`'s splits of `config.dataset`; every host computes
    the same number.

    The subsets are those of the kNN monitor (`eval_input.labeled_subsets`: `num_train` and `num_eval`
    examples drawn with `config.seed`, stratified by class where labels are cheap, disjoint when both are of one
    split), opened and checked here,
    at start. Each evaluation trains a new head on the `num_train` features with `config.seed`: the number
    depends on the encoder only.
    """

    name = "probe"

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, source: Sequence):
        super().__init__(config, mesh, source)
        self._train, self._test = eval_input.labeled_subsets(config, self.name)
        self.features = eval_input.ClsFeatures(config, mesh, self.settings.batch_size)
        self._seed = config.seed

    def run(self, model: MAE) -> dict[str, float]:
        """{"probe_top1": accuracy in [0, 1]} of a head trained on the MAE encoder's current features."""
        train_features, train_labels = self.features(model.encoder, self._train)
        test_features, test_labels = self.features(model.encoder, self._test)
        head = fit_linear_head(
            train_features,
            train_labels,
            int(max(train_labels.max(), test_labels.max())) + 1,
            seed=self._seed,
            epochs=self.settings.epochs,
            batch_size=self.settings.head_batch_size,
            learning_rate=self.settings.learning_rate,
        )
        predictions = np.asarray(jnp.argmax(head(test_features), axis=-1))
        return {"probe_top1": float(np.mean(predictions == test_labels))}
