"""The training loop end to end: mocked tfds, resuming from a checkpoint, and the demo through `main`."""

from __future__ import annotations

import concurrent.futures
import itertools
import pathlib
import shutil
import time
import types
from collections.abc import Sequence

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


class RecordingEvaluator:
    """An evaluation every `every_steps` steps that records when it ran in `events`; like a real one, it waits
    for the state it evaluates."""

    name = "recording"

    def __init__(self, every_steps: int, events: list[str]):
        self.every_steps, self.events = every_steps, events

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every_steps == 0 or step == total_steps

    def run(self, model) -> dict[str, float]:
        jax.block_until_ready(model)
        self.events.append("evaluate")
        return {"recorded": 1.0}


def bookkeeper(
    workdir: pathlib.Path,
    writer: RecordingWriter,
    *,
    start_step: int,
    flops_per_step: float,
    evaluators: Sequence[RecordingEvaluator] = (),
    **overrides,
) -> loop.Bookkeeper:
    """A Bookkeeper of a 50-step run of the tiny config, checkpointing into `workdir`/checkpoints; its
    `evaluators` get the state as their model."""
    from etils import epath

    from mae_jax import checkpointing, input_pipeline

    config = tiny_train_config(checkpoint_every_steps=100, **overrides)
    manager = checkpointing.make_manager(epath.Path(workdir) / "checkpoints", 2)
    return loop.Bookkeeper(
        config, manager, writer, input_pipeline.SkippedImages(),
        start_step=start_step, total_steps=50, workdir=workdir, flops_per_step=flops_per_step,
        run_record=config.to_dict(), evaluators=evaluators, model_of=lambda state: state,
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


class QueuedArray:
    """A stand-in for an array a dispatched step returns: ready (`block_until_ready`, `jax.device_get`) once the
    step is `done` on the device, as JAX's asynchronous dispatch has it."""

    def __init__(self, done: concurrent.futures.Future, value: float = 0.0):
        self.done, self.value = done, value

    def block_until_ready(self) -> QueuedArray:
        self.done.result()
        return self

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        self.done.result()
        return np.asarray(self.value, dtype)


STEP_SECONDS = 0.1


def test_step_time_keeps_the_queued_steps_an_evaluation_waits_for(tmp_path: pathlib.Path):
    """An evaluation at a step that does not log first waits for the steps still queued: that wait is training
    time. The stand-in device runs each step as a STEP_SECONDS sleep, one after another in dispatch order, so
    every logged step time is at least STEP_SECONDS however fast or loaded the machine is."""
    writer, events = RecordingWriter(), []
    books = bookkeeper(tmp_path, writer, start_step=0, flops_per_step=1.0, log_every_steps=4,
                       evaluators=[RecordingEvaluator(3, events)])  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as device, books:
        for step in range(1, 5):
            done = device.submit(time.sleep, STEP_SECONDS)  # dispatched: runs after the steps before it
            state = QueuedArray(done)
            books.record(step, state, {key: QueuedArray(done, value) for key, value in FINITE_METRICS.items()})
            books.save(step, state)
            books.evaluate(step, state)
    assert events == ["evaluate"] and sorted(writer.scalars) == [3, 4]  # the evaluation at 3, the summary at 4
    assert writer.scalars[4]["step_time_s"] >= STEP_SECONDS


def test_preempted_at_an_evaluation_step_saves_and_stops_without_evaluating(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
):
    """The grace period after SIGTERM (30-120 s) is for the save: the evaluation due at that step does not run."""
    from mae_jax import checkpointing

    events: list[str] = []
    save = checkpointing.save

    def recorded_save(manager, step: int, *args) -> None:
        events.append(f"save {step}")
        save(manager, step, *args)

    monkeypatch.setattr(checkpointing, "save", recorded_save)
    monkeypatch.setattr(checkpointing.PreemptionWatch, "reached", lambda self, manager, step: step == 2)
    books = bookkeeper(tmp_path, RecordingWriter(), start_step=0, flops_per_step=1.0, log_every_steps=100,
                       evaluators=[RecordingEvaluator(2, events)])  # fmt: skip
    state = loop.TrainState(step=np.zeros((), np.int32), params={"w": np.ones(2)}, fixed={"p": np.ones(1)},
                            opt_state={"count": np.zeros((), np.int32)})  # fmt: skip
    stand_in = types.SimpleNamespace(train_step=lambda state, image: (state, FINITE_METRICS), batch_keys=("image",))
    with pytest.raises(loop.Preempted) as preempted:
        loop.train(books, stand_in, state, itertools.repeat({"image": np.zeros(1)}))
    assert events == ["save 2"] and books.manager.latest_step() == 2
    assert str(preempted.value).endswith("(the evaluations due at this step did not run: recording)")


def test_mfu_uses_the_configured_peak_and_without_one_the_log_says_how_to_give_it(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
):
    state = np.zeros(())
    with caplog.at_level("INFO"):
        with bookkeeper(tmp_path / "tabled", RecordingWriter(), start_step=0, flops_per_step=1.0):
            pass  # no peak is tabled for CPUs
        unknown = [record.getMessage() for record in caplog.records if "MFU" in record.getMessage()]
        caplog.clear()
        writer = RecordingWriter()
        with bookkeeper(tmp_path / "given", writer, start_step=0, flops_per_step=4e12, log_every_steps=2,
                        peak_tflops=50.0) as books:  # fmt: skip
            for step in (1, 2):
                books.record(step, state, FINITE_METRICS)
    kind = jax.devices()[0].device_kind
    assert len(unknown) == 1 and unknown[0].startswith(f"MFU is not reported: no peak TFLOP/s is known for device "
                                                       f"kind {kind!r}; pass --config.peak_tflops=")  # fmt: skip
    assert not [record for record in caplog.records if "MFU" in record.getMessage()]
    summary = writer.scalars[2]
    assert summary["mfu"] == pytest.approx(summary["tflops_per_device"] / 50.0)


def test_negative_peak_tflops_is_refused_in_one_line():
    from mae_jax import configuration

    with pytest.raises(configuration.ConfigError, match=r"^peak_tflops=-1.0 must be > 0 \(TFLOP/s per device\)"):
        configuration.validate(tiny_train_config(peak_tflops=-1.0))
