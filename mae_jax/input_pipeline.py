"""Input pipeline: source -> global stream (shuffle, decode + augment, replace bad images) -> host's rows -> batch.

Sources are random-access sequences of records `{"image": encoded bytes or uint8 array, "label": int,
"name": str}`: a TFDS dataset (`tfds.data_source`, ArrayRecord), an image folder in the ImageNet layout,
Fashion-MNIST's IDX files (a small labeled set for the kNN monitor), or the photographs that scikit-image
ships (the demo). grain reads them with threads (and optionally worker processes); element `i` of the
global training stream and its augmentation depend only on the seed and `i`, never on the number of
hosts, which read disjoint rows of each global batch. Step k trains on positions [k * B, (k + 1) * B), so
a run resumed at any step, on any number of hosts, reads the batches an uninterrupted one would. Images
leave the host as uint8; mean/std normalization runs on the accelerator, and so, with
`input.resize_on_device`, does the pretraining crop's bicubic resize, which on the host cost as much as
decoding the JPEG.
"""

from __future__ import annotations

import collections
import functools
import gzip
import importlib.util
import io
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from grain.experimental import index_shuffle
from PIL import Image

from mae_jax import augment
from mae_jax.configuration import ConfigError
from mae_jax.models.classifier import LINPROBE

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CROP_SCALE = (0.2, 1.0)  # pretraining; fine-tuning and linear probing use torchvision's default (0.08, 1)
FINETUNE_CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_PCT = 224 / 256  # the evaluation's center crop keeps this share of the resized image...
EVAL_CROP_PCT_MAX_SIZE = 224  # ...up to this image size; all of it above
# torchvision's, and NumPy arrays (H, W) or (H, W, C): multi-band images
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".npy")
NO_LABEL = -1
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist package puts it
FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k"}  # split -> file name prefix
FASHION_MNIST_CLASSES = 10
CLOUD_STORAGE_PREFIX = "gs://"
# What etils' epath reaches gs:// through: TensorFlow's file system where TensorFlow is installed, else gcsfs.
CLOUD_STORAGE_READERS = ("tensorflow", "gcsfs")
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
        self.description = f"image folder {root}"
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

    @property
    def num_classes(self) -> int:
        """The number of class folders, images or not: the labels a model trained on it must cover."""
        return len(self.classes)

    def labels(self) -> np.ndarray:
        """Every record's label, from the file list (no image is read)."""
        return np.array([label for _, label in self._files], np.int64)


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
        self.description = f"tfds {self._prefix}"

    def __len__(self) -> int:
        return len(self._source)

    @property
    def num_classes(self) -> int | None:
        """The label feature's number of classes, from the dataset info (None: no class-label feature)."""
        features = self._source.dataset_info.features
        return getattr(features["label"], "num_classes", None) if "label" in features else None

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
        self.description = self._prefix
        self.num_classes = FASHION_MNIST_CLASSES

    def __len__(self) -> int:
        return len(self._labels)

    def labels(self) -> np.ndarray:
        """Every record's label (the labels file, already in memory)."""
        return self._labels.astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self._images[index], "label": int(self._labels[index]), "name": f"{self._prefix}:{index}"}


# ---------------------------------------------------------------------------------------------------
# Subsets (few-label training, the kNN monitor) and label checks
# ---------------------------------------------------------------------------------------------------
def known_labels(source: Sequence) -> np.ndarray | None:
    """Every record's label where the source knows them without reading records (an image folder's file list,
    Fashion-MNIST's labels file, their subsets); None elsewhere: a TFDS split keeps each label inside its
    record, and reading ImageNet's 1.28M records at start would take long."""
    labels = getattr(source, "labels", None)
    return None if labels is None else labels()


def stratified_indices(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted indices of `count` <= len(labels) records, each class's share drawn at random within the class.

    A class of n_c of the n records gets floor(count * n_c / n) of them; the rest go one each to the classes
    with the largest remainders (ties: the smaller label). A function of (labels, count, seed) alone, so every
    host and every restart draws the same records.
    """
    _, group, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    quotas, remainders = np.divmod(count * sizes, len(labels))
    quotas[np.lexsort((np.arange(len(sizes)), -remainders))[: count - quotas.sum()]] += 1
    shuffled = np.random.default_rng(seed).permutation(len(labels))
    by_class = shuffled[np.argsort(group[shuffled], kind="stable")]  # random order within each class
    rank_in_class = np.arange(len(labels)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return np.sort(by_class[rank_in_class < np.repeat(quotas, sizes)])


class Subset(Sequence):
    """The records at `indices` of a source, which keeps its description, classes and labels."""

    def __init__(self, source: Sequence, indices: np.ndarray):
        self._source, self._indices = source, indices
        self.description = getattr(source, "description", type(source).__name__)
        self.num_classes = getattr(source, "num_classes", None)
        self.classes = getattr(source, "classes", None)
        labels = known_labels(source)
        self._labels = None if labels is None else labels[indices]

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._source[int(self._indices[index])]

    def labels(self) -> np.ndarray | None:
        """The source's labels of these records, where the source knows them (`known_labels`)."""
        return self._labels


def sample_subset(source: Sequence, count: int, seed: int) -> Sequence:
    """`count` records drawn with `seed` (few-label training, the kNN monitor's splits); the whole source if it
    holds no more. Stratified by class where the labels are known cheaply (`known_labels`), else uniform: the
    first records of a class-sorted folder (the ImageNet layout) would be a few classes only.
    """
    if count >= len(source):
        return source
    labels = known_labels(source)
    if labels is None:
        indices = np.sort(np.random.default_rng(seed).choice(len(source), count, replace=False))
    else:
        indices = stratified_indices(labels, count, seed)
    return Subset(source, indices)


def check_label_range(labels: np.ndarray, num_classes: int, name: Callable[[int], str]) -> None:
    """ConfigError naming the first label outside [0, num_classes) (one_hot would make it an all-zero target)
    and its example, `name(index)`."""
    outside = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if outside.size:
        index = int(outside[0])
        raise ConfigError(f"label {labels[index]} of {name(index)} is outside [0, num_classes={num_classes})")


def check_labels(source: Sequence, num_classes: int) -> None:
    """At start: ConfigError when the source has more classes than `num_classes`, or a label it knows cheaply
    (`known_labels`) lies outside [0, num_classes). Other sources are checked batch by batch."""
    classes = getattr(source, "num_classes", None)
    if classes is not None and classes > num_classes:
        description = getattr(source, "description", "the dataset")
        raise ConfigError(f"{description} has {classes} classes, more than num_classes={num_classes}")
    labels = known_labels(source)
    if labels is not None:
        check_label_range(labels, num_classes, lambda index: source[index]["name"])


def check_same_classes(train: Sequence, other: Sequence) -> None:
    """ConfigError when two splits of a folder dataset list different class folders: each folder numbers its
    classes in sorted order, so one class missing from the evaluation split shifts every later label."""
    train_classes, other_classes = getattr(train, "classes", None), getattr(other, "classes", None)
    if train_classes is None or other_classes is None or train_classes == other_classes:
        return
    only_train = sorted(set(train_classes) - set(other_classes))[:3]
    only_other = sorted(set(other_classes) - set(train_classes))[:3]
    raise ConfigError(
        f"{other.description} and {train.description} have different class folders ({len(other_classes)} vs "
        f"{len(train_classes)}; only in the training split: {only_train}, only in the other: {only_other}), so their "
        "labels would not match"
    )


def label_checked(batches: Iterator[dict[str, np.ndarray]], num_classes: int) -> Iterator[dict[str, np.ndarray]]:
    """Training batches, each checked (`check_label_range`) before it reaches the device; outside grain, which
    would append lines to the message."""
    for batch in batches:
        check_label_range(batch["label"], num_classes, lambda row: f"row {row} of a training batch")
        yield batch


def _image_folder(dataset: ml_collections.ConfigDict) -> ImageFolder:
    """`data_dir`/`split`; unlike tfds and fashion_mnist, a folder has no default place to look."""
    if not dataset.data_dir:
        raise DatasetNotFoundError("dataset.source='folder' needs dataset.data_dir (the folder holding <split>/)")
    return ImageFolder(epath.Path(dataset.data_dir) / dataset.split)


# dataset.source -> what opens it from `config.dataset`; the one list of valid names (`make_source` checks it).
SOURCES: dict[str, Callable[[ml_collections.ConfigDict], Sequence]] = {
    # TFDS dataset `name`, prepared as ArrayRecord in `data_dir` (None: ~/tensorflow_datasets)
    "tfds": lambda dataset: TfdsSource(dataset.name, dataset.split, dataset.data_dir),
    # `data_dir`/`split`/<class>/<image>, the ImageNet layout
    "folder": _image_folder,
    # the IDX files in `data_dir` (None: where `apt-get install dataset-fashion-mnist` puts them), split train/test
    "fashion_mnist": lambda dataset: FashionMnist(dataset.data_dir or FASHION_MNIST_DIR, dataset.split),
    # scikit-image's bundled photographs (unlabeled)
    "demo": lambda dataset: DemoPhotos(),
}


def check_cloud_storage_reader(dataset: ml_collections.ConfigDict) -> None:
    """DatasetNotFoundError, before any request, when `data_dir` is on Cloud Storage and nothing here can list it.

    array_record (>= 0.8.3) reads `gs://` ArrayRecord files itself, through its own GCS client and the machine's
    default credentials; everything else (TFDS's dataset info, the listing of files, image folders, IDX files)
    goes through etils' epath, which reaches `gs://` with TensorFlow's file system or, without TensorFlow,
    gcsfs (the `gcs` extra). Without either, TFDS reports the dataset as not prepared, and a folder ends in an
    ImportError traceback.
    """
    data_dir = str(dataset.data_dir or "")
    if not data_dir.startswith(CLOUD_STORAGE_PREFIX) or dataset.source == "demo":
        return
    if any(importlib.util.find_spec(module) is not None for module in CLOUD_STORAGE_READERS):
        return
    raise DatasetNotFoundError(
        f'dataset.data_dir={data_dir} is on Cloud Storage, which needs gcsfs here (pip install -e ".[gcs]" -c '
        "constraints.txt); or copy the data to a local disk, or mount the bucket with gcsfuse, and pass that path"
    )


def make_source(dataset: ml_collections.ConfigDict) -> Sequence:
    """The source named by `config.dataset`; an unknown name is a ConfigError, a missing or empty source a
    DatasetNotFoundError, both here, at start (every loop opens its sources before compiling)."""
    if dataset.source not in SOURCES:
        *names, last = map(repr, SOURCES)
        raise ConfigError(f"dataset.source={dataset.source!r} must be {', '.join(names)} or {last}")
    check_cloud_storage_reader(dataset)
    source = SOURCES[dataset.source](dataset)
    if len(source) == 0:
        raise DatasetNotFoundError(f"dataset {dataset.source}:{dataset.name} split {dataset.split!r} is empty")
    if len(source) < jax.process_count():
        raise DatasetNotFoundError(
            f"dataset {dataset.source}:{dataset.name} split {dataset.split!r} holds {len(source)} examples, fewer "
            f"than the {jax.process_count()} hosts: every host needs at least one"
        )
    return source


# ---------------------------------------------------------------------------------------------------
# Decoding and transforms (uint8 in, uint8 out)
# ---------------------------------------------------------------------------------------------------
NPY_MAGIC = b"\x93NUMPY"  # how every .npy file starts
PIL_MODES = {1: "L", 3: "RGB"}  # num_channels -> the mode any PIL image is converted to


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A uint8 array as it is; a float array scaled by 255 when its values lie in [0, 1], then clipped to 0..255."""
    if image.dtype == np.uint8:
        return image
    return np.clip(image * (255 if image.max() <= 1 else 1), 0, 255).astype(np.uint8)


def luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> (H, W, 1) gray by ITU-R 601-2, in Pillow's fixed point, as `convert("L")` computes it."""
    r, g, b = (rgb[:, :, i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[:, :, None]


def to_bands(image: np.ndarray, num_channels: int = 3) -> np.ndarray:
    """A decoded array (H, W) or (H, W, C), uint8 or float -> uint8 (H, W, num_channels).

    A 2-D array is one band; one band is repeated to 3 when 3 are asked; 4 bands asked as 1 or 3 are RGBA,
    whose alpha is dropped as by Pillow's convert; 3 bands become 1 by Pillow's "L" rule (`luma`); equal
    counts stay. Any other pair of counts is a ValueError (the caller names the file).
    """
    image = to_uint8(image)
    image = image[:, :, None] if image.ndim == 2 else image
    bands = image.shape[-1] if image.ndim == 3 else None
    if bands == 4 and num_channels in PIL_MODES:
        image, bands = image[:, :, :3], 3
    if bands == num_channels:
        return np.ascontiguousarray(image)
    if bands == 1 and num_channels == 3:
        return np.repeat(image, 3, axis=-1)
    if bands == 3 and num_channels == 1:
        return luma(image)
    raise ValueError(f"the array of shape {image.shape} has {bands} bands, not num_channels={num_channels}")


# A training example looks this far for a readable image, and the reconstruction grid for its first one
MAX_UNREADABLE_IN_A_ROW = 1000
# What decoding raises for corrupt, truncated or oversized files (DecompressionBombError is no OSError)
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode(image: bytes | np.ndarray, num_channels: int = 3) -> np.ndarray:
    """Encoded bytes or an array -> uint8 (H, W, num_channels).

    Bytes: a .npy array (H, W) or (H, W, C), uint8 or float (`to_bands`), or any PIL format and mode, converted
    to "L" for 1 channel and "RGB" for 3; other counts take the image's own bands when they match. Arrays:
    `to_bands`. A mismatch is a ValueError, which the pipeline reports with the file's name.
    """
    if isinstance(image, np.ndarray):
        return to_bands(image, num_channels)
    if image[: len(NPY_MAGIC)] == NPY_MAGIC:
        array = np.load(io.BytesIO(image), allow_pickle=False)
        if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f".npy of dtype {array.dtype}: give uint8, or floats in [0, 1]")
        return to_bands(array, num_channels)
    with Image.open(io.BytesIO(image)) as pil:
        if num_channels in PIL_MODES:
            return np.asarray(pil.convert(PIL_MODES[num_channels])).reshape(pil.height, pil.width, num_channels)
        bands = len(pil.getbands())
        if bands != num_channels:
            raise ValueError(f"the image (mode {pil.mode}) has {bands} bands, not num_channels={num_channels}")
        return np.asarray(pil).reshape(pil.height, pil.width, num_channels)


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


def pil_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pillow's antialiased bicubic resize of a uint8 (H, W, C) image to (height, width, C).

    3 bands resize as one "RGB" image, 1 band as an "L" image, other counts band by band as "L" images (the
    same filter: band-wise "L" equals "RGB" on every band, and Pillow would premultiply an RGBA image's alpha).
    """
    if image.shape[-1] == 3:
        return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))
    bands = [Image.fromarray(np.ascontiguousarray(image[:, :, c])) for c in range(image.shape[-1])]
    return np.stack([np.asarray(band.resize((width, height), Image.BICUBIC)) for band in bands], axis=-1)


def bicubic_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Pillow's antialiased bicubic resize to size x size, as torchvision's PIL path."""
    return pil_resize(image, size, size)


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
    out = np.zeros((canvas, canvas, image.shape[-1]), np.uint8)
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


def finetune_transform(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    rand_augment: bool,
    scale: tuple[float, float] = FINETUNE_CROP_SCALE,
) -> np.ndarray:
    """The official fine-tuning training transform (timm, with `rand_augment`: rand-m9-mstd0.5-inc1):
    RandomResizedCrop(size, scale 0.08-1 by default, bicubic) + flip; random erasing runs on the device."""
    image = pretrain_transform(image, rng, size, scale)
    return _rand_augment(image, rng) if rand_augment else image


def _rand_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`augment.rand_augment` of an RGB image, or of a 1-band one as a PIL "L" image."""
    if image.shape[-1] == 1:
        return augment.rand_augment(np.ascontiguousarray(image[:, :, 0]), rng)[:, :, None]
    return augment.rand_augment(np.ascontiguousarray(image), rng)


def single_draw_crop_box(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float] = FINETUNE_CROP_SCALE
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) as the official linear probe's `util/crop.RandomResizedCrop` (BYOL's TF crop).

    One draw of area and aspect, each side clamped to the image: no retries and no center fallback, so a
    draw too wide for the image becomes a full-width crop of another aspect. Sides are at least one pixel
    (the official crop would be empty, and fail, on an image of a few pixels).
    """
    target_area = height * width * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*np.log(CROP_RATIO)))
    crop_w = min(max(round(math.sqrt(target_area * aspect)), 1), width)
    crop_h = min(max(round(math.sqrt(target_area / aspect)), 1), height)
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return left, top, left + crop_w, top + crop_h


def linprobe_transform(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    rand_augment: bool,
    scale: tuple[float, float] = FINETUNE_CROP_SCALE,
) -> np.ndarray:
    """The official linear-probing training transform (`main_linprobe.py`): the single-draw crop
    (`single_draw_crop_box`, scale 0.08-1 by default) resized to `size` (bicubic), then a horizontal flip;
    RandAugment only if `augment.rand_augment` asks for it (the official probe has none)."""
    left, top, right, bottom = single_draw_crop_box(rng, *image.shape[:2], scale)
    image = bicubic_resize(image[top:bottom, left:right], size)
    image = image[:, ::-1] if rng.random() < 0.5 else image
    return _rand_augment(image, rng) if rand_augment else image


def classifier_train_transform(config: ml_collections.ConfigDict) -> Transform:
    """The training transform of `config.task` and `augment.crop`: with "random", fine-tuning's (10-try crop)
    or linear probing's (single draw) crop of `augment.crop_scale` of the image's area, then a flip; with
    "center", the evaluation's own view (`eval_transform`), unflipped. RandAugment follows either where asked."""
    augment = config.augment
    if augment.crop == "center":
        return functools.partial(_center_view, size=config.image_size, rand_augment=augment.rand_augment)
    transform = linprobe_transform if config.task == LINPROBE else finetune_transform
    return functools.partial(
        transform, size=config.image_size, rand_augment=augment.rand_augment, scale=tuple(augment.crop_scale)
    )


def _center_view(image: np.ndarray, rng: np.random.Generator, size: int, rand_augment: bool) -> np.ndarray:
    image = eval_transform(image, size)
    return _rand_augment(image, rng) if rand_augment else image


def eval_transform(image: np.ndarray, size: int) -> np.ndarray:
    """The official evaluation (`util/datasets.build_transform`), with torchvision's rounding on PIL images.

    Resize(int(size / crop_pct), bicubic) of the shorter side, crop_pct 224/256 up to 224 px and 1 above
    (448 px: 448, not 512); the long side becomes int(new_short * long / short). Then CenterCrop(size) at
    offsets round((H - size) / 2) and round((W - size) / 2).
    """
    height, width = image.shape[:2]
    new_short = int(size / (EVAL_CROP_PCT if size <= EVAL_CROP_PCT_MAX_SIZE else 1.0))
    short, long = sorted((width, height))
    new_long = int(new_short * long / short)
    image = pil_resize(image, *((new_short, new_long) if width <= height else (new_long, new_short)))
    top, left = round((image.shape[0] - size) / 2), round((image.shape[1] - size) / 2)
    return np.ascontiguousarray(image[top : top + size, left : left + size])


class PixelStats(NamedTuple):
    """Per-channel mean and std of pixel values in [0, 1], which the model's inputs are normalized with."""

    mean: np.ndarray  # (C,) float32
    std: np.ndarray  # (C,) float32


IMAGENET_STATS = PixelStats(IMAGENET_MEAN, IMAGENET_STD)


def pixel_stats(dataset: ml_collections.ConfigDict) -> PixelStats:
    """`dataset.mean` and `dataset.std` of a run config as arrays."""
    return PixelStats(np.asarray(dataset.mean, np.float32), np.asarray(dataset.std, np.float32))


def normalize(images: jax.Array | np.ndarray, stats: PixelStats = IMAGENET_STATS) -> jax.Array:
    """uint8 images -> mean/std normalized float32; runs on the accelerator inside the jitted step."""
    return (jnp.asarray(images, jnp.float32) / 255.0 - stats.mean) / stats.std


def denormalize(images: np.ndarray, stats: PixelStats = IMAGENET_STATS) -> np.ndarray:
    """Normalized images back to [0, 1] for display."""
    return np.clip(images * stats.std + stats.mean, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------
class SkippedImages:
    """Counts the records that could not be decoded and names each file once in the log."""

    def __init__(self):
        self.count = 0
        self._named: set[str] = set()

    def add(self, name: str, error: str) -> None:
        self.count += 1
        if name not in self._named:
            self._named.add(name)
            logging.warning("Skipping unreadable image %s: %s", name, error)

    def __call__(self, example: dict[str, Any]) -> bool:
        """Whether an example holds an image; one with an "error" field is counted and named."""
        if "error" not in example:
            return True
        self.add(example["name"], example["error"])
        return False

    def take(self, example: dict[str, Any]) -> dict[str, Any]:
        """A training example without its "skipped" records, which are counted and named here: in the
        process that consumes the batches, also when worker processes decode them."""
        for name, error in example["skipped"]:
            self.add(name, error)
        return {key: value for key, value in example.items() if key != "skipped"}


class TrainStream:
    """The global training stream: position i = 0, 1, ... -> an augmented example, whatever the host count.

    Epoch e = i // N visits the N records in a permutation seeded by (seed, e) (grain's `index_shuffle`),
    and position i's augmentation draws from a generator seeded by (seed, i). An unreadable record is
    replaced inside its slot by the records that follow it in the epoch's order, so it shifts no other
    position; the replaced records travel with the example ("skipped") for `SkippedImages.take`.
    """

    def __init__(self, source: Sequence, seed: int, transform: Transform, num_channels: int = 3):
        self.source, self.seed, self.transform, self.num_channels = source, seed, transform, num_channels

    def record_index(self, position: int, attempt: int = 0) -> int:
        """The record read for `position` at its `attempt`-th try."""
        epoch, offset = divmod(position, len(self.source))
        epoch_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        return index_shuffle((offset + attempt) % len(self.source), len(self.source) - 1, epoch_seed, rounds=4)

    def __getitem__(self, position: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, position])
        skipped = []
        tries = min(len(self.source), MAX_UNREADABLE_IN_A_ROW)
        for attempt in range(tries):  # bounded: a source that hardly decodes fails, not a search for hours
            record = self.source[self.record_index(position, attempt)]
            try:
                fields = self.transform(decode(record["image"], self.num_channels), rng)
            except UNREADABLE_IMAGE_ERRORS as error:
                skipped.append((record["name"], f"{type(error).__name__}: {error}"))
                continue
            fields = fields if isinstance(fields, dict) else {"image": fields}
            return {**fields, "label": np.int32(record["label"]), "skipped": skipped}
        description = getattr(self.source, "description", type(self.source).__name__)
        what = f"the {tries} records" if tries == len(self.source) else f"{tries} records in a row"
        raise DatasetNotFoundError(f"no decodable image among {what} of {description} (last: {': '.join(skipped[-1])})")


def _host_example(index: int, stream: TrainStream, rows: np.ndarray, batch_size: int, start: int) -> dict[str, Any]:
    """Element `index` of a host's stream: row rows[index % b] of global batch index // b (b = len(rows))."""
    batch, row = divmod(index, len(rows))
    return stream[start + batch * batch_size + int(rows[row])]


def pretrain_host_transform(config: ml_collections.ConfigDict) -> Transform:
    """What the hosts run for pretraining: all of it, or, with `input.resize_on_device`, all but the resize
    (crops travel on a canvas of twice the image size; `device_prefetch` finishes them)."""
    if config.input.resize_on_device:
        return functools.partial(crop_to_canvas, size=config.image_size, canvas=2 * config.image_size)
    return functools.partial(pretrain_transform, size=config.image_size)


def process_rows(sharding: jax.sharding.Sharding, batch_size: int) -> np.ndarray:
    """The rows of each global batch that this process feeds, in the order of its local batch:
    `jax.make_array_from_process_local_data` maps the process's row ranges, ascending, onto its local rows."""
    ranges = {
        index[0].indices(batch_size)[:2]
        for device, index in sharding.devices_indices_map((batch_size,)).items()
        if device.process_index == jax.process_index()
    }
    return np.concatenate([np.arange(start, stop) for start, stop in sorted(ranges)])


def train_dataset(
    source: Sequence,
    config: ml_collections.ConfigDict,
    skipped: SkippedImages,
    *,
    transform: Transform | None = None,
    position: int = 0,
    rows: Sequence[int] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """This host's part of the global training stream (`TrainStream`), as an infinite iterable of batches
    {"image": uint8 (b, S, S, C), "label": int32 (b,)}, b = len(rows), C = `num_channels`.

    Global batch k holds stream positions position + k * batch_size + r for rows r = 0 .. batch_size - 1,
    and this host reads its `rows` of them: `process_rows` of the batch sharding, or by default the equal
    share of process `process_index` of `process_count`, in process order. So the examples of a step depend
    on the seed and the step alone, never on the host count, and a run resumed at step s reads from
    position s * batch_size.
    `transform(image, rng)` augments a decoded image; by default the pretraining transform at `image_size`,
    whose batches with `input.resize_on_device` hold canvases and their "crop" fields instead.
    """
    if rows is None:
        index = jax.process_index() if process_index is None else process_index
        per_host = config.batch_size // (jax.process_count() if process_count is None else process_count)
        rows = range(index * per_host, (index + 1) * per_host)
    stream = TrainStream(source, config.seed, transform or pretrain_host_transform(config), config.num_channels)
    host_example = functools.partial(
        _host_example, stream=stream, rows=np.asarray(rows), batch_size=config.batch_size, start=position
    )
    dataset = (
        grain.MapDataset.range(sys.maxsize)
        .map(host_example)
        .to_iter_dataset(
            grain.ReadOptions(num_threads=config.input.num_threads, prefetch_buffer_size=config.input.prefetch)
        )
    )
    if config.input.num_workers > 0:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.input.num_workers))
    return dataset.map(skipped.take).batch(len(rows), drop_remainder=True)


def device_prefetch(
    iterator: Iterator[dict[str, np.ndarray]],
    sharding: jax.sharding.Sharding,
    keys: tuple[str, ...] = ("image",),
    size: int = 2,
    image_size: int | None = None,
) -> Iterator[dict[str, jax.Array]]:
    """{key: global batch array}, `size` batches ahead of the step that uses them. Batches of
    `crop_to_canvas` are resized to `image_size` here, dispatched ahead like the transfer."""
    finish = jax.jit(resize_crops, static_argnums=2, out_shardings=sharding)
    queue: collections.deque = collections.deque()
    while True:
        batch = next(iterator)
        arrays = {key: jax.make_array_from_process_local_data(sharding, batch[key]) for key in keys}
        if "crop" in batch:
            crops = jax.make_array_from_process_local_data(sharding, batch["crop"])
            arrays["image"] = finish(arrays["image"], crops, image_size)
        queue.append(arrays)
        if len(queue) == size:
            yield queue.popleft()


def fixed_eval_images(source: Sequence, count: int, size: int, num_channels: int = 3) -> np.ndarray:
    """The first readable `count` images of the source (fewer if it has fewer), center-cropped, with
    `num_channels` bands: the same samples
    at every visualization. A source whose first `MAX_UNREADABLE_IN_A_ROW` images are all unreadable is a
    DatasetNotFoundError naming the first of them."""
    images, first_error = [], None
    searched = min(len(source), MAX_UNREADABLE_IN_A_ROW)
    for index in range(searched):
        record = source[index]
        try:
            images.append(eval_transform(decode(record["image"], num_channels), size))
        except UNREADABLE_IMAGE_ERRORS as error:
            first_error = first_error or f"{record['name']}: {type(error).__name__}: {error}"
            continue
        if len(images) == count:
            break
    if not images:
        raise DatasetNotFoundError(f"none of the first {searched} images of the dataset decodes (first: {first_error})")
    return np.stack(images)


def _eval_example(index: int, source: Sequence, size: int, total: int, num_channels: int) -> dict[str, Any]:
    image = np.zeros((size, size, num_channels), np.uint8)
    padding = {"image": image, "label": np.int32(NO_LABEL), "valid": False, "name": ""}
    if index >= total:  # evens out the hosts' batch counts
        return padding
    record = source[index]
    try:
        image = eval_transform(decode(record["image"], num_channels), size)
    except UNREADABLE_IMAGE_ERRORS as error:
        return padding | {"name": record["name"], "error": f"{type(error).__name__}: {error}"}
    return {"image": image, "label": np.int32(record["label"]), "valid": True, "name": record["name"]}


def _report_unreadable(example: dict[str, Any], skipped: SkippedImages) -> dict[str, Any]:
    skipped(example)  # runs in the consuming thread: counts and names each unreadable image (already padding)
    return {key: example[key] for key in ("image", "label", "valid", "name")}


def _checked_eval_batches(batches: Iterator[dict[str, np.ndarray]], num_classes: int | None) -> Iterator[dict]:
    """The batches without their names, after `check_label_range` of their valid rows' labels; checked here,
    as grain appends lines to the messages of errors raised inside it."""
    for batch in batches:
        names = batch.pop("name")
        if num_classes is not None:
            labels = np.where(batch["valid"], batch["label"], 0)  # padding rows carry no label
            check_label_range(labels, num_classes, lambda row, names=names: str(names[row]))
        yield batch


def eval_batches(
    source: Sequence,
    image_size: int,
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 16,
    skipped: SkippedImages | None = None,
    num_classes: int | None = None,
    num_channels: int = 3,
) -> Iterator[dict[str, np.ndarray]]:
    """This host's part of the source's examples, each once, in order, center-cropped (`eval_transform`).

    Batches are {"image": uint8 (b, S, S, num_channels), "label": int32 (b,), "valid": bool (b,)} with b = batch_size /
    hosts. Host h reads examples h, h + hosts, ...; rows past the end and unreadable images are padding
    (valid False), so every host yields the same number of batches, as a jitted multi-host evaluation needs.
    With `num_classes`, a label outside [0, num_classes) raises a ConfigError naming the example.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    per_host = batch_size // count
    if per_host < 1 or batch_size % count:
        raise ValueError(f"eval batch size {batch_size} is not a positive multiple of the {count} hosts")
    total = len(source)
    num_batches = math.ceil(math.ceil(total / count) / per_host)  # host 0's, which has the most examples
    skipped = SkippedImages() if skipped is None else skipped
    dataset = (
        grain.MapDataset.range(index, index + num_batches * per_host * count, count)
        .map(functools.partial(_eval_example, source=source, size=image_size, total=total, num_channels=num_channels))
        .to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * per_host))
        .map(functools.partial(_report_unreadable, skipped=skipped))
        .batch(per_host)
    )
    return _checked_eval_batches(iter(dataset), num_classes)
