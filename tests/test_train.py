"""The training loop end to end: mocked tfds, resuming from a checkpoint, and the demo through `main`."""

from __future__ import annotations

import pathlib
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mae_jax import train
from tests.conftest import run_main, tiny_train_config


def test_train_steps_on_mock_imagenet(tmp_path: pathlib.Path):
    config = tiny_train_config(**{"dataset.source": "tfds", "dataset.name": "imagenet2012"})
    with tfds.testing.mock_data(num_examples=16):
        state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 2
    assert (tmp_path / "checkpoints" / "2").is_dir()
    assert (tmp_path / "reconstruction.png").is_file()
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_restart_resumes_from_the_newest_checkpoint(tmp_path: pathlib.Path):
    config = tiny_train_config(total_steps=4, checkpoint_every_steps=2)
    uninterrupted = train.train_and_evaluate(config, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]
    shutil.rmtree(tmp_path / "checkpoints" / "4")  # as if the run died after step 2's save
    resumed = train.train_and_evaluate(config, str(tmp_path))
    assert int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(uninterrupted.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_demo_config_runs_through_main(tmp_path: pathlib.Path):
    result = run_main(tmp_path, "--config.total_steps=3", "--config.log_every_steps=1", "--config.batch_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[3]" in result.stderr and "loss=" in result.stderr
    assert (tmp_path / "checkpoints" / "3").is_dir() and (tmp_path / "reconstruction.png").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.mask_ratio=1.0", "error: mask_ratio=1.0 must be in [0, 1)"),
        ("--config.mask_ration=0.5", 'error: bad config override: unknown key mask_ration; Did you mean "mask_ratio"'),
    ],
)
def test_main_reports_bad_config_in_one_line(tmp_path: pathlib.Path, override: str, message: str):
    result = run_main(tmp_path, override)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()
