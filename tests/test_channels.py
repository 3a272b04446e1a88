"""Any number of channels: grayscale and multi-band sources decode, train, checkpoint, resume and visualize.

Decoding is checked against Pillow (convert("L") / convert("RGB"), per-band resizes), the runs go through
`python -m mae_jax.main` and `python -m mae_jax.visualize` on tiny models.
"""

from __future__ import annotations

import io
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mae_jax import configuration, input_pipeline
from mae_jax.configuration import ConfigError
from mae_jax.evaluators import reconstruction
from tests.conftest import REPO, TINY_MAIN_FLAGS, run_main, tiny_train_config, with_overrides

SIZE = 40  # the stored images; the model reads 32 x 32


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def random_image(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------
# Decoding and resizing, against Pillow
# ---------------------------------------------------------------------------------------------------
def test_bytes_decode_to_the_asked_channels_as_pillow_converts_them():
    rgb = random_image(0, (SIZE, 30, 3))
    for mode in ("RGB", "RGBA", "P", "L", "CMYK"):
        pil = Image.fromarray(rgb).convert(mode)
        encoded = png(np.asarray(pil)) if mode != "CMYK" else _jpeg(pil)
        with Image.open(io.BytesIO(encoded)) as reference:
            gray, color = np.asarray(reference.convert("L")), np.asarray(reference.convert("RGB"))
        np.testing.assert_array_equal(input_pipeline.decode(encoded, 1), gray[:, :, None], err_msg=mode)
        np.testing.assert_array_equal(input_pipeline.decode(encoded, 3), color, err_msg=mode)
    rgba = random_image(1, (SIZE, 30, 4))
    np.testing.assert_array_equal(input_pipeline.decode(png(rgba), 4), rgba)  # its own 4 bands
    with pytest.raises(ValueError, match=r"^the image \(mode RGB\) has 3 bands, not num_channels=5$"):
        input_pipeline.decode(png(rgb), 5)


def _jpeg(pil: Image.Image) -> bytes:
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG")
    return buffer.getvalue()


def test_arrays_decode_by_pillows_rules():
    rgb = random_image(2, (SIZE, 30, 3))
    luma = np.asarray(Image.fromarray(rgb).convert("L"))  # ITU-R 601-2 as Pillow computes it
    np.testing.assert_array_equal(input_pipeline.decode(rgb, 1), luma[:, :, None])
    gray = random_image(3, (SIZE, 30))
    np.testing.assert_array_equal(input_pipeline.decode(gray, 1), gray[:, :, None])
    np.testing.assert_array_equal(input_pipeline.decode(gray, 3), np.asarray(Image.fromarray(gray).convert("RGB")))
    bands = random_image(4, (SIZE, 30, 6))
    np.testing.assert_array_equal(input_pipeline.decode(bands, 6), bands)
    np.testing.assert_array_equal(input_pipeline.decode(npy(bands), 6), bands)
    np.testing.assert_array_equal(input_pipeline.decode(npy(rgb), 1), luma[:, :, None])
    floats = bands.astype(np.float32) / 255  # floats in [0, 1] scale to 0..255
    np.testing.assert_array_equal(input_pipeline.decode(npy(floats), 6), bands)
    with pytest.raises(ValueError, match=r"^the array of shape \(40, 30, 6\) has 6 bands, not num_channels=3$"):
        input_pipeline.decode(npy(bands), 3)
    with pytest.raises(ValueError, match=r"^\.npy of dtype int64: give uint8, or floats in \[0, 1\]$"):
        input_pipeline.decode(npy(bands.astype(np.int64)), 6)


def test_resizes_of_any_band_count_are_pillows_band_by_band():
    bands = random_image(5, (37, 53, 4))
    per_band = [Image.fromarray(bands[:, :, c]) for c in range(4)]
    expected = np.stack([np.asarray(band.resize((24, 24), Image.BICUBIC)) for band in per_band], axis=-1)
    np.testing.assert_array_equal(input_pipeline.bicubic_resize(bands, 24), expected)
    gray = bands[:, :, :1]  # torchvision's Resize(36) + CenterCrop(32) on Pillow: 53 x 37 -> 51 x 36, crop at (10, 2)
    resized = Image.fromarray(gray[:, :, 0]).resize((51, 36), Image.BICUBIC)
    eval_expected = np.asarray(resized.crop((10, 2, 42, 34)))[:, :, None]
    np.testing.assert_array_equal(input_pipeline.eval_transform(gray, 32), eval_expected)
    assert input_pipeline.eval_transform(bands, 32).shape == (32, 32, 4)
    # Per-band "L" resizing is what "RGB" resizing does (checked here on Pillow itself)
    rgb = bands[:, :, :3]
    np.testing.assert_array_equal(
        np.asarray(Image.fromarray(rgb).resize((24, 60), Image.BICUBIC)),
        np.stack([np.asarray(Image.fromarray(rgb[:, :, c]).resize((24, 60), Image.BICUBIC)) for c in range(3)], -1),
    )


def test_grid_shows_grayscale_as_gray_and_multi_band_through_chosen_bands():
    stats = input_pipeline.PixelStats(np.array([0.5, 0.4, 0.3, 0.2], np.float32), np.array([0.1] * 4, np.float32))
    panels = np.random.default_rng(6).normal(size=(1, 4, 8, 8, 4)).astype(np.float32)
    shown = reconstruction.grid(panels, pad=0, stats=stats, bands=(3, 0, 1))
    pixels = np.clip(panels[0, 0] * 0.1 + stats.mean, 0, 1)
    np.testing.assert_array_equal(shown[:8, :8], (pixels[:, :, [3, 0, 1]] * 255).round().astype(np.uint8))
    gray_stats = input_pipeline.PixelStats(stats.mean[:1], stats.std[:1])
    gray = reconstruction.grid(panels[..., :1], stats=gray_stats)
    assert gray.shape[-1] == 3 and (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_channels": 0}, r"num_channels=0 must be >= 1"),
        ({"num_channels": 1}, r"dataset.mean has 3 values for num_channels=1: give one per channel"),
        ({"dataset.mean": (0.5, 0.5)}, r"dataset.mean has 2 values for num_channels=3: give one per channel"),
        ({"dataset.std": (0.2, 0.0, 0.2)}, r"dataset.std=\(0.2, 0.0, 0.2\) must be > 0 in every channel"),
        ({"evals.reconstruction.bands": (0, 1)}, r"evals.reconstruction.bands=\(0, 1\) must be 3 bands in"),
        (
            {
                "num_channels": 4,
                "dataset.mean": (0.5,) * 4,
                "dataset.std": (0.2,) * 4,
                "evals.reconstruction.bands": (0, 1, 4),
            },
            r"evals.reconstruction.bands=\(0, 1, 4\) must be 3 bands in \[0, num_channels=4\)",
        ),
    ],
    ids=["no-channels", "mean-count", "mean-count-rgb", "zero-std", "two-bands", "band-outside"],
)
def test_channel_settings_are_checked_in_one_line(overrides: dict, message: str):
    with pytest.raises(ConfigError, match=f"^{message}"):
        configuration.validate(tiny_train_config(**overrides))


def test_rand_augment_needs_one_or_three_channels():
    config = with_overrides(
        configuration.downstream_config("finetune"),
        {"num_channels": 2, "dataset.mean": (0.5, 0.5), "dataset.std": (0.2, 0.2), "dataset.source": "folder"},
    )
    with pytest.raises(ConfigError, match=r"^augment.rand_augment needs num_channels 1 or 3 .*, not 2$"):
        configuration.validate(config)
    configuration.validate(with_overrides(config, {"augment.rand_augment": False}))


def test_grayscale_rand_augment_keeps_one_band():
    image = random_image(7, (32, 32, 1))
    for seed in range(8):  # every op has its turn
        out = input_pipeline.finetune_transform(image, np.random.default_rng(seed), 32, rand_augment=True)
        assert out.shape == (32, 32, 1) and out.dtype == np.uint8


# ---------------------------------------------------------------------------------------------------
# End to end: train, checkpoint, resume, visualize
# ---------------------------------------------------------------------------------------------------
def gray_folder(root: pathlib.Path) -> pathlib.Path:
    for index in range(8):
        folder = root / "train" / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        gradient = np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :] * np.ones((SIZE, 1), np.uint8)
        Image.fromarray(np.roll(gradient, 5 * index, axis=1)).save(folder / f"{index}.png")  # mode "L"
    return root


def band_folder(root: pathlib.Path) -> pathlib.Path:
    for index in range(8):
        folder = root / "train" / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{index}.npy", random_image(index, (SIZE, SIZE, 4)))
    return root


CHANNELS = {  # name -> (channels, folder writer, overrides)
    "grayscale": (1, gray_folder, ("--config.dataset.mean=(0.5,)", "--config.dataset.std=(0.3,)")),
    "four_bands": (
        4,
        band_folder,
        (
            "--config.dataset.mean=(0.5,0.5,0.5,0.5)",
            "--config.dataset.std=(0.29,0.29,0.29,0.29)",
            "--config.evals.reconstruction.bands=(3,1,0)",
            "--config.input.resize_on_device=True",  # the device's resize of 4-band crops
        ),
    ),
}


@pytest.mark.parametrize("name", CHANNELS)
def test_source_trains_checkpoints_resumes_and_visualizes(tmp_path: pathlib.Path, name: str):
    channels, write, overrides = CHANNELS[name]
    data, workdir = write(tmp_path / "data"), tmp_path / "run"
    flags = (
        *TINY_MAIN_FLAGS,
        "--config.dataset.source=folder",
        f"--config.dataset.data_dir={data}",
        f"--config.num_channels={channels}",
        *overrides,
        "--config.total_steps=4",
        "--config.warmup_steps=1",
        "--config.checkpoint_every_steps=2",
        "--config.evals.reconstruction.every_steps=2",
    )
    first = run_main(workdir, *flags)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(path.name for path in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    shutil.rmtree(workdir / "checkpoints" / "4")  # as if the run died after step 2's save
    resumed = run_main(workdir, *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored step 2" in resumed.stderr
    assert sorted(path.name for path in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    trained_grid = np.asarray(Image.open(workdir / "reconstruction.png"))
    assert trained_grid.ndim == 3 and trained_grid.shape[-1] == 3

    image = data / "train" / "class0" / ("0.png" if channels == 1 else "0.npy")
    out = tmp_path / "grid.png"
    command = [sys.executable, "-m", "mae_jax.visualize", f"--params={workdir}", f"--images={image}", f"--out={out}"]
    command += [] if channels == 1 else ["--bands=3,1,0"]
    shown = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert shown.returncode == 0, shown.stderr[-3000:]
    grid = np.asarray(Image.open(out).convert("RGB"))
    original = grid[2:34, 2:34].astype(int)  # the first panel: the image as read, normalized and back
    if channels == 1:  # gray: R == G == B, in training's grid too
        for picture in (grid, trained_grid):
            assert (picture[..., 0] == picture[..., 1]).all() and (picture[..., 1] == picture[..., 2]).all()
        expected = input_pipeline.eval_transform(np.asarray(Image.open(image))[:, :, None], 32)[:, :, [0, 0, 0]]
    else:  # bands 3, 1, 0 as red, green, blue
        expected = input_pipeline.eval_transform(np.load(image), 32)[:, :, [3, 1, 0]]
    assert np.abs(original - expected).max() <= 1
