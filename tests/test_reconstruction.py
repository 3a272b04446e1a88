"""Reconstruction panels show the model's prediction in removed patches and the input elsewhere; the training
run's grid is the same images and masks at every evaluation."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from mae_jax import input_pipeline, sharding
from mae_jax.evaluators import reconstruction
from mae_jax.evaluators.reconstruction import ReconstructionEvaluator
from mae_jax.models.mae import MAE
from mae_jax.models.vit import patchify
from tests.conftest import tiny_train_config


def test_panels_and_grid(tiny_model: MAE):
    graphdef, params, fixed = nnx.split(tiny_model, nnx.Param, ...)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    noise = jax.random.uniform(jax.random.key(1), (2, 16))
    panels = np.asarray(reconstruction.make_reconstruct_fn(graphdef, 0.75)(params, fixed, images, noise))
    assert panels.shape == (2, 4, 32, 32, 3)
    mask = np.asarray(tiny_model(images, noise=noise).mask)[:, :, None]
    original, masked, recon, pasted = (np.asarray(patchify(panels[:, i], 8)) for i in range(4))
    np.testing.assert_array_equal(original, np.asarray(patchify(images, 8)))
    np.testing.assert_array_equal(masked, original * (1 - mask))
    np.testing.assert_allclose(pasted, original * (1 - mask) + recon * mask, atol=1e-6)
    assert not np.allclose(recon * mask, original * mask)  # an untrained model does not reproduce the input

    image = reconstruction.grid(panels)
    assert image.dtype == np.uint8 and image.shape == (2 * 34 + 2, 4 * 34 + 2, 3)


IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def patches_by_hand(images: np.ndarray, p: int) -> np.ndarray:
    """(N, H, W, 3) -> (N, L, p*p*3): the official patchify, patches row-major, values (row, column, channel)."""
    n, height, width, _ = images.shape
    grid = images.reshape(n, height // p, p, width // p, p, 3).transpose(0, 1, 3, 2, 4, 5)
    return grid.reshape(n, (height // p) * (width // p), p * p * 3)


def image_by_hand(patches: np.ndarray, p: int) -> np.ndarray:
    n, length, _ = patches.shape
    side = round(length**0.5)
    return patches.reshape(n, side, side, p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, side * p, side * p, 3)


def test_norm_pix_reconstruction_is_denormalized_with_each_patch_statistics(tiny_model: MAE):
    """Against a numpy computation from the definition: the norm-pix target of a patch is (t - mean) /
    sqrt(var + 1e-6) with its unbiased variance, so pixels are pred * sqrt(var + 1e-6) + mean, then the
    ImageNet normalization is undone for display."""
    assert tiny_model.config.norm_pix_loss
    graphdef, params, fixed = nnx.split(tiny_model, nnx.Param, ...)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.float64) / 255
    images = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)  # as the train step normalizes them
    noise = np.random.default_rng(1).uniform(size=(2, 16)).astype(np.float32)
    panels = np.asarray(reconstruction.make_reconstruct_fn(graphdef, 0.75)(params, fixed, images, noise))
    out = tiny_model(images, 0.75, noise=noise)

    target = patches_by_hand(images.astype(np.float64), 8)
    mean, var = target.mean(axis=-1, keepdims=True), target.var(axis=-1, ddof=1, keepdims=True)
    recon = image_by_hand(np.asarray(out.pred, np.float64) * np.sqrt(var + 1e-6) + mean, 8)
    removed = image_by_hand(np.repeat(np.asarray(out.mask)[:, :, None], 8 * 8 * 3, axis=-1), 8) == 1
    np.testing.assert_allclose(panels[:, 2], recon, atol=1e-5)
    np.testing.assert_allclose(panels[:, 3], np.where(removed, recon, images), atol=1e-5)

    grid = reconstruction.grid(panels)  # 2-pixel gaps around 32 x 32 panels
    for column, expected in [(2, recon), (3, np.where(removed, recon, images))]:
        shown = np.clip(expected * IMAGENET_STD + IMAGENET_MEAN, 0, 1) * 255
        assert np.mean((shown > 0) & (shown < 255)) > 0.9  # clipping hides few pixels
        for row in range(2):
            cell = grid[2 + row * 34 : 2 + row * 34 + 32, 2 + column * 34 : 2 + column * 34 + 32]
            assert np.max(np.abs(cell - shown[row])) <= 0.5 + 1e-3, (row, column)  # rounded to the nearest level


def test_evaluator_grid_is_the_first_images_masked_by_the_runs_fixed_noise(tiny_model: MAE):
    """The grid the pretraining loop wrote before evaluators existed: the source's first readable images,
    center-cropped, masked by uniform noise drawn from key(seed + 2); the same at every evaluation."""
    config = tiny_train_config(seed=3, **{"evals.reconstruction.num_images": 3, "mask_ratio": 0.5})
    source = input_pipeline.make_source(config.dataset)
    evaluator = ReconstructionEvaluator(config, sharding.make_mesh(config.mesh), source)
    (name, image), *others = evaluator.run(tiny_model).items()
    assert name == "reconstruction" and not others

    images = np.stack([input_pipeline.eval_transform(input_pipeline.decode(source[i]["image"]), 32) for i in range(3)])
    noise = jax.random.uniform(jax.random.key(5), (3, 16))
    graphdef, params, fixed = nnx.split(tiny_model, nnx.Param, ...)
    reconstruct = reconstruction.make_reconstruct_fn(graphdef, 0.5)
    expected = reconstruction.grid(np.asarray(reconstruct(params, fixed, input_pipeline.normalize(images), noise)))
    np.testing.assert_array_equal(image, expected)
    assert image.shape == (3 * 34 + 2, 4 * 34 + 2, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(evaluator.run(tiny_model)["reconstruction"], image)
