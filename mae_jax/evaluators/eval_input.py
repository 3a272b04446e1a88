"""The evaluators' input: another split of the run's dataset, its batches as global arrays, and the frozen
encoder's features of labeled subsets (what the kNN monitor and the online linear probe read)."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from mae_jax import input_pipeline, sharding
from mae_jax.configuration import ConfigError
from mae_jax.models.vit import Encoder


def open_split(dataset: ml_collections.ConfigDict, split: str) -> Sequence:
    """The source of `split` of the run's dataset (`config.dataset`: same source, name and data_dir)."""
    dataset = dataset.copy_and_resolve_references()
    dataset.split = split
    return input_pipeline.make_source(dataset)


def global_batches(
    source: Sequence,
    mesh: jax.sharding.Mesh,
    image_size: int,
    batch_size: int,
    *,
    num_threads: int,
    skipped: input_pipeline.SkippedImages | None = None,
    num_classes: int | None = None,
    num_channels: int = 3,
) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
    """Every example of the source once, as global (image, label, valid) batches split over the mesh's batch
    axes; each host reads its own rows (`input_pipeline.eval_batches`, whose padding rows are not valid).

    With `num_classes`, a label outside [0, num_classes) raises a ConfigError naming the example. Images are
    decoded to `num_channels` bands (the run's `config.num_channels`).
    """
    batch_sharding = sharding.batch_sharding(mesh)
    for batch in input_pipeline.eval_batches(
        source,
        image_size,
        batch_size,
        num_threads=num_threads,
        skipped=skipped,
        num_classes=num_classes,
        num_channels=num_channels,
    ):
        yield tuple(
            jax.make_array_from_process_local_data(batch_sharding, batch[key]) for key in ("image", "label", "valid")
        )


def labeled_subsets(config: ml_collections.ConfigDict, name: str) -> tuple[Sequence, Sequence]:
    """The (train, eval) subsets of `config.evals.<name>`: `num_train` examples of `train_split` and `num_eval`
    of `eval_split`, drawn with `config.seed` (`input_pipeline.sample_subset`), the same at every evaluation.

    When the two splits are one, the subsets are disjoint (`disjoint_subsets`), and the log says so: drawn
    apart, the eval subset would lie inside the train one, and every eval image would find itself. Unlabeled
    data, splits with different class folders or a shared split too small for both fail here, at the start of
    the run.
    """
    settings = config.evals[name]
    if settings.train_split == settings.eval_split:
        source = _labeled_split(config.dataset, settings.train_split, name)
        if len(source) < settings.num_train + settings.num_eval:
            raise ConfigError(
                f"evals.{name}.train_split and eval_split are both {settings.train_split!r}, whose {len(source)} "
                f"examples are fewer than num_train={settings.num_train} + num_eval={settings.num_eval}: lower them "
                "or set another eval_split"
            )
        logging.info(
            "evals.%s: train_split and eval_split are both %r: %d and %d disjoint examples of its %d",
            name,
            settings.train_split,
            settings.num_train,
            settings.num_eval,
            len(source),
        )
        return disjoint_subsets(source, settings.num_train, settings.num_eval, config.seed)
    train, other = (
        input_pipeline.sample_subset(_labeled_split(config.dataset, split, name), count, config.seed)
        for split, count in ((settings.train_split, settings.num_train), (settings.eval_split, settings.num_eval))
    )
    input_pipeline.check_same_classes(train, other)
    return train, other


def disjoint_subsets(
    source: Sequence, num_train: int, num_eval: int, seed: int
) -> tuple[input_pipeline.Subset, input_pipeline.Subset]:
    """Two disjoint subsets of `num_train` and `num_eval` records (together at most len(source)), drawn with
    `seed`, the same on every host and at every restart.

    Where the labels are known cheaply (`input_pipeline.known_labels`), the num_train + num_eval records are
    drawn stratified by class, and the train subset stratified among them; the eval subset, the rest, keeps each
    class's share within two records. Elsewhere both are consecutive runs of one random permutation.
    """
    labels = input_pipeline.known_labels(source)
    if labels is None:
        order = np.random.default_rng(seed).permutation(len(source))
        train, other = order[:num_train], order[num_train : num_train + num_eval]
    else:
        both = input_pipeline.stratified_indices(labels, num_train + num_eval, seed)
        in_train = np.zeros(len(both), bool)
        in_train[input_pipeline.stratified_indices(labels[both], num_train, seed)] = True
        train, other = both[in_train], both[~in_train]
    return input_pipeline.Subset(source, np.sort(train)), input_pipeline.Subset(source, np.sort(other))


def _labeled_split(dataset: ml_collections.ConfigDict, split: str, name: str) -> Sequence:
    source = open_split(dataset, split)
    if source[0]["label"] == input_pipeline.NO_LABEL:
        raise input_pipeline.DatasetNotFoundError(
            f"{name}: {dataset.source}:{dataset.name} split {split!r} has no labels; set evals.{name}.every_steps=0"
        )
    return source


def _cls_features(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    *,
    stats: input_pipeline.PixelStats,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    encoder = nnx.merge(graphdef, state)
    return encoder(input_pipeline.normalize(images, stats))[:, 0].astype(jnp.float32), labels, valid


class ClsFeatures:
    """`features(encoder, source)`: the encoder's cls token after its final norm, of every readable example's
    center-cropped image (the run's `num_channels`, normalized with its pixel stats); the features the offline
    linear probe trains on (`global_pool` False).

    Each host feeds its rows of a global batch of `batch_size` (`global_batches`); the features come back
    replicated, so every host holds all of them.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, batch_size: int):
        self._image_size, self._num_channels, self._mesh = config.image_size, config.num_channels, mesh
        self._batch_size, self._num_threads = batch_size, config.input.num_threads
        stats = input_pipeline.pixel_stats(config.dataset)
        self._features = jax.jit(
            functools.partial(_cls_features, stats=stats), static_argnums=0, out_shardings=sharding.replicated(mesh)
        )
        self._skipped = input_pipeline.SkippedImages()

    def __call__(self, encoder: Encoder, source: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """(features (n, width) float32, labels (n,)) of the source's n readable examples, on every host."""
        graphdef, state = nnx.split(encoder)
        features, labels = [], []
        for arrays in global_batches(
            source,
            self._mesh,
            self._image_size,
            self._batch_size,
            num_threads=self._num_threads,
            skipped=self._skipped,
            num_channels=self._num_channels,
        ):
            batch_features, batch_labels, valid = jax.device_get(self._features(graphdef, state, *arrays))
            features.append(batch_features[valid])
            labels.append(batch_labels[valid])
        return np.concatenate(features), np.concatenate(labels)
