"""Original / masked / reconstruction / reconstruction-with-visible-patches grids, as in the paper's figures."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image

from mae_jax.input_pipeline import denormalize
from mae_jax.models.mae import NORM_PIX_EPS
from mae_jax.models.vit import patchify, unpatchify

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")


def make_reconstruct_fn(graphdef: nnx.GraphDef, mask_ratio: float) -> Callable[..., jax.Array]:
    """Jitted (params, fixed, images, noise) -> (N, 4, H, W, 3) normalized images, one per COLUMNS entry."""

    @jax.jit
    def reconstruct(params: nnx.State, fixed: nnx.State, images: jax.Array, noise: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params, fixed)
        patch_size = model.config.encoder.patch_size
        out = model(images, mask_ratio, noise=noise)
        pred = out.pred
        if model.config.norm_pix_loss:  # show pixels: undo the per-patch normalization with the true statistics
            target = patchify(images, patch_size)
            std = jnp.sqrt(target.var(axis=-1, keepdims=True, ddof=1) + NORM_PIX_EPS)
            pred = pred * std + target.mean(axis=-1, keepdims=True)
        recon = unpatchify(pred, patch_size)
        removed = unpatchify(jnp.repeat(out.mask[:, :, None], pred.shape[-1], axis=-1), patch_size)
        masked = images * (1 - removed)
        return jnp.stack([images, masked, recon, masked + recon * removed], axis=1)

    return reconstruct


def grid(panels: np.ndarray, pad: int = 2) -> np.ndarray:
    """(N, C, H, W, 3) normalized panels -> one uint8 image, a row per sample, a column per panel kind."""
    n, c, h, w, _ = panels.shape
    canvas = np.ones((n * (h + pad) + pad, c * (w + pad) + pad, 3), np.float32)
    for i in range(n):
        for j in range(c):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[top : top + h, left : left + w] = denormalize(panels[i, j])
    return (canvas * 255).round().astype(np.uint8)


def save_png(path: str | epath.Path, image: np.ndarray) -> None:
    with epath.Path(path).open("wb") as f:
        Image.fromarray(image).save(f, format="PNG")
