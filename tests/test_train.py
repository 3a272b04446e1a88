"""The training loop end to end: mocked tfds, resuming from a checkpoint, and the demo through `main`."""

from __future__ import annotations

import pathlib
import shutil
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mae_jax import loop, train
from tests.conftest import TINY_MAIN_FLAGS, run_main, tiny_train_config


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


def test_restarted_run_loads_its_compiled_step_from_the_workdir(tmp_path: pathlib.Path, monkeypatch):
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # cache even this quick compile
    monkeypatch.setenv("JAX_LOG_COMPILES", "1")  # logs cache hits
    hit = "Persistent compilation cache hit for 'jit_train_step'"
    flags = (*TINY_MAIN_FLAGS, "--config.total_steps=2", "--config.checkpoint_every_steps=1")
    first = run_main(tmp_path, *flags)
    assert first.returncode == 0, first.stderr[-3000:]
    assert hit not in first.stderr and list((tmp_path / "compilation_cache").glob("jit_train_step-*"))
    shutil.rmtree(tmp_path / "checkpoints" / "2")  # as if preempted after step 1's save
    second = run_main(tmp_path, *flags)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restored step 1" in second.stderr and hit in second.stderr


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


class RecordingWriter:
    def __init__(self):
        self.scalars: dict[int, dict[str, float]] = {}

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.scalars[step] = dict(scalars)

    def flush(self) -> None:
        pass


FINITE_METRICS = {"loss": np.float32(1.0), "grad_norm": np.float32(2.0), "lr": np.float32(1e-3)}


def bookkeeper(
    workdir: pathlib.Path, writer: RecordingWriter, *, start_step: int, flops_per_step: float, **overrides
) -> loop.Bookkeeper:
    """A Bookkeeper of a 50-step run of the tiny config, checkpointing into `workdir`/checkpoints."""
    from etils import epath

    from mae_jax import checkpointing, input_pipeline

    config = tiny_train_config(checkpoint_every_steps=100, **overrides)
    manager = checkpointing.make_manager(epath.Path(workdir) / "checkpoints", 2)
    return loop.Bookkeeper(
        config, manager, writer, input_pipeline.SkippedImages(),
        start_step=start_step, total_steps=50, workdir=workdir, flops_per_step=flops_per_step,
        run_record=config.to_dict(),
    )  # fmt: skip


def test_bookkeeper_summarizes_times_without_evaluations_and_guards_before_saving(tmp_path: pathlib.Path):
    writer = RecordingWriter()
    books = bookkeeper(tmp_path, writer, start_step=0, flops_per_step=4e12, log_every_steps=2, skip_nonfinite_steps=0)
    state = np.zeros(())  # what `record` waits on; no checkpoint falls due in this test
    with books:
        for step in range(1, 5):
            books.record(step, state, {**FINITE_METRICS, "loss": np.float32(step)})
        assert sorted(writer.scalars) == [2, 4] and writer.scalars[4]["loss"] == 3.5  # mean of steps 3, 4
        summary = writer.scalars[4]
        assert {"step_time_s", "images_per_sec", "eta_hours", "skipped_steps", "skipped_images"} <= set(summary)
        assert summary["tflops_per_device"] == pytest.approx(4 / summary["step_time_s"] / jax.device_count())
        assert "mfu" not in summary  # no peak is tabled for CPUs
        books.record(5, state, FINITE_METRICS)
        with books.untimed():
            time.sleep(0.3)  # an evaluation
        books.record(6, state, FINITE_METRICS)
        assert writer.scalars[6]["step_time_s"] < 0.1
        books.record(7, state, {**FINITE_METRICS, "loss": np.float32(np.nan)})
        with pytest.raises(loop.NonFiniteError, match="at step 7"):
            books.record(8, state, FINITE_METRICS)  # the guard looks at every step before the summary of step 8
    assert books.manager.latest_step() is None


@pytest.mark.parametrize("last_step", [20, 16], ids=["whole", "cut_short"])
def test_bookkeeper_traces_profile_steps_after_a_restart(tmp_path: pathlib.Path, last_step: int):
    traces = lambda: list((tmp_path / "plugins" / "profile").glob("*/*.xplane.pb"))  # noqa: E731
    start = 10  # as if resumed at step 10: the trace holds steps 15-17
    books = bookkeeper(tmp_path, RecordingWriter(), start_step=start, flops_per_step=1.0, log_every_steps=100,
                       profile_steps=3)  # fmt: skip
    with books:
        for step in range(start + 1, last_step + 1):
            state = jax.jit(lambda x: x @ x)(np.full((64, 64), step, np.float32))
            books.record(step, state, FINITE_METRICS)
            assert bool(traces()) == (step >= start + loop.PROFILE_AFTER_STEPS + 2), step
    assert len(traces()) == 1  # a loop that ends inside the traced steps still writes its trace
