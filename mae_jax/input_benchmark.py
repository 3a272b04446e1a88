"""Throughput of the pretraining transform beside a bare JPEG decode, measured in the same run.

`python -m mae_jax.input_benchmark [--workers 1,2] [--images 256] [--size 224] [--seconds 10] [--rounds 3]`

Decoding is the floor every JPEG pipeline pays, so "transform img/s as a fraction of decode img/s" says how
much our crop/resize/flip adds on top, independent of how fast this particular machine is. Two transforms
are timed: what a host runs in training (`input.resize_on_device`, the default: crop and flip, the resize
left to the accelerator) and the whole transform on the host; the accelerator's share is timed after, on
JAX's default backend, per image. Absolute rates from different runs are not comparable here (CPU timings
vary by +-25%), so the loops run in one process tree, interleaved (decode, host part, all on host, decode,
...) for a few rounds, and the medians are reported.

Workers are grain's `mp_prefetch` processes, as in training (not a multiprocessing.Pool: grain's numbers are
steady once its start-up is excluded), each with one reading thread, so that one worker is one core's worth
of work. Every measurement starts fresh workers and discards a warm-up (process spawn, imports, first
batches) before the clock starts.

What crosses between processes is kept out of the comparison: workers send back one token per image, not
the pixels (the decoded 500x375 image is 3.7x the size of the 224x224 crop, and shipping it would slow the
decode-only baseline with work that training never does), and they batch the tokens themselves, because
grain's per-element hand-over alone caps a worker near 4000 elements/s here (0.25 ms each, ~15% of a decode).
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import statistics
import time
from collections.abc import Callable, Sequence

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from mae_jax.input_pipeline import crop_to_canvas, decode, pretrain_transform, resize_crops

# ImageNet's typical shapes: most training images are 500 px on the long side, 4:3 or 3:2.
SHAPES = ((500, 375), (375, 500), (500, 333))  # (width, height)
BATCH = 32


def _field(rng: np.random.Generator, cells: int, width: int, height: int, channels: int) -> np.ndarray:
    """Unit-scale random field, smooth on the scale of width/cells pixels (bicubic upsampled noise)."""
    low = np.clip(rng.normal(128, 40, (max(2, cells * height // width), cells, channels)), 0, 255).astype(np.uint8)
    smooth = Image.fromarray(low.squeeze(-1) if channels == 1 else low).resize((width, height), Image.BICUBIC)
    return (np.asarray(smooth, np.float32).reshape(height, width, channels) - 128) / 40


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth colour, a few flat shapes, grey fine texture and mild grain.

    White noise would be ~4x larger than a photo and decode far slower (the entropy decoder dominates), so
    detail is mostly in luminance at a few-pixel scale, as in photographs; files come out near ImageNet's
    ~110 KB average at 500x375.
    """
    image = Image.fromarray(np.clip(128 + 60 * _field(rng, 3, width, height, 3), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(20, 120))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    pixels = np.asarray(image, np.float32) + 25 * _field(rng, 12, width, height, 3)
    pixels += 40 * _field(rng, 120, width, height, 1) + rng.normal(0, 20, (height, width, 1))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def synthetic_jpegs(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [synthetic_jpeg(rng, *SHAPES[i % len(SHAPES)]) for i in range(count)]


def decode_only(jpeg_bytes: bytes, rng: np.random.Generator, size: int) -> np.ndarray:
    del rng, size  # the floor: no augmentation
    return decode(jpeg_bytes)


def host_part(jpeg_bytes: bytes, rng: np.random.Generator, size: int) -> np.ndarray:
    return crop_to_canvas(decode(jpeg_bytes), rng, size, 2 * size)["image"]


def all_on_host(jpeg_bytes: bytes, rng: np.random.Generator, size: int) -> np.ndarray:
    return pretrain_transform(decode(jpeg_bytes), rng, size)


KINDS = {"decode": decode_only, "host": host_part, "all on host": all_on_host}


def _token(image: np.ndarray) -> int:
    return image.size  # see the module docstring: pixels stay in the worker


def measure(kind: str, jpegs: Sequence[bytes], workers: int, size: int, seconds: float) -> float:
    """Images/s of `kind` (a key of KINDS) in `workers` fresh grain processes, after a warm-up."""
    dataset = grain.MapDataset.source(jpegs).repeat().random_map(functools.partial(KINDS[kind], size=size), seed=0)
    iterator = iter(
        dataset.map(_token)
        .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=BATCH))
        .batch(BATCH)  # in the workers: see the module docstring
        .mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    )
    next(iterator)  # workers have started and produced
    warm_until = time.perf_counter() + min(1.0, seconds / 2)
    while time.perf_counter() < warm_until:  # let every worker fill its buffers and reach a steady state
        next(iterator)
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        count += len(next(iterator))
    iterator.close()
    return count / elapsed


def benchmark(
    jpegs: Sequence[bytes], workers: Sequence[int], size: int, seconds: float, rounds: int, *, log: Callable = print
) -> dict[int, dict[str, float]]:
    """Median images/s per worker count and kind, over `rounds` interleaved measurements."""
    rates: dict[int, dict[str, list[float]]] = {k: {kind: [] for kind in KINDS} for k in workers}
    for round_ in range(rounds):
        for k in workers:
            for kind in KINDS:
                rates[k][kind].append(measure(kind, jpegs, k, size, seconds))
                log(f"  round {round_ + 1}/{rounds}, {k} workers, {kind}: {rates[k][kind][-1]:.0f} img/s")
    return {k: {kind: statistics.median(values) for kind, values in by_kind.items()} for k, by_kind in rates.items()}


def device_resize_seconds(jpegs: Sequence[bytes], size: int, rounds: int = 5) -> float:
    """Median seconds per image of the accelerator's share (`resize_crops`) on a batch of these JPEGs' crops."""
    rng = np.random.default_rng(0)
    fields = [crop_to_canvas(decode(jpeg), rng, size, 2 * size) for jpeg in jpegs[:BATCH]]
    canvases = jax.device_put(np.stack([f["image"] for f in fields]))
    crops = jax.device_put(np.stack([f["crop"] for f in fields]))
    resize = jax.jit(resize_crops, static_argnums=2)
    resize(canvases, crops, size).block_until_ready()  # compile
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        resize(canvases, crops, size).block_until_ready()
        times.append((time.perf_counter() - start) / len(fields))
    return statistics.median(times)


def _positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: a number > 0 of `kind`, else argparse's one-line usage error."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:  # also NaN
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
        return value

    return parse


def _worker_counts(text: str) -> list[int]:
    return [_positive(int)(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=_worker_counts, default=[1, 2], help="comma-separated, e.g. 1,2")
    parser.add_argument("--images", type=_positive(int), default=256)
    parser.add_argument("--size", type=_positive(int), default=224)
    parser.add_argument("--seconds", type=_positive(float), default=10.0, help="timed seconds per measurement")
    parser.add_argument("--rounds", type=_positive(int), default=3)
    args = parser.parse_args()
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain reads its absl flags when starting workers

    jpegs = synthetic_jpegs(args.images)
    print(f"{len(jpegs)} JPEGs of {'/'.join(f'{w}x{h}' for w, h in SHAPES)}, quality 90,"
          f" mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KB; {os.cpu_count()} CPU cores")  # fmt: skip
    results = benchmark(jpegs, args.workers, args.size, args.seconds, args.rounds)

    device_seconds = device_resize_seconds(jpegs, args.size)

    print(f"\nimage size {args.size}; images/s per core, and as a share of the bare decode rate")
    print("workers | decode only | host part of the transform | all on host")
    for k, rate in results.items():
        per_core = {kind: value / min(k, os.cpu_count() or 1) for kind, value in rate.items()}
        host, whole = rate["host"] / rate["decode"], rate["all on host"] / rate["decode"]
        print(f"{k:7d} | {per_core['decode']:11.0f} | {per_core['host']:19.0f} {host:6.0%} |"
              f" {per_core['all on host']:4.0f} {whole:6.0%}")  # fmt: skip
    k = max(results)
    print(f"pretraining transform at {results[k]['host'] / results[k]['decode']:.0%} of the bare decode rate per core"
          f" ({k} workers; the resize on the accelerator: {device_seconds * 1e3:.2f} ms per image on"
          f" {jax.devices()[0].device_kind})")  # fmt: skip


if __name__ == "__main__":
    main()
