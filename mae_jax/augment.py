"""Fine-tuning augmentations of the official recipe (timm 0.3.2 as MAE's main_finetune.py configures it).

RandAugment "rand-m9-mstd0.5-inc1" runs per image on the host with PIL, like the rest of the input
pipeline. Mixup/CutMix (mode "batch", label smoothing folded into the targets) and random erasing
("pixel" mode, one box) run on the accelerator, on the normalized batch, as jittable functions of a key.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_MAGNITUDE = 10  # timm's level scale: magnitude / 10 is the op's strength in [0, 1]
OP_PROBABILITY = 0.5  # timm applies each chosen RandAugment op with this probability
# timm's `img_mean` hparam: the ImageNet mean as uint8, the fill of pixels that geometric ops uncover.
FILL = (124, 116, 104)
FILL_GRAY = 117  # FILL as a grayscale ("L") image's pixel: Pillow's convert("L") of it
TRANSLATE_FRACTION = 0.45  # timm's default `translate_pct` for TranslateXRel/YRel
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
ERASE_ATTEMPTS = 10

Op = Callable[[Image.Image, float, np.random.Generator], Image.Image]


def _signed(value: float, rng: np.random.Generator) -> float:
    """Negate with probability 1/2, as timm's `_randomly_negate`."""
    return -value if rng.random() > 0.5 else value


def _fill(image: Image.Image) -> int | tuple[int, ...]:
    return FILL_GRAY if image.mode == "L" else FILL


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    # The official transform asks for bicubic resampling, which timm passes on to the geometric ops.
    return image.transform(
        image.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BICUBIC, fillcolor=_fill(image)
    )


def _rotate(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    return image.rotate(_signed(level * 30, rng), resample=Image.Resampling.BICUBIC, fillcolor=_fill(image))


def _posterize(image: Image.Image, level: float, _: np.random.Generator) -> Image.Image:
    """Keep 4 - int(4 * level) bits; 0 bits is a black image (as older Pillow gave; Pillow 13 refuses 0 bits)."""
    bits = 4 - int(level * 4)
    return ImageOps.posterize(image, bits) if bits else Image.new(image.mode, image.size)


def _solarize_add(image: Image.Image, level: float, _: np.random.Generator) -> Image.Image:
    """Add `level * 110` to the channels below 128, saturating at 255."""
    add = int(level * 110)
    return image.point([min(255, i + add) if i < 128 else i for i in range(256)] * len(image.getbands()))


def _enhance(enhancer: type[ImageEnhance._Enhance]) -> Op:
    """The "increasing" enhance ops: factor 1 -/+ 0.9 * level, so a higher magnitude moves further from identity."""

    def op(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
        return enhancer(image).enhance(max(0.1, 1.0 + _signed(level * 0.9, rng)))

    return op


# timm's _RAND_INCREASING_TRANSFORMS (selected by "inc1"), in timm's order; `level` is magnitude / 10.
OPS: dict[str, Op] = {
    "AutoContrast": lambda image, level, rng: ImageOps.autocontrast(image),
    "Equalize": lambda image, level, rng: ImageOps.equalize(image),
    "Invert": lambda image, level, rng: ImageOps.invert(image),
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": lambda image, level, rng: ImageOps.solarize(image, 256 - int(level * 256)),
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda image, level, rng: _affine(image, (1, _signed(level * 0.3, rng), 0, 0, 1, 0)),
    "ShearY": lambda image, level, rng: _affine(image, (1, 0, 0, _signed(level * 0.3, rng), 1, 0)),
    "TranslateXRel": lambda image, level, rng: _affine(
        image, (1, 0, _signed(level * TRANSLATE_FRACTION, rng) * image.width, 0, 1, 0)
    ),
    "TranslateYRel": lambda image, level, rng: _affine(
        image, (1, 0, 0, 0, 1, _signed(level * TRANSLATE_FRACTION, rng) * image.height)
    ),
}


def rand_augment(
    image: np.ndarray,
    rng: np.random.Generator,
    num_ops: int = 2,
    magnitude: float = 9,
    magnitude_std: float = 0.5,
) -> np.ndarray:
    """timm RandAugment on a uint8 HxWx3 (RGB) or HxW (grayscale) image: `num_ops` ops drawn with replacement,
    each applied with probability 1/2 at a magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10].

    All randomness comes from `rng`, so an element's augmentation is reproducible from its seed.
    """
    ops = list(OPS.values())
    result = Image.fromarray(image)
    for index in rng.choice(len(ops), size=num_ops):
        if rng.random() > OP_PROBABILITY:
            continue
        strength = rng.normal(magnitude, magnitude_std) if magnitude_std > 0 else magnitude
        strength = min(MAX_MAGNITUDE, max(0.0, strength))
        result = ops[index](result, strength / MAX_MAGNITUDE, rng)
    return np.array(result)


def _smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def _cutmix_box(key: jax.Array, height: int, width: int, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """timm's `rand_bbox`: a box of side floor(side * sqrt(1 - lam)) centred anywhere, clipped to the image.

    Returns the (H, W) mask of the box and lam corrected to its real area (`correct_lam=True`).
    """
    ratio = jnp.sqrt(1.0 - lam)
    cut = jnp.floor(jnp.array([height, width]) * ratio).astype(jnp.int32) // 2
    centre = jax.random.randint(key, (2,), 0, jnp.array([height, width]))
    low = jnp.clip(centre - cut, 0, jnp.array([height, width]))
    high = jnp.clip(centre + cut, 0, jnp.array([height, width]))
    rows = (jnp.arange(height) >= low[0]) & (jnp.arange(height) < high[0])
    cols = (jnp.arange(width) >= low[1]) & (jnp.arange(width) < high[1])
    area = (high[0] - low[0]) * (high[1] - low[1])
    return rows[:, None] & cols[None, :], 1.0 - area / (height * width)


def mixup_cutmix(
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    num_classes: int,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """timm Mixup in mode "batch": one lambda for the batch, every image mixed with the batch reversed.

    With both alphas > 0, CutMix is chosen with probability `switch_prob`; an alpha of 0 disables its
    mode, and with both 0 only label smoothing remains. CutMix's lambda is the share of pixels kept.
    Returns NHWC images of the input dtype and float32 soft targets (N, num_classes).
    """
    targets = _smooth_one_hot(labels, num_classes, label_smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    switch_key, beta_key, box_key = jax.random.split(key, 3)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(switch_key) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
    lam = jax.random.beta(beta_key, alpha, alpha)
    flipped = images[::-1]

    box, box_lam = _cutmix_box(box_key, images.shape[1], images.shape[2], lam)
    cut = jnp.where(box[None, :, :, None], flipped, images)
    blend = lam * images.astype(jnp.float32) + (1.0 - lam) * flipped.astype(jnp.float32)
    if jnp.issubdtype(images.dtype, jnp.integer):
        blend = jnp.round(blend)  # as timm's collate-time blend of uint8 images
    mixed = jnp.where(use_cutmix, cut, blend.astype(images.dtype))
    lam = jnp.where(use_cutmix, box_lam, lam)
    return mixed, lam * targets + (1.0 - lam) * targets[::-1]


def random_erasing(images: jax.Array, key: jax.Array, probability: float = 0.25) -> jax.Array:
    """timm RandomErasing(mode="pixel", max_count=1) on a normalized NHWC batch, vectorized over the batch.

    Per image with `probability`: of 10 draws of area fraction in [0.02, 1/3] and log-uniform aspect ratio
    in [0.3, 1/0.3], the first whose box fits is filled with standard normal noise; if none fits, nothing.
    """
    n, height, width, _ = images.shape
    apply_key, area_key, aspect_key, top_key, left_key, noise_key = jax.random.split(key, 6)
    apply = jax.random.uniform(apply_key, (n,)) < probability
    area = jax.random.uniform(area_key, (n, ERASE_ATTEMPTS), minval=ERASE_AREA[0], maxval=ERASE_AREA[1])
    aspect = jnp.exp(
        jax.random.uniform(aspect_key, (n, ERASE_ATTEMPTS), minval=ERASE_LOG_ASPECT[0], maxval=ERASE_LOG_ASPECT[1])
    )
    box_h = jnp.round(jnp.sqrt(area * height * width * aspect)).astype(jnp.int32)
    box_w = jnp.round(jnp.sqrt(area * height * width / aspect)).astype(jnp.int32)
    fits = (box_h < height) & (box_w < width)
    first = jnp.argmax(fits, axis=1)
    box_h = jnp.take_along_axis(box_h, first[:, None], axis=1)[:, 0]
    box_w = jnp.take_along_axis(box_w, first[:, None], axis=1)[:, 0]
    apply &= jnp.any(fits, axis=1)
    # Top-left corner uniform over the positions that keep the box inside, as random.randint(0, side - box).
    top = jax.random.randint(top_key, (n,), 0, height - box_h + 1)
    left = jax.random.randint(left_key, (n,), 0, width - box_w + 1)
    rows = jnp.arange(height)[None, :]
    cols = jnp.arange(width)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])
    mask = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]
    noise = jax.random.normal(noise_key, images.shape, images.dtype)
    return jnp.where(mask[..., None], noise, images)
