"""The global training stream: example i and its augmentation depend on (seed, i) alone, whatever the host count.

Hosts read disjoint rows of each global batch; an unreadable record is replaced inside its slot, so it
shifts no other host's examples, and is counted and named where the batches are consumed (also with
worker processes). A source with no decodable image is a one-line error, not an endless search.
"""

from __future__ import annotations

import functools
import io
import logging
import pathlib
import threading

import numpy as np
import pytest
from absl import flags
from PIL import Image

from mae_jax import input_pipeline
from tests.conftest import tiny_train_config

BATCH = 8
UNREADABLE = {3: b"\xff\xd8\xff\xe0 not really a jpeg", 8: b"GIF89a truncated"}  # record index -> bytes


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def records(size: int = 13) -> list[dict]:
    """Images of varied sizes whose pixels and label are the record's index, and two that do not decode."""
    return [
        {"image": UNREADABLE.get(i, png(np.full((20 + 3 * i, 40 - i, 3), i, np.uint8))), "label": i, "name": f"r{i}"}
        for i in range(size)
    ]


def global_batches(source, config, hosts: int, count: int, **kwargs) -> tuple[list[dict], int]:
    """The first `count` global batches as `hosts` hosts read them (their rows side by side), and the
    number of unreadable records the hosts counted together."""
    counters = [input_pipeline.SkippedImages() for _ in range(hosts)]
    iterators = [
        iter(input_pipeline.train_dataset(source, config, counters[h], process_index=h, process_count=hosts, **kwargs))
        for h in range(hosts)
    ]
    per_host = [[next(iterator) for _ in range(count)] for iterator in iterators]
    batches = [
        {key: np.concatenate([per_host[h][k][key] for h in range(hosts)]) for key in per_host[0][k]}
        for k in range(count)
    ]
    return batches, sum(counter.count for counter in counters)


def assert_same_batches(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"batch {k}, {key}")


def test_every_position_is_the_same_example_whatever_the_host_count():
    """Images (crop canvases, with resize_on_device), crops, flips and labels of 5 global batches (3 epochs
    of the 13 records) are those of one host for 2 and 4 hosts; together the hosts count the same skips."""
    config = tiny_train_config(batch_size=BATCH)
    one, skipped = global_batches(records(), config, 1, 5)
    assert set(one[0]) == {"image", "crop", "label"} and skipped > 0
    for hosts in (2, 4):
        batches, skipped_by_hosts = global_batches(records(), config, hosts, 5)
        assert_same_batches(batches, one)
        assert skipped_by_hosts == skipped
    labels = np.concatenate([batch["label"] for batch in one])
    assert not set(labels) & set(UNREADABLE)
    for epoch in range(3):  # every readable record is read in every epoch
        in_epoch = labels[13 * epoch : 13 * (epoch + 1)]
        assert set(in_epoch) == set(range(13)) - set(UNREADABLE), epoch
    for batch in one:  # the image is the record's, whatever the crop (one gray level per record)
        np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], batch["label"])


def test_stream_resumes_at_a_global_position_on_another_host_count():
    """What 2 hosts read from step 3 on equals batches 3, 4 of one host from the start: the position
    (step * batch size) is all a checkpoint needs."""
    config = tiny_train_config(batch_size=BATCH)
    one, _ = global_batches(records(), config, 1, 5)
    resumed, _ = global_batches(records(), config, 2, 2, position=3 * BATCH)
    assert_same_batches(resumed, one[3:])
    other_seed, _ = global_batches(records(), tiny_train_config(batch_size=BATCH, seed=1), 1, 1)
    assert not np.array_equal(other_seed[0]["label"], one[0]["label"])


def test_unreadable_records_are_named_by_the_consumer_with_worker_processes(caplog):
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    config = tiny_train_config(batch_size=BATCH)
    threads, skipped = global_batches(records(), config, 1, 4)
    config.input.num_workers = 2
    counter = input_pipeline.SkippedImages()
    caplog.clear()  # the threads' counter named them too
    with caplog.at_level(logging.WARNING):
        iterator = iter(input_pipeline.train_dataset(records(), config, counter))
        workers = [next(iterator) for _ in range(4)]
    assert_same_batches(workers, threads)
    assert counter.count == skipped
    named = [r.getMessage() for r in caplog.records if "Skipping unreadable image" in r.getMessage()]
    assert sorted(message.split()[3].rstrip(":") for message in named) == ["r3", "r8"]  # each named once


def test_decompression_bomb_is_skipped_like_a_corrupt_file(monkeypatch):
    """PIL's DecompressionBombError (an image of more than twice MAX_IMAGE_PIXELS) is no OSError."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # a 30 x 30 PNG is now a bomb; arrays are not decoded
    bomb = {"image": png(np.zeros((30, 30, 3), np.uint8)), "label": 0, "name": "bomb"}
    arrays = [{"image": np.full((20, 20, 3), i, np.uint8), "label": i, "name": f"a{i}"} for i in range(1, 6)]
    counter = input_pipeline.SkippedImages()
    batch = next(iter(input_pipeline.train_dataset([bomb, *arrays], tiny_train_config(batch_size=BATCH), counter)))
    assert 0 not in batch["label"] and counter.count >= 1  # the first 6 positions read every record


def test_source_without_a_decodable_image_is_a_one_line_error(tmp_path: pathlib.Path):
    """Also for fine-tuning's transform, whose stream used to search for a readable image forever."""
    root = tmp_path / "train" / "n01"
    root.mkdir(parents=True)
    for i, data in enumerate(UNREADABLE.values()):
        (root / f"{i}.JPEG").write_bytes(data)
    source = input_pipeline.ImageFolder(tmp_path / "train")
    transform = functools.partial(input_pipeline.finetune_transform, size=32, rand_augment=False)
    dataset = input_pipeline.train_dataset(source, tiny_train_config(), input_pipeline.SkippedImages(),
                                           transform=transform)  # fmt: skip
    outcome: list[BaseException | dict] = []

    def first_batch() -> None:
        try:
            outcome.append(next(iter(dataset)))
        except Exception as error:  # the test looks at it
            outcome.append(error)

    reader = threading.Thread(target=first_batch, daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert outcome, "the stream searched for a readable image for 60 s"
    assert isinstance(outcome[0], input_pipeline.DatasetNotFoundError), outcome[0]
    assert str(outcome[0]).startswith(f"no decodable image among the 2 records of image folder {tmp_path / 'train'}")


def test_a_source_that_hardly_decodes_fails_after_a_bounded_search(monkeypatch):
    """On ImageNet's 1.28M records, trying every one for a single example would look like a hang for hours."""
    monkeypatch.setattr(input_pipeline, "MAX_UNREADABLE_IN_A_ROW", 3)
    source = [{"image": b"not an image", "label": 0, "name": f"bad{i}"} for i in range(10)]
    stream = input_pipeline.TrainStream(source, seed=0, transform=lambda image, rng: image)
    with pytest.raises(input_pipeline.DatasetNotFoundError, match=r"^no decodable image among 3 records in a row of "):
        stream[0]
