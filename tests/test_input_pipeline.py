"""Transforms, sources and the deterministic, resumable batch sequence."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mae_jax import input_pipeline
from mae_jax.input_pipeline import CROP_RATIO, CROP_SCALE
from tests.conftest import tiny_train_config


def test_random_resized_crop_box_follows_torchvision_rule():
    rng = np.random.default_rng(0)
    for height, width in [(375, 500), (500, 375), (64, 64), (20, 300)]:
        for _ in range(200):
            left, top, right, bottom = input_pipeline.random_resized_crop_box(rng, height, width)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            area = (right - left) * (bottom - top) / (height * width)
            aspect = (right - left) / (bottom - top)
            in_range = CROP_SCALE[0] - 0.02 <= area <= 1 and CROP_RATIO[0] - 0.05 <= aspect <= CROP_RATIO[1] + 0.05
            fallback = (right - left, bottom - top) in {(min(width, round(height * 4 / 3)), height), (width, height)}
            assert in_range or fallback


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((40, 30), np.uint8),  # grayscale
        np.zeros((40, 30, 1), np.uint8),
        np.zeros((40, 30, 4), np.uint8),  # RGBA
        np.zeros((40, 30, 3), np.float64),  # float in [0, 1]
        np.zeros((3, 5, 3), np.uint8),  # tiny
    ],
)
def test_transforms_accept_odd_images(image: np.ndarray):
    out = input_pipeline.pretrain_transform(image, np.random.default_rng(0), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    black = -input_pipeline.IMAGENET_MEAN / input_pipeline.IMAGENET_STD
    np.testing.assert_allclose(out, np.broadcast_to(black, out.shape), rtol=1e-6)
    assert input_pipeline.eval_transform(image, 32).shape == (32, 32, 3)


def test_pretrain_transform_normalizes_and_flips():
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = 255  # left half white
    outputs = [input_pipeline.pretrain_transform(image, np.random.default_rng(seed), 32) for seed in range(20)]
    left_brighter = [out[:, :4].mean() > out[:, -4:].mean() for out in outputs]
    assert any(left_brighter) and not all(left_brighter)  # flipped sometimes, not always
    white = (1 - input_pipeline.IMAGENET_MEAN) / input_pipeline.IMAGENET_STD
    assert np.allclose(max(out.max() for out in outputs), white.max(), atol=1e-5)


def test_batches_are_deterministic_and_resume_at_any_step():
    config = tiny_train_config(batch_size=4)
    source = input_pipeline.DemoPhotos()
    run = input_pipeline.train_batches(source, config)
    uninterrupted = [next(run) for _ in range(7)]
    assert uninterrupted[0].shape == (4, 32, 32, 3)
    resumed = input_pipeline.train_batches(source, config, start_step=5)
    np.testing.assert_array_equal(next(resumed), uninterrupted[5])
    np.testing.assert_array_equal(next(resumed), uninterrupted[6])
    other_seed = input_pipeline.train_batches(source, tiny_train_config(batch_size=4, seed=1))
    assert not np.array_equal(next(other_seed), uninterrupted[0])


def test_tfds_imagenet_through_the_pipeline():
    config = tiny_train_config(**{"dataset.source": "tfds", "dataset.name": "imagenet2012"})
    with tfds.testing.mock_data(num_examples=20):
        source = input_pipeline.make_source(config.dataset)
        batch = next(input_pipeline.train_batches(source, config))
    assert len(source) == 20 and batch.shape == (8, 32, 32, 3) and np.isfinite(batch).all()


def test_missing_tfds_dataset_says_how_to_prepare_it(tmp_path):
    config = tiny_train_config(**{"dataset.source": "tfds", "dataset.data_dir": str(tmp_path)})
    with pytest.raises(input_pipeline.DatasetNotFoundError, match="tfds build imagenet2012"):
        input_pipeline.make_source(config.dataset)
