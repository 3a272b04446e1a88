"""Input pipeline: source -> this host's shard -> shuffle -> decode + augment -> drop bad images -> batch.

Sources are random-access sequences of records `{"image": encoded bytes or uint8 array, "label": int,
"name": str}`: a TFDS dataset (`tfds.data_source`, ArrayRecord), an image folder in the ImageNet layout,
Fashion-MNIST's IDX files (a small labeled set for the kNN monitor), or the photographs that scikit-image
ships (the demo). grain reads them with threads (and optionally worker processes); element `i` of the
shuffled stream and its augmentation depend only on the seed and `i`, and the iterator's state is saved
with each checkpoint, so a resumed run reads the batches an uninterrupted one would. Images leave the
host as uint8; mean/std normalization runs on the accelerator, and so, with `input.resize_on_device`, does
the pretraining crop's bicubic resize, which on the host cost as much as decoding the JPEG.
"""

from __future__ import annotations

import collections
import functools
import gzip
import io
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from mae_jax import augment

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CROP_SCALE = (0.2, 1.0)  # pretraining; fine-tuning and linear probing use torchvision's default (0.08, 1)
FINETUNE_CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
EVAL_RESIZE_RATIO = 256 / 224
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
NO_LABEL = -1
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist package puts it
FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k"}  # split -> file name prefix
# decoded uint8 image -> augmented one, or the fields of a training example ({"image": ..., "crop": ...})
Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray | dict[str, np.ndarray]]
BICUBIC_A = -0.5  # the cubic convolution kernel's parameter in Pillow (and torchvision's PIL path)
PILLOW_ONE = 1 << 22  # Pillow's fixed-point resampling weights for 8-bit images: 22 fractional bits

# scikit-image sample photographs that ship inside the package (no download), used by the demo.
DEMO_PHOTOS = (
    "astronaut", "camera", "cat", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "brick", "grass", "gravel", "moon", "page", "text", "clock", "coins", "colorwheel",
)  # fmt: skip


class DatasetNotFoundError(RuntimeError):
    """The configured data is missing or empty; the message says how to prepare it."""


# ---------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------
class DemoPhotos(Sequence):
    """scikit-image's bundled sample photographs (unlabeled)."""

    def __init__(self):
        from skimage import data  # only the demo needs scikit-image

        self._images = [getattr(data, name)() for name in DEMO_PHOTOS]

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self._images[index], "label": NO_LABEL, "name": DEMO_PHOTOS[index]}


class ImageFolder(Sequence):
    """`root/<class>/<image>`, the layout the official PyTorch code reads; labels are sorted class indices."""

    def __init__(self, root: str | epath.Path):
        root = epath.Path(root)
        if not root.is_dir():
            raise DatasetNotFoundError(f"image folder {root} does not exist (expected {root}/<class>/<image>)")
        classes = sorted(path.name for path in root.iterdir() if path.is_dir())
        self.classes = classes
        self._files = [
            (path, label)
            for label, name in enumerate(classes)
            for path in sorted((root / name).iterdir())
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self._files:
            raise DatasetNotFoundError(f"image folder {root} holds no images in <class>/<image> subfolders")

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self._files[index]
        return {"image": path.read_bytes(), "label": label, "name": str(path)}


class TfdsSource(Sequence):
    """A TFDS dataset prepared as ArrayRecord, read without TensorFlow; images stay encoded until `decode`."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds  # heavy; the demo does not need it

        try:
            self._source = tfds.data_source(
                name, split=split, data_dir=data_dir, download=False, decoders={"image": tfds.decode.SkipDecoding()}
            )
        except Exception as error:  # tfds raises several types for "not prepared"
            where = data_dir or "~/tensorflow_datasets"
            raise DatasetNotFoundError(
                f"tfds dataset {name!r} (split {split!r}) is not prepared in data_dir={where} "
                f"({type(error).__name__}); prepare it once with `tfds build {name} --file_format=array_record"
                f"{' --data_dir=' + data_dir if data_dir else ''}` (imagenet2012: put ILSVRC2012_img_{{train,val}}.tar"
                " in <data_dir>/downloads/manual first)"
            ) from error
        self._prefix = f"{name}/{split}"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        name = record.get("file_name", index)
        return {
            "image": record["image"],
            "label": int(record.get("label", NO_LABEL)),
            "name": f"{self._prefix}:{name.decode() if isinstance(name, bytes) else name}",
        }


def read_idx(path: epath.Path) -> np.ndarray:
    """A gzipped uint8 IDX file (the MNIST format): bytes 0 0 0x08 ndim, big-endian uint32 sizes, the data."""
    try:
        data = gzip.decompress(path.read_bytes())
        if data[:3] != b"\0\0\x08":
            raise ValueError("not a uint8 IDX file")
        shape = tuple(np.frombuffer(data, ">u4", count=data[3], offset=4))
        return np.frombuffer(data, np.uint8, count=math.prod(shape), offset=4 + 4 * data[3]).reshape(shape)
    except (OSError, EOFError, ValueError) as error:  # gzip and numpy's errors for damaged or short files
        raise DatasetNotFoundError(f"cannot read {path} ({type(error).__name__}: {error})") from error


class FashionMnist(Sequence):
    """Fashion-MNIST (28x28 grayscale, 10 classes) from its IDX files: a small labeled set that installs offline."""

    def __init__(self, root: str | epath.Path, split: str):
        if split not in FASHION_MNIST_SPLITS:
            raise DatasetNotFoundError(f"fashion_mnist has splits {sorted(FASHION_MNIST_SPLITS)}, not {split!r}")
        root = epath.Path(root)
        prefix = root / FASHION_MNIST_SPLITS[split]
        images, labels = epath.Path(f"{prefix}-images-idx3-ubyte.gz"), epath.Path(f"{prefix}-labels-idx1-ubyte.gz")
        if not (images.is_file() and labels.is_file()):
            raise DatasetNotFoundError(
                f"fashion_mnist: {images.name} and {labels.name} are not in {root}; "
                f"`apt-get install dataset-fashion-mnist` puts them in {FASHION_MNIST_DIR}, or set dataset.data_dir"
            )
        self._images, self._labels = read_idx(images), read_idx(labels)
        if self._images.ndim != 3 or self._labels.shape != self._images.shape[:1]:
            raise DatasetNotFoundError(f"{images} {self._images.shape} and {labels} {self._labels.shape} do not match")
        self._prefix = f"fashion_mnist/{split}"

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self._images[index], "label": int(self._labels[index]), "name": f"{self._prefix}:{index}"}


def first(source: Sequence, count: int) -> Sequence:
    """The first `count` records of a source (few-label training); all of them if it holds fewer."""
    return grain.MapDataset.source(source)[:count]


def make_source(dataset: ml_collections.ConfigDict) -> Sequence:
    """The source named by `config.dataset`; a missing or empty one is a DatasetNotFoundError here, at start."""
    if dataset.source == "demo":
        source = DemoPhotos()
    elif dataset.source == "tfds":
        source = TfdsSource(dataset.name, dataset.split, dataset.data_dir)
    elif dataset.source == "folder":
        if not dataset.data_dir:
            raise DatasetNotFoundError("dataset.source='folder' needs dataset.data_dir (the folder holding <split>/)")
        source = ImageFolder(epath.Path(dataset.data_dir) / dataset.split)
    elif dataset.source == "fashion_mnist":
        source = FashionMnist(dataset.data_dir or FASHION_MNIST_DIR, dataset.split)
    else:
        raise ValueError(f"unknown dataset.source {dataset.source!r}")
    if len(source) == 0:
        raise DatasetNotFoundError(f"dataset {dataset.source}:{dataset.name} split {dataset.split!r} is empty")
    return source


# ---------------------------------------------------------------------------------------------------
# Decoding and transforms (uint8 in, uint8 out)
# ---------------------------------------------------------------------------------------------------
def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 from grayscale, RGBA or float arrays."""
    if image.dtype != np.uint8:
        image = np.clip(image * (255 if image.max() <= 1 else 1), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[:, :, :3])


def decode(image: bytes | np.ndarray) -> np.ndarray:
    """Encoded bytes (any PIL format and mode: grayscale, palette, CMYK, RGBA...) or an array -> uint8 RGB."""
    if isinstance(image, np.ndarray):
        return to_rgb(image)
    with Image.open(io.BytesIO(image)) as pil:
        return np.asarray(pil.convert("RGB"))


def random_resized_crop_box(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float] = CROP_SCALE
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) chosen as torchvision's RandomResizedCrop does (10 tries, then center)."""
    area = height * width
    log_ratio = np.log(CROP_RATIO)
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return left, top, left + crop_w, top + crop_h
    crop_w, crop_h = width, height
    if width / height < CROP_RATIO[0]:
        crop_h = round(width / CROP_RATIO[0])
    elif width / height > CROP_RATIO[1]:
        crop_w = round(height * CROP_RATIO[1])
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return left, top, left + crop_w, top + crop_h


def bicubic_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Pillow's antialiased bicubic resize to size x size, as torchvision's PIL path."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def pretrain_transform(
    image: np.ndarray, rng: np.random.Generator, size: int, scale: tuple[float, float] = CROP_SCALE
) -> np.ndarray:
    """RandomResizedCrop(size, scale 0.2-1, ratio 3/4-4/3, bicubic) + horizontal flip, as the paper.

    Crop, then resize, as torchvision does: pixels beyond the crop stay out of the filter's reach.
    """
    left, top, right, bottom = random_resized_crop_box(rng, *image.shape[:2], scale)
    crop = bicubic_resize(image[top:bottom, left:right], size)
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def crop_to_canvas(
    image: np.ndarray, rng: np.random.Generator, size: int, canvas: int, scale: tuple[float, float] = CROP_SCALE
) -> dict[str, np.ndarray]:
    """The host's half of the pretraining transform when the resize runs on the device (`resize_crops`).

    Draws the same crop and flip as `pretrain_transform` and ships the crop unresized, top-left on a
    `canvas` x `canvas` zero image, with its (height, width, flip). A crop larger than the canvas is resized
    here, as `pretrain_transform` would, and travels as a `size` x `size` crop, which the device's resize
    passes through unchanged; so every pixel comes from a single bicubic resampling either way.
    """
    left, top, right, bottom = random_resized_crop_box(rng, *image.shape[:2], scale)
    flip = rng.random() < 0.5
    crop = image[top:bottom, left:right]
    if crop.shape[0] > canvas or crop.shape[1] > canvas:
        crop = bicubic_resize(crop, size)
    out = np.zeros((canvas, canvas, 3), np.uint8)
    out[: crop.shape[0], : crop.shape[1]] = crop
    return {"image": out, "crop": np.array([crop.shape[0], crop.shape[1], flip], np.int32)}


def _bicubic_weights(in_size: jax.Array, out_size: int, canvas: int) -> jax.Array:
    """(out_size, canvas) weights of Pillow's antialiased bicubic resize of in_size pixels to out_size.

    Pillow's rule: output pixel o is centred at input coordinate (o + 0.5) * scale; when shrinking, the
    kernel is stretched by the scale (the antialiasing); weights are normalized over the pixels that exist,
    then rounded to Pillow's fixed point.
    """
    scale = in_size / out_size
    stretch = jnp.maximum(scale, 1.0)
    pixel = jnp.arange(canvas)
    x = jnp.abs(pixel + 0.5 - (jnp.arange(out_size)[:, None] + 0.5) * scale) / stretch
    near = ((BICUBIC_A + 2) * x - (BICUBIC_A + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * BICUBIC_A
    weights = jnp.where(x < 1, near, jnp.where(x < 2, far, 0.0)) * (pixel < in_size)
    weights = weights / weights.sum(axis=1, keepdims=True)
    return jnp.trunc(weights * PILLOW_ONE + jnp.sign(weights) * 0.5) / PILLOW_ONE


def _to_uint8_levels(pixels: jax.Array) -> jax.Array:
    """Round half up and clip, as Pillow stores each pass's result in 8 bits."""
    return jnp.clip(jnp.floor(pixels + 0.5), 0, 255)


def resize_crops(canvases: jax.Array, crops: jax.Array, size: int) -> jax.Array:
    """The device's half of the pretraining transform: each crop on its canvas -> (size, size) uint8, flipped
    where asked. Pillow's bicubic resize of the crop, as torchvision's RandomResizedCrop runs it: two passes,
    each rounded to 8 bits, here two matmuls per image. Pillow 13 runs the vertical pass first when the crop
    shrinks vertically and 2 * width < height + size (found by comparing outputs), so the same order is
    kept: the rounding between passes makes it visible."""

    def resize(canvas: jax.Array, crop: jax.Array) -> jax.Array:
        height, width, flip = crop[0], crop[1], crop[2]
        rows = _bicubic_weights(height, size, canvas.shape[0])
        cols = _bicubic_weights(width, size, canvas.shape[1])
        cols = jnp.where(flip == 1, cols[::-1], cols)
        vertical_first = (height > size) & (2 * width < height + size)
        # Resize axis 1 of `pixels`, then axis 0; the vertical-first order runs on the transposed canvas.
        pixels = jnp.where(vertical_first, canvas.transpose(1, 0, 2), canvas).astype(jnp.float32)
        first, second = jnp.where(vertical_first, rows, cols), jnp.where(vertical_first, cols, rows)
        exact = jax.lax.Precision.HIGHEST
        pixels = _to_uint8_levels(jnp.einsum("yxc,px->ypc", pixels, first, precision=exact))
        pixels = _to_uint8_levels(jnp.einsum("oy,ypc->opc", second, pixels, precision=exact))
        return jnp.where(vertical_first, pixels.transpose(1, 0, 2), pixels).astype(jnp.uint8)

    return jax.vmap(resize)(canvases, crops)


def finetune_transform(image: np.ndarray, rng: np.random.Generator, size: int, rand_augment: bool) -> np.ndarray:
    """The official fine-tuning (timm, with `rand_augment`: rand-m9-mstd0.5-inc1) and linear-probing training
    transform: RandomResizedCrop(size, scale 0.08-1, bicubic) + flip; random erasing runs on the device."""
    image = pretrain_transform(image, rng, size, FINETUNE_CROP_SCALE)
    return augment.rand_augment(np.ascontiguousarray(image), rng) if rand_augment else image


def eval_transform(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to size * 256/224, then center crop `size` (the official evaluation)."""
    pil = Image.fromarray(image)
    scale = round(size * EVAL_RESIZE_RATIO) / min(pil.size)
    pil = pil.resize((max(size, round(pil.width * scale)), max(size, round(pil.height * scale))), Image.BICUBIC)
    left, top = (pil.width - size) // 2, (pil.height - size) // 2
    return np.asarray(pil.crop((left, top, left + size, top + size)))


def normalize(images: jax.Array | np.ndarray) -> jax.Array:
    """uint8 images -> ImageNet mean/std normalized float32; runs on the accelerator inside the jitted step."""
    return (jnp.asarray(images, jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def denormalize(images: np.ndarray) -> np.ndarray:
    """Normalized images back to [0, 1] for display."""
    return np.clip(images * IMAGENET_STD + IMAGENET_MEAN, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------
class SkippedImages:
    """Drops records that could not be decoded; counts them and names each file once in the log."""

    def __init__(self):
        self.count = 0
        self._named: set[str] = set()

    def __call__(self, example: dict[str, Any]) -> bool:
        if "error" not in example:
            return True
        self.count += 1
        if example["name"] not in self._named:
            self._named.add(example["name"])
            logging.warning("Skipping unreadable image %s: %s", example["name"], example["error"])
        return False


def _train_example(record: dict[str, Any], rng: np.random.Generator, transform: Transform) -> dict[str, Any]:
    try:
        fields = transform(decode(record["image"]), rng)
    except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for corrupt or truncated files
        return {"name": record["name"], "error": f"{type(error).__name__}: {error}"}
    return {**(fields if isinstance(fields, dict) else {"image": fields}), "label": np.int32(record["label"])}


def pretrain_host_transform(config: ml_collections.ConfigDict) -> Transform:
    """What the hosts run for pretraining: all of it, or, with `input.resize_on_device`, all but the resize
    (crops travel on a canvas of twice the image size; `device_prefetch` finishes them)."""
    if config.input.resize_on_device:
        return functools.partial(crop_to_canvas, size=config.image_size, canvas=2 * config.image_size)
    return functools.partial(pretrain_transform, size=config.image_size)


def train_dataset(
    source: Sequence,
    config: ml_collections.ConfigDict,
    skipped: SkippedImages,
    *,
    transform: Transform | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """This host's infinite stream of {"image": uint8 (B/hosts, S, S, 3), "label": int32 (B/hosts,)} batches.

    `transform(image, rng)` augments a decoded image; by default the pretraining transform at `image_size`,
    whose batches with `input.resize_on_device` hold canvases and their "crop" fields instead.
    """
    transform = transform or pretrain_host_transform(config)
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    dataset = (
        grain.MapDataset.source(source)
        .slice(slice(index, None, count))  # disjoint shards that together cover the source
        .shuffle(seed=config.seed)
        .repeat()
        .random_map(functools.partial(_train_example, transform=transform), seed=config.seed)
        .to_iter_dataset(
            grain.ReadOptions(num_threads=config.input.num_threads, prefetch_buffer_size=config.input.prefetch)
        )
    )
    if config.input.num_workers > 0:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.input.num_workers))
    return dataset.filter(skipped).batch(config.batch_size // count, drop_remainder=True)


def device_prefetch(
    iterator: grain.DatasetIterator,
    sharding: jax.sharding.Sharding,
    keys: tuple[str, ...] = ("image",),
    size: int = 2,
    image_size: int | None = None,
) -> Iterator[tuple[dict[str, jax.Array], dict]]:
    """({key: global batch array}, iterator state after it), `size` batches ahead of the step that uses them.

    The state travels with its batch because the iterator itself is ahead: saving it at step k must
    record the position right after batch k. Batches of `crop_to_canvas` are resized to `image_size` here,
    dispatched ahead like the transfer.
    """
    finish = jax.jit(resize_crops, static_argnums=2, out_shardings=sharding)
    queue: collections.deque = collections.deque()
    while True:
        batch = next(iterator)
        arrays = {key: jax.make_array_from_process_local_data(sharding, batch[key]) for key in keys}
        if "crop" in batch:
            crops = jax.make_array_from_process_local_data(sharding, batch["crop"])
            arrays["image"] = finish(arrays["image"], crops, image_size)
        queue.append((arrays, iterator.get_state()))
        if len(queue) == size:
            yield queue.popleft()


def fixed_eval_images(source: Sequence, count: int, size: int) -> np.ndarray:
    """The first readable `count` images of the source, center-cropped: the same samples at every visualization."""
    images = []
    for index in range(len(source)):
        try:
            images.append(eval_transform(decode(source[index]["image"]), size))
        except (OSError, ValueError, SyntaxError):
            continue
        if len(images) == count:
            break
    return np.stack(images)


def _eval_example(index: int, source: Sequence, size: int, total: int) -> dict[str, Any]:
    padding = {"image": np.zeros((size, size, 3), np.uint8), "label": np.int32(NO_LABEL), "valid": False}
    if index >= total:  # evens out the hosts' batch counts
        return padding
    record = source[index]
    try:
        image = eval_transform(decode(record["image"]), size)
    except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for corrupt or truncated files
        return padding | {"name": record["name"], "error": f"{type(error).__name__}: {error}"}
    return {"image": image, "label": np.int32(record["label"]), "valid": True}


def _report_unreadable(example: dict[str, Any], skipped: SkippedImages) -> dict[str, Any]:
    skipped(example)  # runs in the consuming thread: counts and names each unreadable image (already padding)
    return {key: example[key] for key in ("image", "label", "valid")}


def eval_batches(
    source: Sequence,
    image_size: int,
    batch_size: int,
    *,
    limit: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 16,
    skipped: SkippedImages | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This host's part of the first `limit` examples, each once, in order, center-cropped (`eval_transform`).

    Batches are {"image": uint8 (b, S, S, 3), "label": int32 (b,), "valid": bool (b,)} with b = batch_size /
    hosts. Host h reads examples h, h + hosts, ...; rows past the end and unreadable images are padding
    (valid False), so every host yields the same number of batches, as a jitted multi-host evaluation needs.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    per_host = batch_size // count
    if per_host < 1 or batch_size % count:
        raise ValueError(f"eval batch size {batch_size} is not a positive multiple of the {count} hosts")
    total = len(source) if limit is None else min(limit, len(source))
    num_batches = math.ceil(math.ceil(total / count) / per_host)  # host 0's, which has the most examples
    skipped = SkippedImages() if skipped is None else skipped
    dataset = (
        grain.MapDataset.range(index, index + num_batches * per_host * count, count)
        .map(functools.partial(_eval_example, source=source, size=image_size, total=total))
        .to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * per_host))
        .map(functools.partial(_report_unreadable, skipped=skipped))
        .batch(per_host)
    )
    return iter(dataset)
