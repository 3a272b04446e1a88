"""The evaluators' input: another split of the run's dataset, and its batches as global arrays."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import ml_collections

from mae_jax import input_pipeline, sharding


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
) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
    """Every example of the source once, as global (image, label, valid) batches split over the mesh's batch
    axes; each host reads its own rows (`input_pipeline.eval_batches`, whose padding rows are not valid).

    With `num_classes`, a label outside [0, num_classes) raises a ConfigError naming the example.
    """
    batch_sharding = sharding.batch_sharding(mesh)
    for batch in input_pipeline.eval_batches(
        source, image_size, batch_size, num_threads=num_threads, skipped=skipped, num_classes=num_classes
    ):
        yield tuple(
            jax.make_array_from_process_local_data(batch_sharding, batch[key]) for key in ("image", "label", "valid")
        )
