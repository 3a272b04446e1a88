"""Few-label subsets drawn at random and stratified by class, disjoint where the monitors draw two from one split;
labels a classifier cannot learn refused in one line."""

from __future__ import annotations

import logging
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mae_jax import finetune, input_pipeline
from mae_jax.configuration import ConfigError
from mae_jax.evaluators import eval_input
from tests.conftest import tiny_downstream_config, tiny_train_config, with_overrides
from tests.test_input_pipeline import write_fashion_mnist, write_idx


def write_class_folder(root: pathlib.Path, counts: list[int]) -> None:
    """root/c<k>/<i>.png: class k has counts[k] flat images of gray level 20 k."""
    for label, count in enumerate(counts):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (12, 10), (20 * label,) * 3).save(root / f"c{label}" / f"{i}.png")


# ---------------------------------------------------------------------------------------------------
# Stratified and uniform subsets
# ---------------------------------------------------------------------------------------------------
def test_stratified_indices_give_each_class_its_share_drawn_at_random():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])  # class-sorted, as an image folder
    chosen = input_pipeline.stratified_indices(labels, 20, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [10, 6, 3, 1]  # 20 x 50/100, 20 x 30/100, ...
    assert (np.diff(chosen) > 0).all()  # sorted, each once
    assert not np.array_equal(chosen[:10], np.arange(10))  # at random within the class, not its first ones
    # 10 of 7 + 7 + 6: shares 3.5, 3.5, 3.0; the one left over goes to the largest remainder, the smaller label
    labels = np.repeat(np.arange(3), [7, 7, 6])
    assert np.bincount(labels[input_pipeline.stratified_indices(labels, 10, seed=0)]).tolist() == [4, 3, 3]
    shuffled = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 37))  # unsorted labels too
    assert np.bincount(shuffled[input_pipeline.stratified_indices(shuffled, 100, seed=3)]).tolist() == [10] * 10


def test_stratified_indices_are_a_function_of_the_seed():
    labels = np.repeat(np.arange(5), 40)
    first = input_pipeline.stratified_indices(labels, 50, seed=7)
    np.testing.assert_array_equal(first, input_pipeline.stratified_indices(labels.copy(), 50, seed=7))
    other = input_pipeline.stratified_indices(labels, 50, seed=8)
    assert not np.array_equal(first, other) and np.bincount(labels[other]).tolist() == [10] * 5


def test_sample_subset_of_a_class_sorted_folder_covers_every_class(tmp_path: pathlib.Path):
    write_class_folder(tmp_path, [6, 6, 6, 6, 6])
    source = input_pipeline.ImageFolder(tmp_path)
    subset = input_pipeline.sample_subset(source, 10, seed=0)
    labels = [subset[i]["label"] for i in range(len(subset))]
    assert np.bincount(labels).tolist() == [2] * 5  # the first 10 records would be classes 0 and 1 only
    np.testing.assert_array_equal(input_pipeline.known_labels(subset), labels)
    assert subset.num_classes == 5 and subset.description == f"image folder {tmp_path}"
    assert input_pipeline.sample_subset(source, 30, seed=0) is source  # all of it: the source itself


def test_sample_subset_without_cheap_labels_is_uniform_and_seeded():
    source = [{"image": np.zeros((2, 2, 3), np.uint8), "label": i // 100, "name": str(i)} for i in range(1000)]
    subset = input_pipeline.sample_subset(source, 100, seed=0)
    names = [int(subset[i]["name"]) for i in range(len(subset))]
    assert names == sorted(set(names)) and len(names) == 100 and max(names) > 500  # not the first 100
    again = input_pipeline.sample_subset(source, 100, seed=0)
    assert names == [int(again[i]["name"]) for i in range(len(again))]
    assert input_pipeline.known_labels(subset) is None


def fashion_probe_config(data_dir: pathlib.Path, num_train: int, num_eval: int):
    """The online probe on both splits "train" of a Fashion-MNIST mock (evals.probe.train_split is "train")."""
    return tiny_train_config(
        **{
            "dataset.source": "fashion_mnist",
            "dataset.data_dir": str(data_dir),
            "evals.probe.eval_split": "train",
            "evals.probe.num_train": num_train,
            "evals.probe.num_eval": num_eval,
        }
    )


def test_one_split_gives_disjoint_stratified_subsets_and_says_so(tmp_path: pathlib.Path, caplog):
    """Drawn apart, the eval subset of a split would lie inside its train subset (both start from one seed)."""
    write_fashion_mnist(tmp_path, num_train=100, num_test=4)  # labels 0, 1, 2, 3, 0, ...: 25 of each class
    with caplog.at_level(logging.INFO):
        train, other = eval_input.labeled_subsets(fashion_probe_config(tmp_path, 40, 20), "probe")
    names = [{subset[i]["name"] for i in range(len(subset))} for subset in (train, other)]
    assert len(names[0]) == 40 and len(names[1]) == 20 and not names[0] & names[1]
    assert np.bincount(train.labels()).tolist() == [10] * 4 and np.bincount(other.labels()).tolist() == [5] * 4
    assert "evals.probe: train_split and eval_split are both 'train': 40 and 20 disjoint examples of its 100" in [
        record.getMessage() for record in caplog.records
    ]
    # all of the split, as two disjoint parts
    train, other = eval_input.labeled_subsets(fashion_probe_config(tmp_path, 70, 30), "probe")
    names = [subset[i]["name"] for subset in (train, other) for i in range(len(subset))]
    assert sorted(names) == sorted(f"fashion_mnist/train:{i}" for i in range(100))


def test_disjoint_subsets_without_cheap_labels_are_one_permutation():
    source = [{"image": np.zeros((2, 2, 3), np.uint8), "label": 0, "name": str(i)} for i in range(1000)]
    train, other = eval_input.disjoint_subsets(source, 300, 200, seed=0)
    train_names, other_names = ([int(s[i]["name"]) for i in range(len(s))] for s in (train, other))
    assert len(set(train_names)) == 300 and len(set(other_names)) == 200 and not set(train_names) & set(other_names)
    assert max(other_names) > 500 and train_names == sorted(train_names)  # at random, sorted for reading
    again = eval_input.disjoint_subsets(source, 300, 200, seed=0)
    assert [int(again[1][i]["name"]) for i in range(200)] == other_names


def test_one_split_too_small_for_both_subsets_is_refused_in_one_line(tmp_path: pathlib.Path):
    write_fashion_mnist(tmp_path, num_train=100, num_test=4)
    message = (
        "evals.probe.train_split and eval_split are both 'train', whose 100 examples are fewer than num_train=90 + "
        "num_eval=20: lower them or set another eval_split"
    )
    with pytest.raises(ConfigError) as error:
        eval_input.labeled_subsets(fashion_probe_config(tmp_path, 90, 20), "probe")
    assert str(error.value) == message


# ---------------------------------------------------------------------------------------------------
# Labels outside [0, num_classes)
# ---------------------------------------------------------------------------------------------------
def folder_finetune_config(data_dir: pathlib.Path, num_classes: int):
    return tiny_downstream_config(
        "finetune",
        num_classes=num_classes,
        **{"dataset.source": "folder", "dataset.data_dir": str(data_dir), "evals.classification.split": "train"},
    )


def test_fine_tuning_a_folder_with_more_classes_than_num_classes_fails_before_compiling(
    tmp_path: pathlib.Path, monkeypatch
):
    write_class_folder(tmp_path / "data" / "train", [4, 4, 4])

    def compile_attempt(*args, **kwargs):
        raise AssertionError("compiled before checking the labels")

    monkeypatch.setattr(jax, "jit", compile_attempt)
    with pytest.raises(ConfigError) as error:
        finetune.train_and_evaluate(folder_finetune_config(tmp_path / "data", 2), str(tmp_path / "workdir"))
    assert str(error.value) == f"image folder {tmp_path / 'data' / 'train'} has 3 classes, more than num_classes=2"


def test_evaluation_folder_missing_a_class_is_refused_before_compiling(tmp_path: pathlib.Path, monkeypatch):
    """val/ without train/'s class c1 would number c2 as 1: every later label shifted, silently."""
    write_class_folder(tmp_path / "data" / "train", [3, 3, 3])
    write_class_folder(tmp_path / "data" / "val", [2, 2, 2])
    (tmp_path / "data" / "val" / "c1").rename(tmp_path / "data" / "val" / "missing")
    for image in (tmp_path / "data" / "val" / "missing").iterdir():
        image.unlink()
    (tmp_path / "data" / "val" / "missing").rmdir()

    def compile_attempt(*args, **kwargs):
        raise AssertionError("compiled before comparing the splits' classes")

    monkeypatch.setattr(jax, "jit", compile_attempt)
    config = with_overrides(folder_finetune_config(tmp_path / "data", 3), {"evals.classification.split": "val"})
    with pytest.raises(ConfigError, match=r"only in the training split: \['c1'\]") as error:
        finetune.train_and_evaluate(config, str(tmp_path / "workdir"))
    assert "\n" not in str(error.value)


def test_sources_that_know_their_labels_are_checked_at_start(tmp_path: pathlib.Path):
    write_fashion_mnist(tmp_path, num_train=8, num_test=4)
    source = input_pipeline.FashionMnist(tmp_path, "train")
    with pytest.raises(ConfigError, match=r"^fashion_mnist/train has 10 classes, more than num_classes=5$"):
        input_pipeline.check_labels(source, 5)
    input_pipeline.check_labels(source, 10)
    input_pipeline.check_labels(input_pipeline.sample_subset(source, 4, seed=0), 10)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 10, 5, 6, 7]))  # a damaged label
    with pytest.raises(ConfigError, match=r"^label 10 of fashion_mnist/train:4 is outside \[0, num_classes=10\)$"):
        input_pipeline.check_labels(input_pipeline.FashionMnist(tmp_path, "train"), 10)
    with tfds.testing.mock_data(num_examples=4):
        imagenet = input_pipeline.TfdsSource("imagenet2012", "train", None)
    with pytest.raises(ConfigError, match=r"^tfds imagenet2012/train has 1000 classes, more than num_classes=10$"):
        input_pipeline.check_labels(imagenet, 10)


class LabelsUpTo(list):
    """A custom source (no `labels`, no `num_classes`) whose labels run 0, 1, ..., `top`, 0, 1, ..."""

    def __init__(self, size: int, top: int):
        super().__init__(
            {"image": np.full((8, 8, 3), i, np.uint8), "label": i % (top + 1), "name": f"record{i}"}
            for i in range(size)
        )


def keep(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return image


def test_training_batch_with_label_num_classes_raises_before_the_device():
    config = tiny_train_config(batch_size=8)
    good = input_pipeline.train_dataset(LabelsUpTo(16, 2), config, input_pipeline.SkippedImages(), transform=keep)
    unchecked, checked = iter(good), input_pipeline.label_checked(iter(good), num_classes=3)
    for _ in range(3):  # passes the batches through unchanged
        expected, batch = next(unchecked), next(checked)
        assert batch.keys() == expected.keys() and all(np.array_equal(batch[k], expected[k]) for k in batch)

    source = LabelsUpTo(16, 3)  # label 3 == num_classes
    input_pipeline.check_labels(source, 3)  # its labels are not known at start...
    bad = input_pipeline.train_dataset(source, config, input_pipeline.SkippedImages(), transform=keep)
    with pytest.raises(ConfigError, match=r"^label 3 of row \d of a training batch is outside \[0, num_classes=3\)$"):
        next(input_pipeline.label_checked(iter(bad), num_classes=3))  # ...but each batch is


def test_eval_batch_with_label_num_classes_names_the_example():
    source = LabelsUpTo(8, 3)
    batches = input_pipeline.eval_batches(source, 8, 8, process_index=0, process_count=1, num_classes=4)
    assert next(batches)["label"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(ConfigError, match=r"^label 3 of record3 is outside \[0, num_classes=3\)$"):
        next(input_pipeline.eval_batches(source, 8, 8, process_index=0, process_count=1, num_classes=3))
