"""Sources, decoding of odd files, transforms, host sharding, skipping bad images and resumable iteration."""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mae_jax import input_pipeline
from mae_jax.configuration import ConfigError
from mae_jax.input_pipeline import CROP_RATIO, CROP_SCALE
from tests.conftest import tiny_train_config


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def photo(seed: int, size: tuple[int, int] = (60, 45)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def image_folder(tmp_path: pathlib.Path) -> pathlib.Path:
    """train/<class>/ with good JPEGs, odd modes (gray, CMYK, RGBA PNG, palette, tiny) and two corrupt files."""
    root = tmp_path / "train"
    for label, name in enumerate(["n01", "n02", "n03"]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            (root / name / f"{i}.JPEG").write_bytes(encode(photo(10 * label + i)))
    (root / "n01" / "gray.jpg").write_bytes(encode(photo(100).convert("L")))
    (root / "n01" / "cmyk.jpg").write_bytes(encode(photo(101).convert("CMYK")))
    (root / "n02" / "rgba.png").write_bytes(encode(photo(102).convert("RGBA"), "PNG"))
    (root / "n02" / "palette.png").write_bytes(encode(photo(103).convert("P"), "PNG"))
    (root / "n03" / "tiny.png").write_bytes(encode(photo(104, (2, 3)), "PNG"))
    (root / "n03" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "n03" / "truncated.jpg").write_bytes(encode(photo(105))[:60])
    (root / "n03" / "notes.txt").write_text("not an image")
    return tmp_path


def test_random_resized_crop_box_follows_torchvision_rule():
    rng = np.random.default_rng(0)
    for height, width in [(375, 500), (500, 375), (64, 64), (20, 300)]:
        for _ in range(200):
            left, top, right, bottom = input_pipeline.random_resized_crop_box(rng, height, width)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            area = (right - left) * (bottom - top) / (height * width)
            aspect = (right - left) / (bottom - top)
            in_range = CROP_SCALE[0] - 0.02 <= area <= 1 and CROP_RATIO[0] - 0.05 <= aspect <= CROP_RATIO[1] + 0.05
            fallback = (right - left, bottom - top) in {(min(width, round(height * 4 / 3)), height), (width, height)}
            assert in_range or fallback


@pytest.mark.parametrize(
    "image",
    [
        encode(photo(0).convert("L")),
        encode(photo(0).convert("CMYK")),
        encode(photo(0).convert("RGBA"), "PNG"),
        encode(photo(0).convert("P"), "GIF"),
        encode(photo(0, (1, 1)), "PNG"),
        np.zeros((40, 30), np.uint8),
        np.zeros((40, 30, 4), np.uint8),
        np.zeros((40, 30, 3), np.float64),
    ],
    ids=["gray", "cmyk", "rgba", "palette", "1x1", "gray-array", "rgba-array", "float-array"],
)
def test_decode_and_transforms_accept_odd_images(image):
    decoded = input_pipeline.decode(image)
    assert decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.shape[-1] == 3
    out = input_pipeline.pretrain_transform(decoded, np.random.default_rng(0), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert input_pipeline.eval_transform(decoded, 32).shape == (32, 32, 3)


def test_pretrain_transform_flips_sometimes_and_normalize_is_imagenet_mean_std():
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = 255  # left half white
    outputs = [input_pipeline.pretrain_transform(image, np.random.default_rng(seed), 32) for seed in range(20)]
    left_brighter = [out[:, :4].mean() > out[:, -4:].mean() for out in outputs]
    assert any(left_brighter) and not all(left_brighter)
    normalized = np.asarray(input_pipeline.normalize(np.array([[[0, 255, 128]]], np.uint8)))
    expected = (np.array([0, 1, 128 / 255]) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(normalized[0, 0], expected, rtol=1e-6)


def smooth_photo(seed: int, height: int, width: int) -> np.ndarray:
    """Photo-like pixels (noise would overstate rounding differences, which the bicubic's overshoot clips)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    return np.clip(np.asarray(coarse, np.int16) + rng.integers(-12, 13, (height, width, 3)), 0, 255).astype(np.uint8)


# (height, width) of crops: shrinking and enlarging each way, the vertical-first order, 1 pixel, the canvas
CROP_SHAPES = [(301, 120), (240, 182), (182, 240), (400, 400), (448, 300), (224, 300), (100, 60), (1, 1), (57, 448)]


def test_device_resize_equals_pillows_bicubic_of_the_crop():
    size, canvas = 224, 448
    canvases, crops, expected = [], [], []
    for seed, (height, width) in enumerate(CROP_SHAPES):
        crop, flip = smooth_photo(seed, height, width), seed % 2
        reference = np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))
        expected.append(reference[:, ::-1] if flip else reference)
        canvases.append(np.zeros((canvas, canvas, 3), np.uint8))
        canvases[-1][:height, :width] = crop
        crops.append((height, width, flip))
    out = jax.jit(input_pipeline.resize_crops, static_argnums=2)(np.stack(canvases), np.array(crops), size)
    difference = np.abs(np.asarray(out, np.int16) - np.stack(expected))
    assert out.dtype == np.uint8 and difference.max() <= 1 and difference.mean() < 1e-3, difference.mean()


@pytest.mark.parametrize("canvas", [64, 128], ids=["crops-larger-than-canvas", "crops-on-canvas"])
def test_crop_on_canvas_then_device_resize_is_the_host_transform(canvas: int):
    image = smooth_photo(0, 90, 120)
    canvases, crops, expected = [], [], []
    for seed in range(12):
        fields = input_pipeline.crop_to_canvas(image, np.random.default_rng(seed), 32, canvas)
        canvases.append(fields["image"])
        crops.append(fields["crop"])
        expected.append(input_pipeline.pretrain_transform(image, np.random.default_rng(seed), 32))
    assert any(crop[2] for crop in crops) and not all(crop[2] for crop in crops)  # same flips, both ways
    out = np.asarray(input_pipeline.resize_crops(np.stack(canvases), np.stack(crops), 32), np.int16)
    assert np.abs(out - np.stack(expected)).max() <= 1


def test_pretrain_transform_crops_before_resizing():
    """As torchvision's RandomResizedCrop: pixels beyond the crop box do not bleed in through the filter."""
    image = smooth_photo(1, 90, 120)
    left, top, right, bottom = input_pipeline.random_resized_crop_box(np.random.default_rng(3), 90, 120)
    outside = np.full_like(image, 255)
    outside[top:bottom, left:right] = image[top:bottom, left:right]
    np.testing.assert_array_equal(
        input_pipeline.pretrain_transform(image, np.random.default_rng(3), 32),
        input_pipeline.pretrain_transform(outside, np.random.default_rng(3), 32),
    )


def test_image_folder_labels_skips_corrupt_files_and_names_them_once(image_folder, caplog):
    config = tiny_train_config(**{"dataset.source": "folder", "dataset.data_dir": str(image_folder), "batch_size": 4})
    source = input_pipeline.make_source(config.dataset)
    assert len(source) == 19 and source.classes == ["n01", "n02", "n03"]  # notes.txt is not an image
    assert sorted({source[i]["label"] for i in range(len(source))}) == [0, 1, 2]
    skipped = input_pipeline.SkippedImages()
    iterator = iter(input_pipeline.train_dataset(source, config, skipped))
    with caplog.at_level(logging.WARNING):
        batches = [next(iterator) for _ in range(17 * 3 // 4)]  # three passes over the 17 readable images
    labels = np.concatenate([b["label"] for b in batches])
    assert all(b["image"].shape == (4, 64, 64, 3) and b["image"].dtype == np.uint8 for b in batches)  # canvases
    assert all(b["crop"].shape == (4, 3) and (b["crop"][:, :2] >= 1).all() for b in batches)
    assert set(labels) == {0, 1, 2}
    assert skipped.count >= 4  # each of the two bad files, in at least two passes
    named = [r.getMessage() for r in caplog.records if "Skipping unreadable image" in r.getMessage()]
    assert len(named) == 2 and any("corrupt.jpg" in m for m in named) and any("truncated.jpg" in m for m in named)


def test_missing_or_empty_sources_fail_at_start(tmp_path: pathlib.Path):
    folder = tiny_train_config(**{"dataset.source": "folder", "dataset.data_dir": str(tmp_path)})
    with pytest.raises(input_pipeline.DatasetNotFoundError, match="does not exist"):
        input_pipeline.make_source(folder.dataset)
    (tmp_path / "train" / "n01").mkdir(parents=True)
    with pytest.raises(input_pipeline.DatasetNotFoundError, match="holds no images"):
        input_pipeline.make_source(folder.dataset)
    tfds_config = tiny_train_config(**{"dataset.source": "tfds", "dataset.data_dir": str(tmp_path)})
    with pytest.raises(input_pipeline.DatasetNotFoundError, match="tfds build imagenet2012"):
        input_pipeline.make_source(tfds_config.dataset)


class Numbered(list):
    """A source whose label is the record's index, to see which records a host reads."""

    def __init__(self, size: int):
        super().__init__({"image": np.full((8, 8, 3), i, np.uint8), "label": i, "name": str(i)} for i in range(size))


def test_hosts_read_disjoint_shards_that_cover_the_data():
    config = tiny_train_config(batch_size=8)  # 4 per host
    seen = []
    for process_index in range(2):
        dataset = input_pipeline.train_dataset(
            Numbered(24), config, input_pipeline.SkippedImages(), process_index=process_index, process_count=2
        )
        iterator = iter(dataset)
        seen.append(np.concatenate([next(iterator)["label"] for _ in range(3)]))  # one epoch of 12 records
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(24))


def test_device_prefetch_gives_the_global_batches_in_order_resized_on_the_device():
    config = tiny_train_config(batch_size=4)
    source = input_pipeline.DemoPhotos()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    dataset = input_pipeline.train_dataset(source, config, input_pipeline.SkippedImages())
    prefetched = input_pipeline.device_prefetch(iter(dataset), sharding, keys=("image", "label"), image_size=32)
    for batch, expected in zip([next(prefetched) for _ in range(3)], iter(dataset), strict=False):
        assert batch["image"].shape == (4, 32, 32, 3)  # the crops were resized on the device
        np.testing.assert_array_equal(np.asarray(input_pipeline.resize_crops(expected["image"], expected["crop"], 32)),
                                      np.asarray(batch["image"]))  # fmt: skip
        np.testing.assert_array_equal(expected["label"], np.asarray(batch["label"]))


def test_tfds_imagenet_through_the_pipeline():
    config = tiny_train_config(**{"dataset.source": "tfds", "dataset.name": "imagenet2012"})
    with tfds.testing.mock_data(num_examples=20):
        source = input_pipeline.make_source(config.dataset)
        batch = next(iter(input_pipeline.train_dataset(source, config, input_pipeline.SkippedImages())))
    assert len(source) == 20 and batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (8,) and (batch["label"] >= 0).all()
    assert source[0]["name"].startswith("imagenet2012/train:")


def write_idx(path: pathlib.Path, array: np.ndarray) -> None:
    """A gzipped uint8 IDX file: 0 0 0x08 ndim, big-endian uint32 sizes, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_fashion_mnist(
    root: pathlib.Path, num_train: int, num_test: int, num_classes: int = 4
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST's four files, named as Debian installs them; a class is a random pattern plus noise."""
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 200, (num_classes, 28, 28))
    written = {}
    for split, prefix, size in (("train", "train", num_train), ("test", "t10k", num_test)):
        labels = (np.arange(size) % num_classes).astype(np.uint8)
        images = (patterns[labels] + rng.integers(0, 50, (size, 28, 28))).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        written[split] = images, labels
    return written


def test_fashion_mnist_reads_the_idx_files(tmp_path: pathlib.Path):
    written = write_fashion_mnist(tmp_path, num_train=5, num_test=3)
    for split, (images, labels) in written.items():
        dataset = tiny_train_config(
            **{"dataset.source": "fashion_mnist", "dataset.data_dir": str(tmp_path), "dataset.split": split}
        ).dataset
        source = input_pipeline.make_source(dataset)
        assert len(source) == len(labels)
        for i in range(len(source)):
            record = source[i]
            assert record["image"].dtype == np.uint8 and record["image"].shape == (28, 28)
            np.testing.assert_array_equal(record["image"], images[i])
            assert record["label"] == labels[i] and record["name"] == f"fashion_mnist/{split}:{i}"
    assert input_pipeline.eval_transform(input_pipeline.decode(source[0]["image"]), 32).shape == (32, 32, 3)


def test_fashion_mnist_missing_or_damaged_files_fail_in_one_line(tmp_path: pathlib.Path, monkeypatch):
    monkeypatch.setattr(input_pipeline, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    dataset = tiny_train_config(**{"dataset.source": "fashion_mnist"}).dataset  # data_dir None: Debian's folder
    with pytest.raises(input_pipeline.DatasetNotFoundError) as error:
        input_pipeline.make_source(dataset)
    message = str(error.value)
    assert "\n" not in message and f"not in {tmp_path / 'absent'}" in message
    assert "`apt-get install dataset-fashion-mnist`" in message and "dataset.data_dir" in message
    write_fashion_mnist(tmp_path, num_train=5, num_test=3)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x03 cut short"))
    dataset.update({"data_dir": str(tmp_path), "split": "test"})
    with pytest.raises(input_pipeline.DatasetNotFoundError, match=r"cannot read .*t10k-images-idx3-ubyte\.gz"):
        input_pipeline.make_source(dataset)


def source_data(name: str, root: pathlib.Path) -> tuple[dict, contextlib.AbstractContextManager, int]:
    """Data for `dataset.source=name` under `root`: the dataset keys that find it, the context it opens in, its
    size. A source added to input_pipeline.SOURCES fails the test below until it gets data here."""
    if name == "folder":
        (root / "train" / "n01").mkdir(parents=True)
        for i in range(2):
            (root / "train" / "n01" / f"{i}.JPEG").write_bytes(encode(photo(i)))
        return {"dataset.data_dir": str(root)}, contextlib.nullcontext(), 2
    if name == "fashion_mnist":
        write_fashion_mnist(root, num_train=3, num_test=2)
        return {"dataset.data_dir": str(root)}, contextlib.nullcontext(), 3
    if name == "tfds":
        return {"dataset.name": "imagenet2012"}, tfds.testing.mock_data(num_examples=4), 4
    assert name == "demo", f"no test data for dataset.source={name!r}"
    return {}, contextlib.nullcontext(), len(input_pipeline.DEMO_PHOTOS)


@pytest.mark.parametrize("name", list(input_pipeline.SOURCES))
def test_every_source_in_the_table_opens(name: str, tmp_path: pathlib.Path):
    overrides, context, size = source_data(name, tmp_path)
    with context:
        source = input_pipeline.make_source(tiny_train_config(**{"dataset.source": name, **overrides}).dataset)
        record = source[size - 1]
    assert len(source) == size and isinstance(record["label"], int) and isinstance(record["name"], str)
    image = input_pipeline.decode(record["image"])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3


def test_unknown_source_is_one_line_error_naming_the_valid_ones():
    dataset = tiny_train_config(**{"dataset.source": "s3"}).dataset
    with pytest.raises(ConfigError) as error:
        input_pipeline.make_source(dataset)
    assert str(error.value) == "dataset.source='s3' must be 'tfds', 'folder', 'fashion_mnist' or 'demo'"


def test_eval_batches_cover_the_examples_once_in_equal_batch_counts():
    source, seen, batch_counts = Numbered(19), [], []
    for process_index in range(2):  # hosts of 3 rows each; host 0 reads 10 of the 19, host 1 9
        batches = list(input_pipeline.eval_batches(source, 8, 6, process_index=process_index, process_count=2))
        batch_counts.append(len(batches))
        for batch in batches:
            assert batch["image"].shape == (3, 8, 8, 3) and batch["image"].dtype == np.uint8
            assert batch["label"].dtype == np.int32 and batch["valid"].dtype == bool
            valid = batch["valid"]
            np.testing.assert_array_equal(batch["image"][valid][:, 4, 4, 0], batch["label"][valid])  # its own image
            assert (batch["label"][~valid] == input_pipeline.NO_LABEL).all() and not batch["image"][~valid].any()
        labels = np.concatenate([batch["label"][batch["valid"]] for batch in batches])
        np.testing.assert_array_equal(labels, np.arange(process_index, 19, 2))  # strided, in order
        seen.append(labels)
    assert batch_counts == [4, 4]  # host 1's last batch is all padding
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(19))
    assert sum(len(batch["label"]) for batch in input_pipeline.eval_batches(Numbered(30), 8, 8)) == 32  # padded


def test_eval_batches_mark_unreadable_images_invalid_and_name_them_once(caplog):
    source = [{"image": encode(photo(i)), "label": i, "name": f"{i}.jpg"} for i in range(5)]
    source[2] = {"image": b"\xff\xd8\xff\xe0 not really a jpeg", "label": 2, "name": "corrupt.jpg"}
    skipped = input_pipeline.SkippedImages()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # as the kNN monitor reads its splits at every evaluation
            (batch,) = input_pipeline.eval_batches(source, 32, 8, process_index=0, process_count=1, skipped=skipped)
    assert batch["valid"].tolist() == [True, True, False, True, True, False, False, False]
    assert batch["label"][:5].tolist() == [0, 1, input_pipeline.NO_LABEL, 3, 4]
    named = [r.getMessage() for r in caplog.records if "Skipping unreadable image" in r.getMessage()]
    assert skipped.count == 2 and len(named) == 1 and "corrupt.jpg" in named[0]
