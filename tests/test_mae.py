"""Masking invariants, patch order and the loss against independent numpy computations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.models.mae import MAE, num_kept, random_masking, reconstruction_loss
from mae_jax.models.vit import patchify, unpatchify


@pytest.mark.parametrize("mask_ratio", [0.75, 0.6, 0.9])
def test_masking_invariants(mask_ratio: float):
    n, length = 3, 196
    noise = jax.random.uniform(jax.random.key(1), (n, length))
    tokens = jnp.broadcast_to(jnp.arange(length, dtype=jnp.float32)[None, :, None], (n, length, 2))
    masking = random_masking(noise, mask_ratio)
    kept, mask, ids_restore = masking.keep(tokens), masking.mask, masking.ids_restore
    len_keep = int(np.floor(length * (1 - mask_ratio)))
    assert kept.shape == (n, len_keep, 2) and num_kept(length, mask_ratio) == len_keep
    noise = np.asarray(noise)
    order = np.argsort(noise, axis=1)
    # the kept tokens are the ones with the smallest noise, in ascending-noise order
    np.testing.assert_array_equal(np.asarray(kept[:, :, 0]).astype(int), order[:, :len_keep])
    np.testing.assert_array_equal(np.asarray(masking.ids_keep), order[:, :len_keep])
    # the mask is 1 exactly where the noise is not among the len_keep smallest
    threshold = np.sort(noise, axis=1)[:, len_keep - 1 : len_keep]
    np.testing.assert_array_equal(np.asarray(mask), (noise > threshold).astype(np.float32))
    assert np.all(np.asarray(mask).sum(1) == length - len_keep)
    # restore undoes shuffle
    np.testing.assert_array_equal(
        np.take_along_axis(order, np.asarray(ids_restore), axis=1), np.arange(length)[None].repeat(n, 0)
    )


def test_patchify_matches_official_order():
    images = np.random.default_rng(0).normal(size=(2, 32, 48, 3)).astype(np.float32)
    p = 8
    nchw = images.transpose(0, 3, 1, 2)  # the official code patchifies NCHW as (n,c,h,p,w,q) -> (n,h,w,p,q,c)
    official = nchw.reshape(2, 3, 4, p, 6, p).transpose(0, 2, 4, 3, 5, 1).reshape(2, 24, p * p * 3)
    np.testing.assert_array_equal(np.asarray(patchify(images, p)), official)
    square = images[:, :, :32]
    np.testing.assert_array_equal(np.asarray(unpatchify(patchify(square, p), p)), square)


def numpy_loss(images: np.ndarray, pred: np.ndarray, mask: np.ndarray, p: int, norm_pix: bool) -> float:
    """The official loss written with explicit loops, in float64."""
    n, height, width, _ = images.shape
    total, count = 0.0, 0.0
    for i in range(n):
        index = 0
        for row in range(height // p):
            for col in range(width // p):
                target = images[i, row * p : (row + 1) * p, col * p : (col + 1) * p, :].astype(np.float64).reshape(-1)
                if norm_pix:
                    target = (target - target.mean()) / np.sqrt(target.var(ddof=1) + 1e-6)
                total += np.mean((pred[i, index] - target) ** 2) * mask[i, index]
                count += mask[i, index]
                index += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_numpy(norm_pix: bool):
    rng = np.random.default_rng(1)
    p, n = 8, 3
    images = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
    pred = rng.normal(size=(n, 16, p * p * 3)).astype(np.float32)
    mask = (rng.random((n, 16)) < 0.75).astype(np.float32)
    got = float(reconstruction_loss(patchify(images, p), pred, mask, norm_pix))
    np.testing.assert_allclose(got, numpy_loss(images, pred, mask, p, norm_pix), rtol=2e-6)


def test_forward_shapes_and_noise_determines_everything(tiny_model: MAE):
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    first = tiny_model(images, key=jax.random.key(5))
    again = tiny_model(images, noise=tiny_model.draw_noise(jax.random.key(5), 2, 0.75))
    other = tiny_model(images, key=jax.random.key(6))
    assert first.pred.shape == (2, 16, 8 * 8 * 3) and first.mask.shape == (2, 16)
    assert first.latent.shape == (2, 1 + 4, 64)
    np.testing.assert_array_equal(first.pred, again.pred)
    assert not np.array_equal(first.mask, other.mask)
    with pytest.raises(ValueError, match="noise"):
        tiny_model(images)
