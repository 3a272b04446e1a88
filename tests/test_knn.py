"""Weighted kNN: hand-computed votes, blobs vs random labels, the evaluator's features and class-stratified
subsets, chance on random labels when both subsets come from one split, the train loop's summary."""

from __future__ import annotations

import pathlib
import types

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from mae_jax import configuration, input_pipeline, sharding, train
from mae_jax.configuration import ConfigError
from mae_jax.evaluators.knn import KnnEvaluator, knn_classify, knn_votes
from tests.conftest import tiny_train_config
from tests.test_input_pipeline import write_fashion_mnist, write_idx


def fashion_config(data_dir: pathlib.Path, **overrides):
    return tiny_train_config(
        **{
            "dataset.source": "fashion_mnist",
            "dataset.data_dir": str(data_dir),
            "evals.knn.every_steps": 1,
            "evals.knn.num_train": 32,
            "evals.knn.num_eval": 10,
            "evals.knn.batch_size": 8,
            **overrides,
        }
    )


def knn_evaluator(config) -> KnnEvaluator:
    """The evaluator as a pretraining run sets it up: on the run's mesh, beside its training source."""
    return KnnEvaluator(config, sharding.make_mesh(config.mesh), input_pipeline.make_source(config.dataset))


def test_votes_weight_the_k_nearest_by_exp_similarity_over_temperature():
    train_features = np.array([[3.0, 0.0], [0.8, 0.6], [-1.0, 0.0]])  # cosine to the query 1, 0.8, -1
    train_labels = np.array([1, 0, 0])
    query = np.array([[2.0, 0.0]])
    votes = knn_votes(train_features, train_labels, query, 3, k=2, temperature=0.5)
    np.testing.assert_allclose(votes, [[np.exp(0.8 / 0.5), np.exp(1 / 0.5), 0]], rtol=1e-6)  # the third is not a k=2
    votes = knn_votes(train_features, train_labels, query, 3, k=3, temperature=0.5)
    np.testing.assert_allclose(votes, [[np.exp(1.6) + np.exp(-2), np.exp(2), 0]], rtol=1e-6)
    assert knn_classify(train_features, train_labels, query, 3, k=3, temperature=0.5).tolist() == [1]  # the closest
    assert knn_classify(train_features, train_labels, query, 3, k=3, temperature=100.0).tolist() == [0]  # majority


def test_separable_blobs_are_classified_and_random_labels_are_chance():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 32))

    def blobs(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n)
        return centers[labels] + 0.3 * rng.normal(size=(n, 32)), labels

    (train_x, train_y), (test_x, test_y) = blobs(2000), blobs(1000)  # 1000 test rows: 3 chunks of 256 and a rest
    assert np.mean(np.asarray(knn_classify(train_x, train_y, test_x, 10)) == test_y) >= 0.99
    random_y = rng.integers(0, 10, 2000)
    chance = np.mean(np.asarray(knn_classify(train_x, random_y, test_x, 10)) == test_y)
    assert 0.05 < chance < 0.15


def test_evaluator_features_are_the_cls_token_of_each_valid_example(tmp_path: pathlib.Path, tiny_model):
    written = write_fashion_mnist(tmp_path, num_train=40, num_test=10)
    evaluator = knn_evaluator(fashion_config(tmp_path))
    source = input_pipeline.Subset(input_pipeline.make_source(fashion_config(tmp_path).dataset), np.arange(30))
    features, labels = evaluator.features(tiny_model.encoder, source)  # 4 batches of 8, 2 padding rows
    np.testing.assert_array_equal(labels, written["train"][1][:30])
    images = np.stack([input_pipeline.eval_transform(input_pipeline.decode(source[i]["image"]), 32) for i in (0, 29)])
    expected = tiny_model.encoder(input_pipeline.normalize(images))[:, 0]
    np.testing.assert_allclose(features[[0, 29]], expected, rtol=1e-4, atol=1e-5)
    assert evaluator.run(tiny_model) == {"knn_top1": 1.0}  # each class is its own pattern


def write_flat_colors(root: pathlib.Path, per_class: int, rng: np.random.Generator) -> None:
    """root/<class>/<i>.png, sorted by class as ImageNet's folders: class k is a flat color (plus noise)."""
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255],
                       [0, 255, 255], [255, 255, 255], [0, 0, 0], [128, 64, 0], [0, 128, 64]])  # fmt: skip
    for label, color in enumerate(colors):
        (root / f"class{label}").mkdir(parents=True)
        for i in range(per_class):
            noisy = np.clip(color + rng.integers(-8, 9, (24, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / f"class{label}" / f"{i:02d}.png")


def test_knn_subsets_of_a_class_sorted_folder_cover_every_class(tmp_path: pathlib.Path, tiny_model):
    rng = np.random.default_rng(0)
    write_flat_colors(tmp_path / "train", 20, rng)
    write_flat_colors(tmp_path / "test", 5, rng)
    config = fashion_config(
        tmp_path,
        **{
            "dataset.source": "folder",
            "evals.knn.eval_split": "test",
            "evals.knn.num_train": 50,
            "evals.knn.num_eval": 1000,
        },
    )
    # the first 50 training images are classes 0-2 only, which would cap the accuracy at 0.3 (chance: 0.1)
    assert knn_evaluator(config).run(tiny_model)["knn_top1"] >= 0.9


def test_knn_on_one_split_reads_chance_for_random_labels(tmp_path: pathlib.Path):
    """Noise images with random labels, features a fixed random projection of the pixels: nothing to learn, so
    about 1/4 right. An eval image that is also a training one finds itself (similarity 1) and reads 100 %."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (400, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 4, 400))
    config = fashion_config(
        tmp_path, **{"evals.knn.eval_split": "train", "evals.knn.num_train": 200, "evals.knn.num_eval": 200}
    )
    evaluator = knn_evaluator(config)
    projection = rng.normal(size=(28 * 28, 64))

    def random_features(encoder: None, source) -> tuple[np.ndarray, np.ndarray]:
        records = [source[i] for i in range(len(source))]
        pixels = np.stack([record["image"].reshape(-1) for record in records]) / 255.0 - 0.5
        return pixels @ projection, np.array([record["label"] for record in records])

    evaluator.features = random_features
    assert 0.15 <= evaluator.run(types.SimpleNamespace(encoder=None))["knn_top1"] <= 0.35  # chance: 0.25 +- 0.03


def test_unlabeled_data_is_refused_at_start():
    message = "split 'train' has no labels; set evals.knn.every_steps=0"
    with pytest.raises(input_pipeline.DatasetNotFoundError, match=message):
        knn_evaluator(tiny_train_config(**{"evals.knn.every_steps": 1}))  # the demo photographs, validation skipped


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"evals.knn.k": 0}, "evals.knn.k=0 must be >= 1"),
        ({"evals.knn.temperature": 0.0}, "evals.knn.temperature=0.0 must be > 0"),
        ({"evals.knn.every_steps": -1}, "evals.knn.every_steps=-1 must be >= 0"),
        (
            {"evals.knn.every_steps": 5},
            "evals.knn.every_steps > 0 needs labeled data: dataset.source='demo' has no labels",
        ),
        (
            {"dataset.source": "fashion_mnist", "evals.knn.every_steps": 5, "evals.knn.num_eval": 0},
            "evals.knn.num_train=10000 and evals.knn.num_eval=0 must be >= 1",
        ),
        (
            {"dataset.source": "fashion_mnist", "evals.knn.every_steps": 5, "evals.knn.batch_size": 12},
            "evals.knn.batch_size=12 is not a positive multiple of the 8 devices",
        ),
    ],
)
def test_bad_knn_config_is_one_line(overrides: dict, message: str, monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as error:
        configuration.validate(tiny_train_config(**overrides))
    assert "\n" not in str(error.value)


def test_pretraining_writes_knn_top1(tmp_path: pathlib.Path):
    data = tmp_path / "fashion_mnist"
    data.mkdir()
    write_fashion_mnist(data, num_train=40, num_test=10)
    train.train_and_evaluate(fashion_config(data), str(tmp_path / "workdir"))
    (events,) = (tmp_path / "workdir").glob("events.out.tfevents.*")
    summaries = event_accumulator.EventAccumulator(str(events))
    summaries.Reload()
    knn_top1 = {e.step: e.value for e in summaries.Scalars("knn_top1")}
    assert knn_top1 == {1: 1.0, 2: 1.0}  # every step and the last; the classes are separable patterns
