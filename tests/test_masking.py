"""Masking strategies (`model.masking`): each draws noise whose argsort keeps exactly floor(L * (1 - ratio))
patches; random stays the official draw, block masks are BEiT's rectangles, grid keeps one patch of every 2 x 2."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage

from mae_jax import configuration
from mae_jax.configuration import ConfigError
from mae_jax.models import mae
from mae_jax.models.mae import MAE, MASKINGS, block_mask, grid_pattern, num_kept, random_masking
from tests.conftest import TINY, tiny_train_config

SAMPLES = 64


def masks_of(masking: str, grid_size: int, mask_ratio: float, seed: int = 0) -> np.ndarray:
    """(SAMPLES, grid, grid) masks (1 = removed) that the model's argsort makes of the strategy's noise."""
    noise = MASKINGS[masking](jax.random.key(seed), SAMPLES, grid_size, mask_ratio)
    return np.asarray(random_masking(noise, mask_ratio).mask).reshape(SAMPLES, grid_size, grid_size)


@pytest.mark.parametrize(
    ("masking", "grid_size", "mask_ratio"),
    [
        ("random", 14, 0.75), ("random", 7, 0.9), ("block", 14, 0.75), ("block", 14, 0.4), ("block", 7, 0.5),
        ("block", 8, 0.9), ("grid", 8, 0.75), ("grid", 14, 0.75),
    ],
)  # fmt: skip
def test_every_strategy_keeps_exactly_the_static_count(masking: str, grid_size: int, mask_ratio: float):
    masks = masks_of(masking, grid_size, mask_ratio)
    removed = grid_size**2 - int(np.floor(grid_size**2 * (1 - mask_ratio)))
    np.testing.assert_array_equal(masks.reshape(SAMPLES, -1).sum(axis=1), removed)


def test_random_masking_is_the_official_uniform_draw_whatever_the_ratio(tiny_model: MAE):
    key = jax.random.key(3)
    for ratio in (0.5, 0.75):
        np.testing.assert_array_equal(tiny_model.draw_noise(key, 4, ratio), jax.random.uniform(key, (4, 16)))


@pytest.mark.parametrize("grid_size", [8, 14])
def test_grid_keeps_the_top_left_patch_of_every_2x2_cell(grid_size: int):
    kept = 1 - masks_of("grid", grid_size, 0.75)
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    expected = (rows % 2 == 0) & (cols % 2 == 0)
    assert expected.sum() == grid_size**2 // 4
    np.testing.assert_array_equal(kept, np.broadcast_to(expected, kept.shape))
    np.testing.assert_array_equal(grid_pattern(grid_size), expected.reshape(-1))


def boundary(masks: np.ndarray) -> np.ndarray:
    """Per mask, the number of 4-neighbour pairs of which one patch is removed and the other kept."""
    return (masks[:, 1:] != masks[:, :-1]).sum(axis=(1, 2)) + (masks[:, :, 1:] != masks[:, :, :-1]).sum(axis=(1, 2))


@pytest.mark.parametrize("mask_ratio", [0.4, 0.75])
def test_block_masks_are_unions_of_rectangles_not_scattered_patches(mask_ratio: float):
    """BEiT's generator places rectangles of at least 16 of 196 patches (4 x 4 at aspect 1) while they fit in
    what is left to remove. Hence: the removed patches are the blocks the generator placed (no random fill
    needed here), they form few connected regions, each region's patches mostly sit inside a removed 2 x 2
    square, and the boundary between removed and kept is a fraction of a random mask's."""
    grid_size, samples = 14, 32
    removed = 196 - num_kept(196, mask_ratio)
    keys = jax.random.split(jax.random.key(7), samples)
    blocks = np.asarray(jax.vmap(lambda key: block_mask(key, grid_size, removed))(keys))
    assert (blocks.reshape(samples, -1).sum(axis=1) <= removed).all()
    assert blocks.reshape(samples, -1).sum(axis=1).mean() >= removed - 1  # the blocks cover (nearly) all
    components = [ndimage.label(mask)[1] for mask in blocks]
    assert np.mean(components) <= 2.0
    full = blocks[:, :-1, :-1] & blocks[:, 1:, :-1] & blocks[:, :-1, 1:] & blocks[:, 1:, 1:]  # removed 2 x 2 squares
    in_square = np.zeros_like(blocks)
    for dy, dx in ((0, 0), (1, 0), (0, 1), (1, 1)):
        in_square[:, dy : dy + grid_size - 1, dx : dx + grid_size - 1] |= full
    assert in_square.sum() / blocks.sum() >= 0.95
    random = masks_of("random", grid_size, mask_ratio)
    assert boundary(masks_of("block", grid_size, mask_ratio)).mean() < 0.5 * boundary(random).mean()


def test_block_and_grid_masks_reach_the_model_and_its_loss():
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    for masking in ("block", "grid"):
        model = MAE(dataclasses.replace(TINY, masking=masking), rngs=nnx.Rngs(0))
        out = model(images, 0.75, key=jax.random.key(1))
        assert np.isfinite(float(out.loss)) and np.asarray(out.mask).sum(axis=1).tolist() == [12, 12]
        if masking == "grid":  # TINY: 32 px in 8 px patches, a 4 x 4 grid
            np.testing.assert_array_equal(np.asarray(out.mask), np.broadcast_to(~grid_pattern(4), (2, 16)))


def test_bad_masking_settings_fail_in_one_line_before_compiling():
    with pytest.raises(ConfigError, match=r"model.masking='stripes' must be one of \['block', 'grid', 'random'\]"):
        configuration.validate(tiny_train_config(**{"model.masking": "stripes"}))
    with pytest.raises(ConfigError, match=r"needs mask_ratio=0.75 \(not 0.5\) and an even number of patches per"):
        configuration.validate(tiny_train_config(**{"model.masking": "grid", "mask_ratio": 0.5}))
    with pytest.raises(ConfigError, match=r"an even number of patches per side \(not 5\)"):
        configuration.validate(tiny_train_config(**{"model.masking": "grid", "image_size": 40}))
    configuration.validate(tiny_train_config(**{"model.masking": "grid"}))  # 32 px, patch 8: a 4 x 4 grid
    with pytest.raises(ValueError, match="masking='stripes' must be one of"):
        mae.MAEConfig(masking="stripes")
