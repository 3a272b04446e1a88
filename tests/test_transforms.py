"""The downstream transforms against the official recipe's rules: evaluation (`util/datasets.build_transform`:
torchvision's Resize + CenterCrop on PIL images) and the linear probe's single-draw crop (`util/crop.py`).

torchvision is not importable here; the references below are written from its documented rules: Resize(s)
of the shorter side makes the long side int(s * long / short), CenterCrop's offsets are
int(round((H - h) / 2)) and int(round((W - w) / 2)), and PIL does the bicubic resampling.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from mae_jax import configuration, input_pipeline
from tests.conftest import with_overrides


def torchvision_eval_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(resized height, resized width, top, left) of build_transform's Resize(int(size / crop_pct)) and
    CenterCrop(size), crop_pct = 224/256 for size <= 224, else 1."""
    crop_pct = 224 / 256 if size <= 224 else 1.0
    new_short = int(size / crop_pct)
    short, long = min(height, width), max(height, width)
    new_long = int(new_short * long / short)
    new_h, new_w = (new_long, new_short) if width <= height else (new_short, new_long)
    return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))  # noqa: RUF046


def torchvision_eval(image: np.ndarray, size: int) -> np.ndarray:
    new_h, new_w, top, left = torchvision_eval_geometry(*image.shape[:2], size)
    resized = Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC)
    return np.asarray(resized.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize(
    ("height", "width", "size", "expected"),
    [
        (97, 131, 224, (256, 345, 16, 60)),  # 256 * 131 / 97 = 345.7: truncated, not rounded to 346
        (131, 97, 224, (345, 256, 60, 16)),
        (256, 259, 224, (256, 259, 16, 18)),  # offset 17.5 rounds to 18 (floor division gives 17)
        (259, 256, 224, (259, 256, 18, 16)),
        (97, 131, 448, (448, 605, 0, 78)),  # crop_pct 1 above 224: the shorter side becomes 448, not 512
        (333, 500, 448, (448, 672, 0, 112)),
        (448, 455, 448, (448, 455, 0, 4)),  # offset 3.5 rounds to 4
        (500, 333, 32, (54, 36, 11, 2)),  # int(32 / 0.875) = 36, not round(36.57) = 37
    ],
)
def test_eval_geometry_reference_is_torchvisions_rule(height: int, width: int, size: int, expected: tuple):
    assert torchvision_eval_geometry(height, width, size) == expected


@pytest.mark.parametrize("size", [224, 448, 32])
@pytest.mark.parametrize("shape", [(333, 500), (500, 333), (97, 131), (131, 97), (256, 259), (259, 256), (448, 455)])
def test_eval_transform_is_torchvisions_resize_and_center_crop(shape: tuple[int, int], size: int):
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    np.testing.assert_array_equal(input_pipeline.eval_transform(image, size), torchvision_eval(image, size))


def official_probe_box(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float] = (0.08, 1.0)
) -> tuple[int, int, int, int]:
    """util/crop.RandomResizedCrop.get_params (scale (0.08, 1) by default): one draw, each side clamped."""
    target_area = height * width * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(int(round(math.sqrt(target_area * aspect))), width)  # noqa: RUF046
    h = min(int(round(math.sqrt(target_area / aspect))), height)  # noqa: RUF046
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    return left, top, left + w, top + h


@pytest.mark.parametrize("shape", [(333, 500), (500, 333), (97, 131), (20, 300), (300, 20)])
def test_probe_crop_is_one_clamped_draw(shape: tuple[int, int]):
    height, width = shape
    ours, reference = np.random.default_rng(0), np.random.default_rng(0)
    boxes = [input_pipeline.single_draw_crop_box(ours, height, width) for _ in range(300)]
    assert boxes == [official_probe_box(reference, height, width) for _ in range(300)]
    assert ours.random() == reference.random()  # four draws a box: no retries
    sizes = np.array([(right - left, bottom - top) for left, top, right, bottom in boxes])
    assert (sizes >= 1).all() and (sizes[:, 0] <= width).all() and (sizes[:, 1] <= height).all()


def test_probe_crop_clamps_a_draw_larger_than_the_image_instead_of_retrying():
    rng = np.random.default_rng(1)
    boxes = np.array([input_pipeline.single_draw_crop_box(rng, 20, 300) for _ in range(200)])
    crop_w, crop_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    # 20 x 300: a draw's height sqrt(area / aspect) is 20 only at scale <= 0.09; the rest are clamped to 20,
    # so the crops are full-height strips far wider than 4/3 (torchvision's rule retries, then falls back
    # to the center 27 x 20, never wider than 4/3).
    assert (crop_h == 20).mean() > 0.9
    assert (crop_w / crop_h > 1.5).mean() > 0.8 and (crop_w / crop_h).max() > 4  # up to sqrt(6000 * 4/3) / 20
    tall = np.array([input_pipeline.single_draw_crop_box(rng, 300, 20) for _ in range(200)])
    assert ((tall[:, 2] - tall[:, 0]) == 20).mean() > 0.9  # the width clamps likewise


def test_probe_crop_of_a_tiny_image_is_at_least_one_pixel():
    rng = np.random.default_rng(0)
    for _ in range(50):
        left, top, right, bottom = input_pipeline.single_draw_crop_box(rng, 1, 2)
        assert 0 <= left < right <= 2 and (top, bottom) == (0, 1)


def test_linprobe_transform_resizes_the_box_bicubic_then_flips():
    image = np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8)
    flipped = 0
    for seed in range(12):
        out = input_pipeline.linprobe_transform(image, np.random.default_rng(seed), 64, rand_augment=False)
        rng = np.random.default_rng(seed)
        left, top, right, bottom = official_probe_box(rng, 97, 131)
        expected = np.asarray(Image.fromarray(image[top:bottom, left:right]).resize((64, 64), Image.BICUBIC))
        flip = rng.random() < 0.5
        flipped += flip
        np.testing.assert_array_equal(out, expected[:, ::-1] if flip else expected)
    assert 0 < flipped < 12


@pytest.mark.parametrize("task", ["linprobe", "finetune"])
def test_linear_probing_trains_on_the_single_draw_crop_and_fine_tuning_on_torchvisions(task: str):
    config = with_overrides(configuration.downstream_config(task), {"image_size": 32, "augment.rand_augment": False})
    transform = input_pipeline.classifier_train_transform(config)
    image = np.random.default_rng(0).integers(0, 256, (20, 300, 3), dtype=np.uint8)
    expected = input_pipeline.linprobe_transform if task == "linprobe" else input_pipeline.finetune_transform
    for seed in range(5):
        np.testing.assert_array_equal(
            transform(image, np.random.default_rng(seed)),
            expected(image, np.random.default_rng(seed), 32, rand_augment=False),
        )


def test_linear_probing_crops_the_area_range_of_augment_crop_scale():
    """The official crop's draw with `augment.crop_scale` in place of (0.08, 1): Fashion-MNIST's probe keeps
    at least half of its 28-pixel images."""
    scale = (0.5, 1.0)
    config = with_overrides(
        configuration.downstream_config("linprobe"), {"image_size": 16, "augment.crop_scale": scale}
    )
    transform = input_pipeline.classifier_train_transform(config)
    image = np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    for seed in range(20):
        out = transform(image, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        left, top, right, bottom = official_probe_box(rng, 28, 28, scale)
        assert (right - left) * (bottom - top) >= 0.5 * 28 * 28 * 0.9  # rounding of each side
        crop = Image.fromarray(image[top:bottom, left:right, 0]).resize((16, 16), Image.BICUBIC)
        expected = np.asarray(crop)[:, :, None]
        np.testing.assert_array_equal(out, expected[:, ::-1] if rng.random() < 0.5 else expected)


@pytest.mark.parametrize("task", ["linprobe", "finetune"])
def test_center_crop_trains_on_the_evaluation_view_unflipped(task: str):
    """`augment.crop="center"`: every training view is the evaluation's Resize + CenterCrop of the image."""
    config = with_overrides(
        configuration.downstream_config(task),
        {"image_size": 32, "augment.crop": "center", "augment.rand_augment": False},
    )
    transform = input_pipeline.classifier_train_transform(config)
    image = np.random.default_rng(0).integers(0, 256, (40, 57, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(image).resize((int(36 * 57 / 40), 36), Image.BICUBIC))  # shorter side 36
    top, left = round((36 - 32) / 2), round((resized.shape[1] - 32) / 2)
    expected = resized[top : top + 32, left : left + 32]  # torchvision's Resize(36) + CenterCrop(32)
    for seed in range(8):
        np.testing.assert_array_equal(transform(image, np.random.default_rng(seed)), expected)


def test_fine_tuning_crops_the_area_range_of_augment_crop_scale():
    config = with_overrides(
        configuration.downstream_config("finetune"),
        {"image_size": 16, "augment.crop_scale": (0.6, 0.7), "augment.rand_augment": False},
    )
    transform = input_pipeline.classifier_train_transform(config)
    image = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    for seed in range(10):
        np.testing.assert_array_equal(
            transform(image, np.random.default_rng(seed)),
            input_pipeline.pretrain_transform(image, np.random.default_rng(seed), 16, (0.6, 0.7)),
        )
        left, top, right, bottom = input_pipeline.random_resized_crop_box(
            np.random.default_rng(seed), 200, 200, (0.6, 0.7)
        )
        assert 0.6 * 0.97 <= (right - left) * (bottom - top) / 200**2 <= 0.7 * 1.03
