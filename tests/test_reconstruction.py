"""Reconstruction panels show the model's prediction in removed patches and the input elsewhere."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from mae_jax import reconstruction
from mae_jax.models.mae import MAE
from mae_jax.models.vit import patchify


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
