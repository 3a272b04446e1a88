"""The input benchmark runs end to end on a few images, and its JPEGs are what it claims."""

from __future__ import annotations

import math

import numpy as np
from absl import flags

from mae_jax import input_benchmark
from mae_jax.input_pipeline import decode


def test_synthetic_jpegs_decode_to_the_requested_sizes():
    jpegs = input_benchmark.synthetic_jpegs(4)
    shapes = [decode(jpeg).shape for jpeg in jpegs]
    expected = [(h, w, 3) for w, h in input_benchmark.SHAPES]
    assert shapes == [*expected, expected[0]]
    assert all(20_000 < len(jpeg) < 300_000 for jpeg in jpegs)  # photo-like, not white noise
    assert np.std(decode(jpegs[0])) > 20  # and not blank


def test_benchmark_measures_positive_finite_rates():
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain reads its absl flags when starting workers
    jpegs = input_benchmark.synthetic_jpegs(6)
    results = input_benchmark.benchmark(jpegs, [1], size=64, seconds=0.5, rounds=1, log=lambda _: None)
    assert set(results) == {1} and set(results[1]) == set(input_benchmark.KINDS)
    assert all(math.isfinite(rate) and rate > 0 for rate in results[1].values())


def test_device_resize_time_is_positive_and_finite():
    seconds = input_benchmark.device_resize_seconds(input_benchmark.synthetic_jpegs(3), size=32, rounds=2)
    assert math.isfinite(seconds) and seconds > 0
