"""The training-loop library that pretraining (`train.py`) and the downstream loops (`finetune.py`) share.

A task builds its step once from (config, mesh) as an `Assembly`: the jitted init and step with their
shardings, the state layout a checkpoint restores into, and the step's FLOPs. `restore_or_init` starts a run
from it, and the `Bookkeeper` does everything around each step: timing, the non-finite guard, summaries,
evaluations, checkpoints, preemption and profiling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from mae_jax import checkpointing, flops, input_pipeline, optim, sharding, summaries
from mae_jax.evaluators import Evaluator
from mae_jax.evaluators.reconstruction import save_png

PROFILE_AFTER_STEPS = 5  # a trace starts this many steps after the first of a (re)start: past the compile


class Preempted(RuntimeError):
    """The run was asked to stop (SIGTERM, TPU maintenance); its state is saved at the current step."""


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient; the message names the step and the setting that skips it on a rerun.

    Nothing from that step on is saved, and `skip_nonfinite_steps` may change across a resume.
    """


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # trained
    fixed: nnx.State  # saved with the model, not trained: position tables (and BatchNorm, a probed encoder)
    opt_state: optax.OptState


def schedule_steps(config: ml_collections.ConfigDict, num_examples: int) -> tuple[int, int]:
    """(total_steps, warmup_steps) from the config's epochs, or its explicit step counts."""
    steps_per_epoch = max(1, num_examples // config.batch_size)
    total = config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
    warmup = config.warmup_steps if config.warmup_steps >= 0 else config.warmup_epochs * steps_per_epoch
    if warmup >= total:
        logging.warning("warmup of %d steps is not shorter than the run (%d steps); using %d", warmup, total, total - 1)
        warmup = total - 1
    return total, warmup


def open_workdir(
    config: ml_collections.ConfigDict, workdir: str, *, num_examples: int, total_steps: int, warmup_steps: int
) -> tuple[epath.Path, ocp.CheckpointManager, dict]:
    """The workdir, checked writable now (not at the first save hours later), its checkpoint manager, and the
    run's record (`checkpointing.run_record`) of a run on `num_examples` training examples.

    A checkpoint there of another model or recipe is refused (`checkpointing.check_same_model`,
    `check_same_run`). Open it last in the set-up: what else can fail on bad input then fails before the
    workdir is touched.
    """
    workdir = epath.Path(workdir)
    checkpointing.check_writable(workdir)
    manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
    checkpointing.check_same_model(manager, config.to_dict())
    record = checkpointing.run_record(
        config, num_examples=num_examples, total_steps=total_steps, warmup_steps=warmup_steps
    )
    checkpointing.check_same_run(manager, record)
    return workdir, manager, record


# ---------------------------------------------------------------------------------------------------
# A task's step, assembled
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Assembly:
    """Everything a task's step needs, built once from (config, mesh) by the task's `assemble`.

    The loop runs it, the benchmark times it and the sharding tests inspect it: all three compile the same
    program.
    """

    model_config: Any
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    state_sharding: Any
    abstract_state: Any  # shapes, dtypes and shardings of the state: what a checkpoint restores into
    init: Callable[[], TrainState]  # jitted: a fresh state, laid out on the mesh
    train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]  # jitted (state, *batch); donates the state
    batch_keys: tuple[str, ...]  # the batch entries the step takes after the state, in order
    flops_per_step: float  # model FLOPs (`flops.py`)
    description: str  # one line for logs and the benchmark

    @property
    def batch_sharding(self) -> jax.sharding.NamedSharding:
        return sharding.batch_sharding(self.mesh)

    def model(self, state: TrainState) -> nnx.Module:
        return nnx.merge(self.graphdef, state.params, state.fixed)


def assemble(
    *,
    model_config: Any,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    init_state: Callable[..., TrainState],
    init_args: tuple = (),
    train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
    batch_keys: tuple[str, ...],
    flops_per_step: float,
    description: str,
) -> Assembly:
    """Lay `init_state(*init_args)` and `train_step` out on `mesh`: FSDP shards the parameters and their
    optimizer moments (`sharding.train_state_shardings`), batches are split over every device, and the step
    donates the state it replaces. `init_args` are arguments, not constants folded into the program (a
    pretrained encoder)."""
    abstract_state = jax.eval_shape(init_state, *init_args)
    state_sharding = sharding.train_state_shardings(mesh, abstract_state, tx)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sharding
    )
    init = jax.jit(init_state, out_shardings=state_sharding)
    batch_sharding = sharding.batch_sharding(mesh)
    return Assembly(
        model_config=model_config,
        graphdef=graphdef,
        tx=tx,
        lr_schedule=lr_schedule,
        mesh=mesh,
        state_sharding=state_sharding,
        abstract_state=abstract_state,
        init=lambda: init(*init_args),
        train_step=jax.jit(
            train_step,
            in_shardings=(state_sharding, *[batch_sharding] * len(batch_keys)),
            out_shardings=(state_sharding, sharding.replicated(mesh)),
            donate_argnums=0,
        ),
        batch_keys=batch_keys,
        flops_per_step=flops_per_step,
        description=description,
    )


def restore_or_init(manager: ocp.CheckpointManager, assembly: Assembly) -> TrainState:
    """The newest checkpoint in the workdir, or a fresh state; never a fresh state over an unreadable one
    (`checkpointing.restore_train_state` raises)."""
    state = checkpointing.restore_train_state(manager, assembly.abstract_state)
    if state is None:
        state = assembly.init()
        logging.info("Initialized %s", assembly.model_config)
    else:
        logging.info("Restored step %d from %s", int(state.step), manager.directory)
    return state


def train(
    books: Bookkeeper, assembly: Assembly, state: TrainState, batches: Iterator[dict[str, jax.Array]]
) -> TrainState:
    """Steps `books.start_step + 1` to `books.total_steps` on `batches`, with the bookkeeping around each.

    A step's checkpoint is saved before its evaluations run: a preempted run saves within its grace period
    (30-120 s), and stops without them.
    """
    with books:
        books.guard.resume(optim.nonfinite_streak(state.opt_state))
        for step in range(books.start_step + 1, books.total_steps + 1):
            batch = next(batches)
            state, metrics = assembly.train_step(state, *(batch[key] for key in assembly.batch_keys))
            books.record(step, state, metrics)
            books.save(step, state)
            books.evaluate(step, state)
    return state


# ---------------------------------------------------------------------------------------------------
# Around every step
# ---------------------------------------------------------------------------------------------------
class NonFiniteGuard:
    """Stops the run at a non-finite loss or gradient norm, before the state that follows is saved.

    With `skip_steps` > 0 the optimizer (`optax.apply_if_finite`) drops such updates, and the run stops
    only when more than `skip_steps` of them come in a row (the optimizer would then apply them). A streak
    may span a resume: `resume` continues the optimizer's count, which its checkpoint restored.
    """

    def __init__(self, skip_steps: int):
        self.skip_steps = skip_steps
        self.skipped = 0
        self._in_a_row = 0

    def resume(self, in_a_row: int) -> None:
        """Continue a streak of `in_a_row` non-finite steps that ended the restored run (`optim.nonfinite_streak`)."""
        self._in_a_row = in_a_row
        if in_a_row:
            logging.warning(
                "The restored state ends with %d non-finite steps in a row (skipped); the run stops at the next "
                "one if that makes more than skip_nonfinite_steps=%d",
                in_a_row,
                self.skip_steps,
            )

    def check(self, first_step: int, history: list[dict[str, np.ndarray]]) -> None:
        for step, metrics in enumerate(history, first_step):
            if np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]):
                self._in_a_row = 0
                continue
            self.skipped += 1
            self._in_a_row += 1
            if self._in_a_row > self.skip_steps:
                raise NonFiniteError(
                    f"non-finite loss ({metrics['loss']}) or gradient norm ({metrics['grad_norm']}) at step {step}"
                    f" ({self._in_a_row} in a row, skip_nonfinite_steps={self.skip_steps}); stopped without saving"
                    f" it. Rerun with --config.skip_nonfinite_steps={self._in_a_row} or more to resume from the"
                    " newest checkpoint and skip such steps"
                )


def _mean_without_nan(values: Sequence[np.ndarray]) -> float:
    """The mean of `values` without their NaNs (skipped steps); NaN where all are, without numpy's warning."""
    values = np.asarray(values, np.float64)
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


class Bookkeeper:
    """What every training loop does around its step, shared by pretraining and the downstream loops.

    Times steps (neither the compile nor evaluations) and reports model TFLOP/s per device from the step's
    `flops_per_step`, and MFU against `config.peak_tflops` or the device kind's `flops.PEAK_TFLOPS` entry.
    It shows every step's metrics to the `NonFiniteGuard` before any later state is saved, writes averaged
    summaries every `log_every_steps`, saves a checkpoint with `run_record` (the config and what it resolved
    to, which a resume checks) every `checkpoint_every_steps`, at the end and when preempted, then stops a
    preempted run, and runs the `evaluators` that are due on the model `model_of(state)`; on process 0 it
    traces `profile_steps` steps into `workdir`. As a context manager it lets the saves already started
    complete, also when the loop ends in an error.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        manager: ocp.CheckpointManager,
        writer: summaries.Writer,
        skipped: input_pipeline.SkippedImages,
        *,
        start_step: int,
        total_steps: int,
        workdir: epath.PathLike,
        flops_per_step: float,
        run_record: dict,
        evaluators: Sequence[Evaluator] = (),
        model_of: Callable[[TrainState], nnx.Module] | None = None,
    ):
        self.config, self.manager, self.writer, self.skipped = config, manager, writer, skipped
        self.run_record = run_record
        self.start_step, self.total_steps = start_step, total_steps
        self.evaluators, self.model_of = evaluators, model_of
        self.results: dict[str, float | np.ndarray] = {}  # of the last evaluations
        self._evaluated_step: int | None = None
        self.flops_per_device = flops_per_step / jax.device_count()
        self.peak_tflops = config.peak_tflops or flops.peak_tflops(jax.devices()[0], config.model.dtype)
        if not self.peak_tflops:
            logging.info(
                "MFU is not reported: no peak TFLOP/s is known for device kind %r; pass --config.peak_tflops=<its"
                " dense %s matmul peak per device> to report it", jax.devices()[0].device_kind, config.model.dtype
            )  # fmt: skip
        self.guard = NonFiniteGuard(config.skip_nonfinite_steps)
        self.preemption = checkpointing.PreemptionWatch()
        self._unchecked: list[dict[str, jax.Array]] = []  # device metrics not yet looked at by the guard
        self._window: list[dict[str, float]] = []  # host metrics since the last summary
        self._last_time, self._last_step = time.perf_counter(), start_step
        self._save_now = self._preempted = False
        self.workdir = workdir
        self._profiling = False
        self._profiled_steps = range(0)  # steps whose work the trace holds, on process 0
        if config.profile_steps > 0 and jax.process_index() == 0:
            first = start_step + PROFILE_AFTER_STEPS
            self._profiled_steps = range(first, first + config.profile_steps)

    def __enter__(self) -> Bookkeeper:
        return self

    def __exit__(self, *exc_info) -> None:
        self.preemption.close()
        self._stop_profile()
        self.manager.wait_until_finished()
        self.writer.flush()  # closes the event file: left open, its writer's exit hook fails on Python 3.12

    def record(self, step: int, state: TrainState, metrics: dict[str, jax.Array]) -> None:
        """After step `step` is dispatched: timing, the guard and the summary, as due."""
        self._unchecked.append(metrics)
        if step + 1 == self._profiled_steps.start:  # steps run asynchronously: start once the last one is done
            jax.block_until_ready(state)  # outside `untimed`: waiting for the queued steps is their time
            with self.untimed():
                jax.profiler.start_trace(self.workdir)
                self._profiling = True
        elif step == self._profiled_steps.stop - 1:
            jax.block_until_ready(state)
            with self.untimed():
                self._stop_profile()
        if step == self.start_step + 1:  # time steps, not the compile
            jax.block_until_ready(state)
            self._last_time, self._last_step = time.perf_counter(), step
        config, last = self.config, step == self.total_steps
        self._preempted = self.preemption.reached(self.manager, step)
        log_now = step % config.log_every_steps == 0 or last
        self._save_now = step % config.checkpoint_every_steps == 0 or last or self._preempted
        if log_now or self._save_now:  # the guard sees every step before anything is saved
            fetched = jax.device_get(self._unchecked)
            self.guard.check(step - len(fetched) + 1, fetched)
            self._window, self._unchecked = self._window + fetched, []
        if log_now:
            self._write_summary(step)

    def _write_summary(self, step: int) -> None:
        window = self._window
        summary = {k: _mean_without_nan([m[k] for m in window]) for k in ("loss", "grad_norm")}
        summary |= {"lr": float(window[-1]["lr"]), "skipped_images": self.skipped.count}
        summary |= {"skipped_steps": self.guard.skipped}
        now = time.perf_counter()
        if step > self._last_step:  # the first step (the compile) is not timed
            step_time = (now - self._last_time) / (step - self._last_step)
            tflops = self.flops_per_device / step_time / 1e12
            summary |= {
                "step_time_s": step_time,
                "images_per_sec": self.config.batch_size / step_time,
                "tflops_per_device": tflops,
                "eta_hours": (self.total_steps - step) * step_time / 3600,
            }
            if self.peak_tflops:
                summary["mfu"] = tflops / self.peak_tflops
        self.writer.write_scalars(step, summary)
        self._window, self._last_time, self._last_step = [], now, step

    def _stop_profile(self) -> None:
        if self._profiling:
            jax.profiler.stop_trace()
            self._profiling = False
            steps = self._profiled_steps
            logging.info("Wrote a trace of steps %d-%d to %s", steps.start, steps.stop - 1, self.workdir)

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """Evaluations inside this block do not count as training time in `step_time_s`."""
        start = time.perf_counter()
        yield
        self._last_time += time.perf_counter() - start

    def evaluate(self, step: int, state: TrainState, *, every: bool = False) -> None:
        """Run the evaluators due at `step` (all of them with `every`), untimed, and write what they return:
        numbers as scalars, arrays as images."""
        due = [i for i, e in enumerate(self.evaluators) if every or e.due(step, self.total_steps)]
        if not due:
            return
        jax.block_until_ready(state)  # the steps still queued are training time, not the evaluation's
        with self.untimed():
            model = self.model_of(state)
            results = [self.evaluators[i].run(model) for i in due]
        self._evaluated_step, self.results = step, {k: v for result in results for k, v in result.items()}
        scalars = {k: v for k, v in self.results.items() if not isinstance(v, np.ndarray)}
        images = {k: v[None] for k, v in self.results.items() if isinstance(v, np.ndarray)}
        if scalars:
            self.writer.write_scalars(step, scalars)
        if images:
            self.writer.write_images(step, images)

    def finish(self, state: TrainState) -> dict[str, float | np.ndarray]:
        """The evaluations of the last step (where every evaluator is due), run now if this process did not
        (a run resumed at its end); their images are also written as `WORKDIR/<name>.png` by process 0."""
        if self._evaluated_step != self.total_steps:
            self.evaluate(self.total_steps, state, every=True)
        if jax.process_index() == 0:
            for name, value in self.results.items():
                if isinstance(value, np.ndarray):
                    save_png(epath.Path(self.workdir) / f"{name}.png", value)
        self.writer.flush()
        return self.results

    def save(self, step: int, state: TrainState) -> None:
        """Checkpoint step `step` if due; after a preemption's save, stop the run (`Preempted`) without the
        evaluations due at `step`: the grace period is for the save."""
        if self._save_now and self.manager.latest_step() != step:
            checkpointing.save(self.manager, step, state, self.run_record)
        if self._preempted:
            self.manager.wait_until_finished()
            self.writer.flush()
            skipped = [e.name for e in self.evaluators if e.due(step, self.total_steps)]
            raise Preempted(
                f"preempted at step {step}: saved {self.manager.directory}/{step}; rerun to resume"
                + (f" (the evaluations due at this step did not run: {', '.join(skipped)})" if skipped else "")
            )
