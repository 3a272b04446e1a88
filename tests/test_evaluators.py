"""Evaluators: the registry and `config.evals` choose them, `due` schedules them, top-1/top-5 against torch.topk,
the reconstruction noise of the run's seed, and keys that moved into `evals` named in one line."""

from __future__ import annotations

import pathlib
import re

import jax
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from mae_jax import checkpointing, configuration, input_pipeline, pretrained, sharding
from mae_jax.configuration import ConfigError
from mae_jax.evaluators import EVALUATORS, Evaluator, make_evaluators
from mae_jax.evaluators.classification import ClassificationEvaluator
from mae_jax.evaluators.knn import KnnEvaluator
from mae_jax.evaluators.reconstruction import ReconstructionEvaluator
from mae_jax.models.classifier import Classifier, ClassifierConfig
from mae_jax.models.mae import MAE
from tests.conftest import TINY, tiny_downstream_config, tiny_train_config, with_overrides
from tests.test_cli_errors import assert_one_line_error, run_module
from tests.test_input_pipeline import write_fashion_mnist


# ---------------------------------------------------------------------------------------------------
# Registry, selection, schedule
# ---------------------------------------------------------------------------------------------------
def test_each_registered_evaluator_has_its_block_in_the_configs():
    assert set(EVALUATORS) == {"reconstruction", "knn", "probe", "classification"}
    assert all(issubclass(evaluator, Evaluator) and evaluator.name == name for name, evaluator in EVALUATORS.items())
    pretraining = configuration.base_config().evals
    assert set(pretraining) == {"reconstruction", "knn", "probe"}
    for task in ("finetune", "linprobe"):
        assert set(configuration.downstream_config(task).evals) == {"classification"}
    assert (pretraining.reconstruction.every_steps, pretraining.knn.every_steps) == (5000, 0)  # kNN is opt-in
    assert pretraining.probe.every_steps == 0  # as is the linear probe


def fashion_pretraining_config(data_dir: pathlib.Path, **overrides) -> ml_collections.ConfigDict:
    write_fashion_mnist(data_dir, num_train=16, num_test=8)
    return tiny_train_config(**{"dataset.source": "fashion_mnist", "dataset.data_dir": str(data_dir), **overrides})


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, [ReconstructionEvaluator]),
        ({"evals.knn.every_steps": 2}, [KnnEvaluator, ReconstructionEvaluator]),
        ({"evals.knn.every_steps": 2, "evals.reconstruction.every_steps": 0}, [KnnEvaluator]),
    ],
    ids=["default", "knn on", "reconstruction off"],
)
def test_make_evaluators_builds_those_with_every_steps_above_zero(tmp_path: pathlib.Path, overrides, expected):
    config = fashion_pretraining_config(tmp_path, **overrides)
    source = input_pipeline.make_source(config.dataset)
    evaluators = make_evaluators(config, sharding.make_mesh(config.mesh), source)
    assert [type(evaluator) for evaluator in evaluators] == expected
    assert [evaluator.every_steps for evaluator in evaluators] == [config.evals[e.name].every_steps for e in expected]


def test_due_every_every_steps_and_at_the_last_step(tmp_path: pathlib.Path):
    config = fashion_pretraining_config(tmp_path, **{"evals.reconstruction.every_steps": 3})
    (evaluator,) = make_evaluators(config, sharding.make_mesh(config.mesh), input_pipeline.make_source(config.dataset))
    assert [step for step in range(1, 8) if evaluator.due(step, total_steps=7)] == [3, 6, 7]
    assert [step for step in range(1, 7) if evaluator.due(step, total_steps=6)] == [3, 6]


# ---------------------------------------------------------------------------------------------------
# Classification: top-1/top-5 against torch.topk over the same logits
# ---------------------------------------------------------------------------------------------------
def write_noise_folder(root: pathlib.Path, num_classes: int, per_class: int, rng: np.random.Generator) -> None:
    """root/c<k>/<i>.png of random pixels, sizes varying; the model's logits differ from image to image."""
    for label in range(num_classes):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(per_class):
            size = tuple(rng.integers(24, 48, 2))
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"c{label}" / f"{i}.png")


def classification_config(data_dir: pathlib.Path, num_classes: int) -> ml_collections.ConfigDict:
    overrides = {"dataset.source": "folder", "dataset.data_dir": str(data_dir), "evals.classification.split": "val"}
    return tiny_downstream_config("finetune", num_classes=num_classes, **overrides)


def classifier_with_spread_logits(num_classes: int) -> Classifier:
    """A random classifier whose head is scaled up from its 2e-5 init, so its classes are far from ties."""
    model = Classifier(ClassifierConfig(TINY.encoder, num_classes), rngs=nnx.Rngs(0))
    model.head.kernel[...] = jax.random.normal(jax.random.key(1), model.head.kernel.shape)
    return model


@pytest.mark.parametrize("num_classes", [7, 3], ids=["top-5 of 7", "top-5 capped at 3 classes"])
def test_classification_counts_the_readable_examples_as_torch_topk(tmp_path: pathlib.Path, num_classes: int):
    rng = np.random.default_rng(num_classes)
    write_noise_folder(tmp_path / "train", num_classes, 1, rng)
    write_noise_folder(tmp_path / "val", num_classes, 3, rng)
    (tmp_path / "val" / "c1" / "broken.png").write_bytes(b"not an image")  # skipped, not counted as a miss
    config = classification_config(tmp_path, num_classes)
    train_source = input_pipeline.make_source(config.dataset)
    evaluator = ClassificationEvaluator(config, sharding.make_mesh(config.mesh), train_source)
    assert evaluator.num_examples == 3 * num_classes + 1  # 3 batches of 8 for 7 classes: padding rows too
    model = classifier_with_spread_logits(num_classes)
    result = evaluator.run(model)

    val = input_pipeline.ImageFolder(tmp_path / "val")
    readable = [val[i] for i in range(len(val)) if not val[i]["name"].endswith("broken.png")]
    images = np.stack([input_pipeline.eval_transform(input_pipeline.decode(r["image"]), 32) for r in readable])
    labels = torch.tensor([r["label"] for r in readable])
    logits = torch.from_numpy(np.array(model(input_pipeline.normalize(images)), np.float32))
    best = torch.topk(logits, min(5, num_classes)).indices
    top1 = int((best[:, 0] == labels).sum())
    top5 = int((best == labels[:, None]).any(dim=1).sum())
    assert result == {"eval_top1": 100 * top1 / len(readable), "eval_top5": 100 * top5 / len(readable)}
    if num_classes > 5:
        assert 0 < top1 < top5 < len(readable)  # neither bound, and top-5 more than top-1
    else:
        assert top1 < top5 == len(readable)


def test_classification_checks_the_split_at_start(tmp_path: pathlib.Path):
    rng = np.random.default_rng(0)
    write_noise_folder(tmp_path / "train", 3, 1, rng)
    write_noise_folder(tmp_path / "val", 4, 1, rng)
    config = classification_config(tmp_path, 3)
    mesh, train_source = sharding.make_mesh(config.mesh), input_pipeline.make_source(config.dataset)
    with pytest.raises(
        ConfigError, match=re.escape(f"image folder {tmp_path / 'val'} has 4 classes, more than num_classes=3")
    ):
        ClassificationEvaluator(config, mesh, train_source)
    with pytest.raises(ConfigError, match=r"only in the training split: \[\], only in the other: \['c3'\]"):
        ClassificationEvaluator(with_overrides(config, {"num_classes": 4}), mesh, train_source)
    with pytest.raises(
        input_pipeline.DatasetNotFoundError, match=re.escape(f"image folder {tmp_path / 'test'} does not exist")
    ):
        ClassificationEvaluator(with_overrides(config, {"evals.classification.split": "test"}), mesh, train_source)


# ---------------------------------------------------------------------------------------------------
# Reconstruction noise
# ---------------------------------------------------------------------------------------------------
def test_reconstruction_noise_is_the_uniform_draw_the_loop_made_before(tiny_model: MAE):
    """The grid's masks before evaluators: jax.random.uniform(key(seed + 2), (images, patches)); now the model's
    `draw_noise`, which must give the same bits so that grids of old and new runs compare."""
    key = jax.random.key(0 + 2)
    np.testing.assert_array_equal(tiny_model.draw_noise(key, 8, 0.75), jax.random.uniform(key, (8, 16)))


# ---------------------------------------------------------------------------------------------------
# Keys that moved into `evals`
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("task", "key", "value", "message"),
    [
        ("pretrain", "knn", ml_collections.ConfigDict({"every_steps": 5}), "config key knn moved to evals.knn"),
        (
            "pretrain",
            "image_every_steps",
            200,
            "config key image_every_steps moved to evals.reconstruction.every_steps",
        ),
        ("pretrain", "num_images", 4, "config key num_images moved to evals.reconstruction.num_images"),
        ("finetune", "eval_every_steps", 10, "config key eval_every_steps moved to evals.classification.every_steps"),
        ("linprobe", "eval_batch_size", 64, "config key eval_batch_size moved to evals.classification.batch_size"),
        ("finetune", "dataset.eval_split", "test", "config key dataset.eval_split moved to evals.classification.split"),
    ],
)
def test_a_config_with_a_moved_key_is_told_its_new_place(task: str, key: str, value, message: str):
    config = configuration.base_config() if task == "pretrain" else configuration.downstream_config(task)
    with_overrides(config, {key: value})  # an unlocked config takes a new key, as a config file's assignment does
    with pytest.raises(ConfigError) as error:
        configuration.validate(config)
    assert str(error.value) == message


def test_an_unknown_key_that_did_not_move_is_still_listed():
    config = configuration.base_config()
    config.evals.knn.kk = 5
    with pytest.raises(ConfigError, match=r"unknown config keys \['evals.knn.kk'\]"):
        configuration.validate(config)


@pytest.mark.parametrize(
    ("config_file", "override", "message"),
    [
        (
            "configs/demo.py",
            "--config.knn.every_steps=5",
            "error: config key knn.every_steps moved to evals.knn.every_steps",
        ),
        (
            "configs/fashion_mnist.py:finetune",
            "--config.dataset.eval_split=test",
            "error: config key dataset.eval_split moved to evals.classification.split",
        ),
    ],
    ids=["pretraining", "fine-tuning"],
)
def test_a_moved_override_fails_at_parse_time_naming_its_new_place(
    tmp_path: pathlib.Path, config_file: str, override: str, message: str
):
    result = run_module("mae_jax.main", f"--config={config_file}", f"--workdir={tmp_path}", override)
    assert_one_line_error(result, message)
    assert result.stderr.strip().splitlines()[-1] == message


def test_a_config_file_reading_a_moved_block_is_told_its_new_place(tmp_path: pathlib.Path):
    config_file = tmp_path / "old.py"
    config_file.write_text(
        "from configs.demo import get_config as demo\n\n\ndef get_config():\n    config = demo()\n"
        "    config.knn.every_steps = 5\n    return config\n"
    )
    result = run_module("mae_jax.main", f"--config={config_file}", f"--workdir={tmp_path}")
    assert_one_line_error(result, "error: config key knn moved to evals.knn")


# ---------------------------------------------------------------------------------------------------
# Workdirs saved before the move
# ---------------------------------------------------------------------------------------------------
def test_a_pretraining_workdir_saved_with_the_old_keys_still_loads(tmp_path: pathlib.Path, tiny_model: MAE):
    """A workdir's saved config is read into base_config(); the keys it has and base_config() has not must not
    stop fine-tuning's init= or the visualizer from reading its weights."""
    record = tiny_train_config().to_dict()
    del record["evals"]
    record |= {"image_every_steps": 200, "num_images": 8, "knn": {"every_steps": 0, "k": 20}}
    _, params, fixed = nnx.split(tiny_model, nnx.Param, ...)
    manager = checkpointing.make_manager(tmp_path, 1)
    checkpointing.save(manager, 3, {"step": np.int32(3), "params": params, "fixed": fixed}, record)
    manager.wait_until_finished()
    config, state = pretrained.load(str(tmp_path))
    assert config.encoder == tiny_model.config.encoder and "decoder" in state
    for loaded, saved in zip(jax.tree.leaves(state), jax.tree.leaves(nnx.state(tiny_model)), strict=True):
        np.testing.assert_array_equal(loaded, saved)
