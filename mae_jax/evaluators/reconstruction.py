"""Original / masked / reconstruction / reconstruction-with-visible-patches grids, as in the paper's figures:
the pretraining loop's TensorBoard grid (`ReconstructionEvaluator`) and `mae_jax.visualize`'s figures."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image

from mae_jax import input_pipeline, sharding
from mae_jax.evaluators.base import Evaluator
from mae_jax.input_pipeline import denormalize
from mae_jax.models.mae import MAE, NORM_PIX_EPS
from mae_jax.models.vit import patchify, unpatchify

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")
RGB_BANDS = (0, 1, 2)  # the image bands a grid shows as red, green and blue


def reconstruction_panels(model: MAE, images: jax.Array, mask_ratio: float, noise: jax.Array) -> jax.Array:
    """(N, 4, H, W, C) normalized images, one per COLUMNS entry, of normalized `images` masked by `noise`."""
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


def make_reconstruct_fn(graphdef: nnx.GraphDef, mask_ratio: float) -> Callable[..., jax.Array]:
    """Jitted (params, fixed, images, noise) -> (N, 4, H, W, C) normalized images, one per COLUMNS entry."""

    @jax.jit
    def reconstruct(params: nnx.State, fixed: nnx.State, images: jax.Array, noise: jax.Array) -> jax.Array:
        return reconstruction_panels(nnx.merge(graphdef, params, fixed), images, mask_ratio, noise)

    return reconstruct


def grid(
    panels: np.ndarray,
    pad: int = 2,
    stats: input_pipeline.PixelStats = input_pipeline.IMAGENET_STATS,
    bands: Sequence[int] = RGB_BANDS,
) -> np.ndarray:
    """(N, K, H, W, C) panels normalized with `stats` -> one (H', W', 3) uint8 image, a row per sample, a column
    per panel kind.

    The image's `bands` show as red, green and blue; with fewer than 3 bands they wrap around, so a grayscale
    image (one band) shows as gray.
    """
    n, k, h, w, channels = panels.shape
    shown = [band % channels for band in bands] if channels < 3 else list(bands)
    canvas = np.ones((n * (h + pad) + pad, k * (w + pad) + pad, 3), np.float32)
    for i in range(n):
        for j in range(k):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[top : top + h, left : left + w] = denormalize(panels[i, j], stats)[:, :, shown]
    return (canvas * 255).round().astype(np.uint8)


def save_png(path: str | epath.Path, image: np.ndarray) -> None:
    with epath.Path(path).open("wb") as f:
        Image.fromarray(image).save(f, format="PNG")


# ---------------------------------------------------------------------------------------------------
# The pretraining loop's grid
# ---------------------------------------------------------------------------------------------------
def _panels(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array, noise: jax.Array, mask_ratio: float):
    return reconstruction_panels(nnx.merge(graphdef, state), images, mask_ratio, noise)


class ReconstructionEvaluator(Evaluator):
    """The reconstruction grid of `evals.reconstruction.num_images` training images, to TensorBoard.

    The images (the source's first readable ones, center-cropped) and the masking noise are the same at
    every evaluation, so successive grids show the model's progress alone; multi-band images show through
    `evals.reconstruction.bands`. The noise comes from the
    model's own `draw_noise`, so a model that masks otherwise shows its own masks.
    """

    name = "reconstruction"

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, source: Sequence):
        super().__init__(config, mesh, source)
        self._stats = input_pipeline.pixel_stats(config.dataset)
        images = input_pipeline.fixed_eval_images(
            source, self.settings.num_images, config.image_size, config.num_channels
        )
        self._images = input_pipeline.normalize(images, self._stats)
        self._noise_key = jax.random.key(config.seed + 2)
        self._mask_ratio = config.mask_ratio
        self._panels = jax.jit(_panels, static_argnums=(0, 4), out_shardings=sharding.replicated(mesh))

    def run(self, model: MAE) -> dict[str, np.ndarray]:
        """{"reconstruction": the grid, (H, W, 3) uint8}: a row per image, a column per COLUMNS entry."""
        graphdef, state = nnx.split(model)
        noise = model.draw_noise(self._noise_key, len(self._images), self._mask_ratio)
        panels = self._panels(graphdef, state, self._images, noise, self._mask_ratio)
        return {"reconstruction": grid(np.asarray(panels), stats=self._stats, bands=self.settings.bands)}
