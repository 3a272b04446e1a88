"""Fine-tuning augmentations: RandAugment on the host, Mixup/CutMix and random erasing on the device."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mae_jax import augment

NUM_CLASSES = 10
LABELS = jnp.array([3, 1, 4, 7])


def random_image(seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------
# RandAugment
# ---------------------------------------------------------------------------------------------------
def test_rand_augment_is_deterministic_per_seed_and_varies_across_seeds():
    image = random_image()
    outputs = [augment.rand_augment(image, np.random.default_rng(seed)) for seed in range(6)]
    for seed, out in enumerate(outputs):
        assert out.dtype == np.uint8 and out.shape == image.shape
        np.testing.assert_array_equal(out, augment.rand_augment(image, np.random.default_rng(seed)))
    assert len({out.tobytes() for out in outputs}) > 1
    assert any(not np.array_equal(out, image) for out in outputs)


def test_rand_augment_uses_timms_increasing_op_set():
    assert list(augment.OPS) == [
        "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
        "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
        "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
    ]  # fmt: skip


def test_rand_augment_ops_at_full_strength():
    image = random_image()
    pil = Image.fromarray(image)
    rng = np.random.default_rng(0)
    # Increasing ops: magnitude 10 is the strongest setting; posterize keeps 0 bits (a black image).
    assert not np.asarray(augment.OPS["PosterizeIncreasing"](pil, 1.0, rng)).any()
    np.testing.assert_array_equal(augment.OPS["SolarizeIncreasing"](pil, 0.0, rng), image)  # threshold 256
    added = np.where(image < 128, np.minimum(image.astype(int) + 110, 255), image)
    np.testing.assert_array_equal(augment.OPS["SolarizeAdd"](pil, 1.0, rng), added)
    # A translation by 45% of the width uncovers columns filled with timm's img_mean.
    for seed in range(4):
        out = np.asarray(augment.OPS["TranslateXRel"](pil, 1.0, np.random.default_rng(seed)))
        assert np.all(out[:, -10:] == augment.FILL) or np.all(out[:, :10] == augment.FILL)


def test_rand_augment_parametric_ops_are_identity_at_magnitude_zero():
    """ "Increasing" ops: magnitude 0 is no change, except posterize, which then keeps 4 bits."""
    image = random_image()
    pil = Image.fromarray(image)
    parameter_free = {"AutoContrast", "Equalize", "Invert"}
    rng = np.random.default_rng(0)
    for name, op in augment.OPS.items():
        if name not in parameter_free | {"PosterizeIncreasing"}:
            np.testing.assert_array_equal(op(pil, 0.0, rng), image, err_msg=name)
    np.testing.assert_array_equal(augment.OPS["PosterizeIncreasing"](pil, 0.0, rng), image & 0xF0)  # 4 bits


# ---------------------------------------------------------------------------------------------------
# Mixup / CutMix
# ---------------------------------------------------------------------------------------------------
def constant_batch() -> jax.Array:
    """Image i is constant i + 1, so every output pixel tells which image it came from."""
    return jnp.broadcast_to(jnp.arange(1.0, 5.0)[:, None, None, None], (4, 16, 24, 3))


@functools.partial(jax.jit, static_argnames=("mixup_alpha", "cutmix_alpha"))
def mix_many(
    keys: jax.Array,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """`mixup_cutmix` of `constant_batch()` once per key; one compile per pair of alphas (Beta sampling is slow)."""
    kwargs = dict(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, switch_prob=switch_prob)
    mix = functools.partial(augment.mixup_cutmix, num_classes=NUM_CLASSES, label_smoothing=label_smoothing, **kwargs)
    return jax.vmap(lambda key: mix(constant_batch(), LABELS, key))(keys)


def keys(count: int) -> jax.Array:
    return jax.random.split(jax.random.key(0), count)


def smoothed(labels: jax.Array, smoothing: float) -> np.ndarray:
    off = smoothing / NUM_CLASSES
    return np.where(np.eye(NUM_CLASSES)[np.asarray(labels)] > 0, 1 - smoothing + off, off)


def test_mixup_cutmix_targets_are_distributions():
    images, targets = mix_many(keys(8))
    assert images.shape == (8, 4, 16, 24, 3) and images.dtype == jnp.float32
    assert targets.shape == (8, 4, NUM_CLASSES) and targets.dtype == jnp.float32
    np.testing.assert_allclose(targets.sum(axis=-1), 1.0, rtol=1e-6)
    assert (targets > 0).all()


def test_cutmix_label_weight_equals_pasted_area():
    images = np.asarray(constant_batch())
    flipped_value = np.arange(4.0, 0.0, -1.0)
    outs, targets = mix_many(keys(10), mixup_alpha=0.0, label_smoothing=0.0)
    fractions = []
    for out, target in zip(np.asarray(outs), np.asarray(targets), strict=True):
        pasted = out == flipped_value[:, None, None, None]
        assert np.all(pasted | (out == images))  # every pixel is one image's or the other's
        assert np.all(pasted == pasted[:1, :, :, :1])  # one box for the batch and all channels
        rows, cols = np.nonzero(pasted[0, :, :, 0])
        if rows.size:  # the box is a rectangle
            assert rows.size == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        fraction = pasted[0].mean()
        fractions.append(fraction)
        weights = target[np.arange(4), np.asarray(LABELS[::-1])]
        np.testing.assert_allclose(weights, fraction, atol=1e-6)
    assert any(0 < f < 1 for f in fractions)


def test_mixup_blends_images_and_labels_with_one_lambda():
    images = np.asarray(constant_batch())
    outs, targets = mix_many(keys(3), cutmix_alpha=0.0, label_smoothing=0.0)
    for out, target in zip(np.asarray(outs), np.asarray(targets), strict=True):
        lam = 1 - (out[0, 0, 0, 0] - 1) / 3  # out[0] = lam * 1 + (1 - lam) * 4
        np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-5)
        expected = lam * smoothed(LABELS, 0) + (1 - lam) * smoothed(LABELS[::-1], 0)
        np.testing.assert_allclose(target, expected, atol=1e-6)


@pytest.mark.parametrize(("switch_prob", "cutmix"), [(0.0, False), (1.0, True)])
def test_switch_prob_chooses_the_mode(switch_prob: float, cutmix: bool):
    outs, _ = mix_many(keys(5), switch_prob=switch_prob)
    for out in np.asarray(outs):
        assert np.all(np.isin(out, [1.0, 2.0, 3.0, 4.0])) == cutmix


def test_no_mixing_only_smooths_labels():
    outs, targets = mix_many(keys(1), mixup_alpha=0.0, cutmix_alpha=0.0)
    np.testing.assert_array_equal(outs[0], constant_batch())
    np.testing.assert_allclose(targets[0], smoothed(LABELS, 0.1), rtol=1e-6)
    np.testing.assert_allclose(targets[0, 0, 3], 1 - 0.1 + 0.01, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Random erasing
# ---------------------------------------------------------------------------------------------------
erase = jax.jit(augment.random_erasing)
ERASE_SHAPE = (256, 32, 48, 3)  # one shape for all tests: one compile


def test_random_erasing_probability_zero_changes_nothing():
    images = jax.random.normal(jax.random.key(1), ERASE_SHAPE)
    np.testing.assert_array_equal(erase(images, jax.random.key(0), probability=0.0), images)


def test_random_erasing_fills_one_rectangle_per_image_with_noise():
    _, height, width, _ = ERASE_SHAPE
    images = jnp.full(ERASE_SHAPE, 7.0)  # noise never equals 7 exactly
    out = np.asarray(erase(images, jax.random.key(0), probability=1.0))
    changed = out != 7.0
    assert np.all(changed == changed[..., :1])  # all channels of a pixel together
    boxes = set()
    for mask in changed[..., 0]:
        rows, cols = np.nonzero(mask)
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert rows.size == h * w  # a filled rectangle
        # Area fraction in [0.02, 1/3] and aspect in [0.3, 1/0.3], up to rounding each side to whole pixels.
        slack = (h + w) / 2 + 1
        assert 0.02 * height * width - slack <= h * w <= height * width / 3 + slack
        assert (h + 0.5) / (w - 0.5) >= 0.3 and (h - 0.5) / (w + 0.5) <= 1 / 0.3
        boxes.add((rows.min(), cols.min(), h, w))
    assert len(boxes) > 1  # drawn per image
    noise = out[changed]
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1


def test_random_erasing_rate_follows_probability():
    images = jnp.zeros(ERASE_SHAPE)
    erased = np.asarray(erase(images, jax.random.key(0), probability=0.25) != 0).any(axis=(1, 2, 3))
    assert 40 <= erased.sum() <= 88  # 64 expected, sd ~ 7
