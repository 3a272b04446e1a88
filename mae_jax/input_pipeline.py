"""Input pipeline: random-access source -> this host's shard -> shuffle -> augment -> batch (grain).

Every source (a tfds dataset, or the demo photographs an installed package ships) is a random-access
sequence of `{"image": uint8 HWC, ...}` records. Batch `k` of the pipeline depends only on the seed and
`k`, so a run resumed at step `k` reads exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
EVAL_RESIZE_RATIO = 256 / 224

# scikit-image sample photographs that ship inside the package (no download), used by the demo.
DEMO_PHOTOS = (
    "astronaut", "camera", "cat", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "brick", "grass", "gravel", "moon", "page", "text", "clock", "coins", "colorwheel",
)  # fmt: skip


class DatasetNotFoundError(RuntimeError):
    """The configured data is not where the config says; the message says how to prepare it."""


# ---------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------
class DemoPhotos(Sequence):
    """scikit-image's bundled sample photographs as a random-access source."""

    def __init__(self):
        from skimage import data

        self._images = [getattr(data, name)() for name in DEMO_PHOTOS]

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self._images[index]}


def tfds_source(name: str, split: str, data_dir: str | None) -> Sequence:
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # tfds raises several types for "not prepared"
        raise DatasetNotFoundError(
            f"tfds dataset {name!r} (split {split!r}) is not prepared in data_dir={data_dir or '~/tensorflow_datasets'}"
            f" ({type(error).__name__}); prepare it once with `tfds build {name} --file_format=array_record"
            f"{' --data_dir=' + data_dir if data_dir else ''}` (imagenet2012: put ILSVRC2012_img_{{train,val}}.tar"
            " in <data_dir>/downloads/manual first)"
        ) from error


def make_source(dataset: ml_collections.ConfigDict) -> Sequence:
    """The random-access source named by `config.dataset`; never empty."""
    if dataset.source == "demo":
        source = DemoPhotos()
    elif dataset.source == "tfds":
        source = tfds_source(dataset.name, dataset.split, dataset.data_dir)
    else:
        raise ValueError(f"unknown dataset.source {dataset.source!r}: use 'tfds' or 'demo'")
    if len(source) == 0:
        raise DatasetNotFoundError(f"dataset {dataset.source}:{dataset.get('name')} split {dataset.split!r} is empty")
    return source


# ---------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------
def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 from grayscale, RGBA or float images."""
    if image.dtype != np.uint8:
        image = np.clip(image * (255 if image.max() <= 1 else 1), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[:, :, :3])


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) chosen as torchvision's RandomResizedCrop does (10 tries, then center)."""
    area = height * width
    log_ratio = np.log(CROP_RATIO)
    for _ in range(10):
        target_area = area * rng.uniform(*CROP_SCALE)
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


def normalize(image: Image.Image) -> np.ndarray:
    return (np.asarray(image, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def pretrain_transform(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """RandomResizedCrop(size, scale 0.2-1, bicubic) + horizontal flip + ImageNet mean/std, as the paper."""
    image = to_rgb(image)
    box = random_resized_crop_box(rng, *image.shape[:2])
    crop = Image.fromarray(image).resize((size, size), Image.BICUBIC, box=box)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return normalize(crop)


def eval_transform(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to size * 256/224, center crop `size`, ImageNet mean/std."""
    pil = Image.fromarray(to_rgb(image))
    scale = round(size * EVAL_RESIZE_RATIO) / min(pil.size)
    pil = pil.resize((max(size, round(pil.width * scale)), max(size, round(pil.height * scale))), Image.BICUBIC)
    left, top = (pil.width - size) // 2, (pil.height - size) // 2
    return normalize(pil.crop((left, top, left + size, top + size)))


def denormalize(images: np.ndarray) -> np.ndarray:
    """Normalized images back to [0, 1] for display."""
    return np.clip(images * IMAGENET_STD + IMAGENET_MEAN, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------
def host_batch_size(global_batch_size: int) -> int:
    return global_batch_size // jax.process_count()


def pretrain_dataset(source: Sequence, config: ml_collections.ConfigDict) -> grain.MapDataset:
    """Infinite MapDataset whose element k is this host's part of global batch k."""
    size = config.image_size
    return (
        grain.MapDataset.source(source)
        .slice(slice(jax.process_index(), None, jax.process_count()))
        .shuffle(seed=config.seed)
        .repeat()
        .random_map(lambda record, rng: pretrain_transform(record["image"], rng, size), seed=config.seed)
        .batch(host_batch_size(config.batch_size), drop_remainder=True)
    )


def train_batches(source: Sequence, config: ml_collections.ConfigDict, start_step: int = 0) -> Iterator[np.ndarray]:
    """Host-local (B / num_hosts, H, W, 3) float32 batches from step `start_step` on, read by threads."""
    dataset = pretrain_dataset(source, config).slice(slice(start_step, None))
    read_options = grain.ReadOptions(num_threads=config.input.num_threads, prefetch_buffer_size=config.input.prefetch)
    return iter(dataset.to_iter_dataset(read_options))


def fixed_eval_images(source: Sequence, count: int, size: int) -> np.ndarray:
    """The first `count` images of the source, center-cropped: the same samples at every visualization."""
    count = min(count, len(source))
    return np.stack([eval_transform(source[i]["image"], size) for i in range(count)])


def device_prefetch(batches: Iterator[np.ndarray], sharding: jax.sharding.Sharding, size: int = 2) -> Iterator:
    """Global jax.Arrays assembled from each host's part, `size` batches ahead of the step that uses them."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(jax.make_array_from_process_local_data(sharding, batch))
        if len(queue) == size:
            yield queue.popleft()
    yield from queue
