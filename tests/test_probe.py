"""Online linear probe: the head learns separable features and reaches what torch's L-BFGS logistic regression
reaches, standardizes as torch's BatchNorm1d(affine=False) in train and eval mode, the evaluator separates toy
classes, a pretraining run writes `probe_top1`, bad configs fail in one line."""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from mae_jax import configuration, input_pipeline, sharding
from mae_jax.configuration import ConfigError
from mae_jax.evaluators.probe import ProbeEvaluator, fit_linear_head, standardize
from tests.conftest import TINY_MAIN_FLAGS, run_main, tiny_train_config
from tests.test_input_pipeline import write_fashion_mnist
from tests.test_knn import write_flat_colors


def blobs(rng: np.random.Generator, centers: np.ndarray, n: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """n rows around `centers`, with a per-feature offset and scale far from standardized, as raw features are."""
    labels = rng.integers(0, len(centers), n)
    features = centers[labels] + spread * rng.normal(size=(n, centers.shape[1]))
    return (5.0 + 30.0 * features).astype(np.float32), labels.astype(np.int32)


def fit(features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0):
    return fit_linear_head(features, labels, num_classes, seed=seed, epochs=30, batch_size=64, learning_rate=0.1)


def accuracy(head, features: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(head(features)).argmax(-1) == labels))


def test_head_learns_separable_features_to_100_percent_and_depends_only_on_the_seed():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 32))
    (train_x, train_y), (test_x, test_y) = blobs(rng, centers, 1000, 0.1), blobs(rng, centers, 500, 0.1)
    head = fit(train_x, train_y, 10)
    assert accuracy(head, test_x, test_y) == 1.0
    again, other_seed = fit(train_x, train_y, 10), fit(train_x, train_y, 10, seed=1)
    np.testing.assert_array_equal(again.kernel, head.kernel)
    assert not np.array_equal(other_seed.kernel, head.kernel)


def test_standardization_is_torch_batch_norm_without_affine_in_train_and_eval_mode():
    """The official probe's head_norm, fed the training features as one batch: train mode normalizes with their
    biased variance, and keeps the unbiased one (n / (n - 1)) as running_var, which the head evaluates with."""
    rng = np.random.default_rng(1)
    features, labels = blobs(rng, rng.normal(size=(3, 16)), 300, 1.0)
    test_features = blobs(rng, rng.normal(size=(3, 16)), 50, 1.0)[0]
    head = fit(features, labels, 3)
    batch_norm = torch.nn.BatchNorm1d(16, affine=False, eps=1e-6, momentum=None).train()  # running: plain mean
    expected = batch_norm(torch.from_numpy(features)).numpy()
    biased = np.var(features.astype(np.float64), axis=0)
    np.testing.assert_allclose(standardize(features, head.mean, biased), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(head.mean, batch_norm.running_mean.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(head.var, batch_norm.running_var.numpy(), rtol=1e-5, atol=0)
    expected = batch_norm.eval()(torch.from_numpy(test_features)).numpy()
    np.testing.assert_allclose(standardize(test_features, head.mean, head.var), expected, rtol=1e-4, atol=1e-4)


def test_head_reaches_the_accuracy_of_torch_lbfgs_logistic_regression():
    """Overlapping classes, where the accuracy is well below 100 %: mini-batch Adam gets what the exact
    minimizer of the same loss (full-batch L-BFGS, run to convergence) gets on held-out rows."""
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(5, 16))
    (train_x, train_y), (test_x, test_y) = blobs(rng, centers, 2000, 2.0), blobs(rng, centers, 2000, 2.0)
    head = fit(train_x, train_y, 5)

    train = torch.from_numpy(np.array(standardize(train_x, head.mean, head.var)))
    test = torch.from_numpy(np.array(standardize(test_x, head.mean, head.var)))
    linear = torch.nn.Linear(16, 5)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")
    targets = torch.from_numpy(train_y).long()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        reference = float(np.mean(linear(test).argmax(1).numpy() == test_y))
    assert 0.6 < reference < 0.95  # a problem where the optimizer matters
    assert abs(accuracy(head, test_x, test_y) - reference) <= 0.01


def test_evaluator_separates_classes_of_different_images(tmp_path: pathlib.Path, tiny_model):
    rng = np.random.default_rng(0)
    write_flat_colors(tmp_path / "train", 20, rng)
    write_flat_colors(tmp_path / "test", 5, rng)
    config = tiny_train_config(
        **{
            "dataset.source": "folder",
            "dataset.data_dir": str(tmp_path),
            "evals.probe.every_steps": 1,
            "evals.probe.num_train": 100,  # a class-stratified 100 of the 200: every class
            "evals.probe.num_eval": 1000,  # all 50
            "evals.probe.batch_size": 50,
        }
    )
    evaluator = ProbeEvaluator(config, sharding.make_mesh(config.mesh), input_pipeline.make_source(config.dataset))
    assert evaluator.run(tiny_model)["probe_top1"] >= 0.95  # the encoder is random: its features still separate


def test_pretraining_writes_probe_top1(tmp_path: pathlib.Path):
    data = tmp_path / "fashion_mnist"
    data.mkdir()
    write_fashion_mnist(data, num_train=40, num_test=12)
    result = run_main(
        tmp_path / "workdir",
        *TINY_MAIN_FLAGS,
        "--config.dataset.source=fashion_mnist",
        f"--config.dataset.data_dir={data}",
        "--config.total_steps=2",
        "--config.warmup_steps=1",
        "--config.evals.probe.every_steps=1",
        "--config.evals.probe.num_train=40",
        "--config.evals.probe.num_eval=12",
        "--config.evals.probe.batch_size=8",
        "--config.evals.probe.epochs=20",
        "--config.evals.probe.head_batch_size=8",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "probe_top1" in result.stderr  # the log
    (events,) = (tmp_path / "workdir").glob("events.out.tfevents.*")
    summaries = event_accumulator.EventAccumulator(str(events))
    summaries.Reload()
    probe_top1 = {e.step: e.value for e in summaries.Scalars("probe_top1")}
    assert probe_top1 == {1: 1.0, 2: 1.0}  # every step and the last; the classes are separable patterns


def test_unlabeled_data_is_refused_at_start():
    config = tiny_train_config(**{"evals.probe.every_steps": 1})  # the demo photographs, validation skipped
    with pytest.raises(input_pipeline.DatasetNotFoundError, match=r"has no labels; set evals\.probe\.every_steps=0"):
        ProbeEvaluator(config, sharding.make_mesh(config.mesh), input_pipeline.make_source(config.dataset))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"evals.probe.every_steps": -1}, "evals.probe.every_steps=-1 must be >= 0"),
        ({"evals.probe.epochs": 0}, "evals.probe.epochs=0 must be >= 1"),
        ({"evals.probe.head_batch_size": 0}, "evals.probe.head_batch_size=0 must be >= 1"),
        ({"evals.probe.learning_rate": 0.0}, "evals.probe.learning_rate=0.0 must be > 0"),
        (
            {"evals.probe.every_steps": 5},
            "evals.probe.every_steps > 0 needs labeled data: dataset.source='demo' has no labels",
        ),
        (
            {"dataset.source": "fashion_mnist", "evals.probe.every_steps": 5, "evals.probe.num_train": 0},
            "evals.probe.num_train=0 and evals.probe.num_eval=2000 must be >= 1",
        ),
        (
            {"dataset.source": "fashion_mnist", "evals.probe.every_steps": 5, "evals.probe.batch_size": 12},
            "evals.probe.batch_size=12 is not a positive multiple of the 8 devices",
        ),
    ],
)
def test_bad_probe_config_is_one_line(overrides: dict, message: str, monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        configuration.validate(tiny_train_config(**overrides))
    assert "\n" not in str(error.value)
