"""MAE pretraining: set-up, restore, the jitted step, the loop, the final save."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers
from etils import epath
from flax import nnx

from mae_jax import checkpointing, configuration, flops, input_pipeline, optim, reconstruction, sharding
from mae_jax.evaluators.knn import KnnEvaluator
from mae_jax.models.mae import MAE, MAEConfig
from mae_jax.models.vit import FixedEmbedding

ENCODER_DIR = "encoder"
PROFILE_AFTER_STEPS = 5  # a trace starts this many steps after the first of a (re)start: past the compile


class Preempted(RuntimeError):
    """The run was asked to stop (SIGTERM, TPU maintenance); its state is saved at the current step."""


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient; the message names the step and the setting that skips it on a rerun.

    Nothing from that step on is saved, and `skip_nonfinite_steps` may change across a resume.
    """


class NonFiniteGuard:
    """Stops the run at a non-finite loss or gradient norm, before the state that follows is saved.

    With `skip_steps` > 0 the optimizer (`optax.apply_if_finite`) drops such updates, and the run stops
    only when more than `skip_steps` of them come in a row (the optimizer would then apply them).
    """

    def __init__(self, skip_steps: int):
        self.skip_steps = skip_steps
        self.skipped = 0
        self._in_a_row = 0

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


class Bookkeeper:
    """What every training loop does around its step, shared by pretraining and the downstream loops.

    Times steps (neither the compile nor evaluations) and reports model TFLOP/s per device (and MFU on devices
    in `flops.PEAK_TFLOPS`) from the step's `flops_per_step`, shows every step's metrics to the `NonFiniteGuard`
    before any later state is saved, writes averaged summaries every `log_every_steps`, saves a checkpoint
    with `run_record` (the config and what it resolved to, which a resume checks) every
    `checkpoint_every_steps`, at the end and when preempted, then stops a preempted run; on process 0 it
    traces `profile_steps` steps into `workdir`. As a context manager it lets the saves already started
    complete, also when the loop ends in an error.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        manager: ocp.CheckpointManager,
        writer: metric_writers.MetricWriter,
        skipped: input_pipeline.SkippedImages,
        *,
        start_step: int,
        total_steps: int,
        workdir: epath.PathLike,
        flops_per_step: float,
        run_record: dict,
    ):
        self.config, self.manager, self.writer, self.skipped = config, manager, writer, skipped
        self.run_record = run_record
        self.start_step, self.total_steps = start_step, total_steps
        self.flops_per_device = flops_per_step / jax.device_count()
        self.peak_tflops = flops.peak_tflops(jax.devices()[0], config.model.dtype)
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

    def record(self, step: int, state: TrainState, metrics: dict[str, jax.Array]) -> None:
        """After step `step` is dispatched: timing, the guard and the summary, as due."""
        self._unchecked.append(metrics)
        if step + 1 == self._profiled_steps.start:  # steps run asynchronously: start once the last one is done
            with self.untimed():
                jax.block_until_ready(state)
                jax.profiler.start_trace(self.workdir)
                self._profiling = True
        elif step == self._profiled_steps.stop - 1:
            with self.untimed():
                jax.block_until_ready(state)
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
        summary = {k: float(np.nanmean([m[k] for m in window])) for k in ("loss", "grad_norm")}
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

    def save(self, step: int, state: TrainState) -> None:
        """Checkpoint step `step` if due; after a preemption's save, stop the run (`Preempted`)."""
        if self._save_now and self.manager.latest_step() != step:
            checkpointing.save(self.manager, step, state, self.run_record)
        if self._preempted:
            self.manager.wait_until_finished()
            self.writer.flush()
            raise Preempted(f"preempted at step {step}: saved {self.manager.directory}/{step}; rerun to resume")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # trained
    fixed: nnx.State  # saved with the model, not trained: position tables (and BatchNorm, a probed encoder)
    opt_state: optax.OptState


def init_train_state(model_config: MAEConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
    model = MAE(model_config, rngs=nnx.Rngs(params=seed))
    _, params, fixed = nnx.split(model, nnx.Param, FixedEmbedding)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, fixed=fixed, opt_state=tx.init(params))


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    mask_ratio: float,
    seed: int,
    *,
    grad_accum_steps: int = 1,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """One AdamW step; the masking noise is a function of (seed, step) alone, so resumed runs redraw it.

    With `grad_accum_steps` = k the batch runs as k micro-batches (micro-batch j holds every k-th image, so
    each stays spread over all devices) and their gradients are averaged. The noise is drawn for the whole
    batch and every image loses the same number of patches, so this is the whole batch's loss and gradient
    at 1/k of the activation memory. On a `mesh` with an fsdp axis the model keeps activations split along
    the batch (`models.vit.split_batch`), so FSDP gathers weights, never activations. Without FSDP the
    constraints are left out: XLA keeps the batch split by itself, and on CPU they cost ~10% speed.
    """
    noise_key = jax.random.key(seed + 1)

    def train_step(state: TrainState, images: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        def loss_fn(params: nnx.State, images: jax.Array, noise: jax.Array) -> jax.Array:
            model = nnx.merge(graphdef, params, state.fixed)
            return model(input_pipeline.normalize(images), mask_ratio, noise=noise).loss

        model = nnx.merge(graphdef, state.params, state.fixed)
        noise = model.draw_noise(jax.random.fold_in(noise_key, state.step), images.shape[0])
        grad_fn = jax.value_and_grad(loss_fn)
        if grad_accum_steps == 1:
            loss, grads = grad_fn(state.params, images, noise)
        else:

            def micro_batches(x: jax.Array) -> jax.Array:  # (N, ...) -> (k, N/k, ...)
                return x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1)

            def accumulate(total: tuple, batch: tuple[jax.Array, jax.Array]) -> tuple[tuple, None]:
                return jax.tree.map(jnp.add, total, grad_fn(state.params, *batch)), None

            zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros((), jnp.float32), state.params))
            total, _ = jax.lax.scan(accumulate, zeros, (micro_batches(images), micro_batches(noise)))
            loss, grads = jax.tree.map(lambda x: x / grad_accum_steps, total)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
        )
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(state.step)}

    if mesh is None or mesh.shape[sharding.FSDP_AXIS] == 1:
        return train_step

    def train_step_on_mesh(state: TrainState, images: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return train_step(state, images)

    return train_step_on_mesh


def schedule_steps(config: ml_collections.ConfigDict, num_examples: int) -> tuple[int, int]:
    """(total_steps, warmup_steps) from the config's epochs, or its explicit step counts."""
    steps_per_epoch = max(1, num_examples // config.batch_size)
    total = config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
    warmup = config.warmup_steps if config.warmup_steps >= 0 else config.warmup_epochs * steps_per_epoch
    if warmup >= total:
        logging.warning("warmup of %d steps is not shorter than the run (%d steps); using %d", warmup, total, total - 1)
        warmup = total - 1
    return total, warmup


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Pretrain an MAE as `config` says, writing summaries and checkpoints to `workdir`."""
    # ------------------------------------------------------------------------------------------------
    # Set-up: everything that can fail on bad input fails here, before compiling.
    # ------------------------------------------------------------------------------------------------
    configuration.validate(config)
    model_config = configuration.model_config(config)
    workdir = epath.Path(workdir)
    checkpointing.check_writable(workdir)
    manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
    checkpointing.check_same_model(manager, config.to_dict())
    source = input_pipeline.make_source(config.dataset)
    total_steps, warmup_steps = schedule_steps(config, len(source))
    record = checkpointing.run_record(
        config, num_examples=len(source), total_steps=total_steps, warmup_steps=warmup_steps
    )
    checkpointing.check_same_run(manager, record)
    vis_images = input_pipeline.normalize(  # the reconstruction grid's images, the same at every step
        input_pipeline.fixed_eval_images(source, config.num_images, config.image_size)
    )
    lr_schedule = optim.schedule(config, total_steps, warmup_steps)
    tx = optim.make_optimizer(config, lr_schedule)

    mesh = sharding.make_mesh(config.mesh)
    knn = KnnEvaluator(config, mesh) if config.knn.every_steps > 0 else None  # opens the labeled splits
    replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    logging.info("Config:\n%s", config)
    logging.info("Data: %d examples; %d steps (%d warmup) of batch %d", len(source), total_steps, warmup_steps,
                 config.batch_size)  # fmt: skip

    # ------------------------------------------------------------------------------------------------
    # Initialize, or restore the newest checkpoint in the workdir.
    # ------------------------------------------------------------------------------------------------
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MAE(model_config, rngs=nnx.Rngs(0))))
    abstract_state = jax.eval_shape(lambda: init_train_state(model_config, tx, config.seed))
    state_sharding = sharding.train_state_shardings(mesh, abstract_state, tx)  # FSDP: params and their moments
    init = jax.jit(lambda: init_train_state(model_config, tx, config.seed), out_shardings=state_sharding)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sharding
    )
    state = checkpointing.restore_train_state(manager, abstract_state)
    if state is None:
        state = init()
        logging.info("Initialized %s", model_config)
    else:
        logging.info("Restored step %d from %s", int(state.step), manager.directory)
    start_step = int(state.step)

    train_step = jax.jit(
        make_train_step(
            graphdef,
            tx,
            lr_schedule,
            config.mask_ratio,
            config.seed,
            grad_accum_steps=config.grad_accum_steps,
            mesh=mesh,
        ),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )
    reconstruct = reconstruction.make_reconstruct_fn(graphdef, config.mask_ratio)
    vis_noise = jax.random.uniform(jax.random.key(config.seed + 2), (len(vis_images), model_config.encoder.num_patches))

    def reconstruction_grid() -> np.ndarray:
        return reconstruction.grid(np.asarray(reconstruct(state.params, state.fixed, vis_images, vis_noise)))

    # ------------------------------------------------------------------------------------------------
    # Train.
    # ------------------------------------------------------------------------------------------------
    skipped = input_pipeline.SkippedImages()
    rows = input_pipeline.process_rows(batch_sharding, config.batch_size)
    dataset = input_pipeline.train_dataset(source, config, skipped, position=start_step * config.batch_size, rows=rows)
    batches = input_pipeline.device_prefetch(iter(dataset), batch_sharding, image_size=config.image_size)
    train_flops = flops.train_flops(model_config, config.mask_ratio, config.batch_size)
    books = Bookkeeper(
        config, manager, writer, skipped,
        start_step=start_step, total_steps=total_steps, workdir=workdir, flops_per_step=train_flops, run_record=record,
    )  # fmt: skip
    with books:
        for step in range(start_step + 1, total_steps + 1):
            batch = next(batches)
            state, metrics = train_step(state, batch["image"])
            books.record(step, state, metrics)
            if knn and (step % config.knn.every_steps == 0 or step == total_steps):
                with books.untimed():
                    writer.write_scalars(step, knn.evaluate(nnx.merge(graphdef, state.params, state.fixed).encoder))
            if step % config.image_every_steps == 0 and step != total_steps:  # the last one is written below
                writer.write_images(step, {"reconstruction": reconstruction_grid()[None]})
            books.save(step, state)

    # ------------------------------------------------------------------------------------------------
    # Final: reconstruction grid, encoder export.
    # ------------------------------------------------------------------------------------------------
    final_grid = reconstruction_grid()
    writer.write_images(total_steps, {"reconstruction": final_grid[None]})
    if jax.process_index() == 0:
        reconstruction.save_png(workdir / "reconstruction.png", final_grid)
    final_step = int(state.step)
    if checkpointing.exported_step(workdir / ENCODER_DIR) != final_step:  # none yet, or of an earlier step
        checkpointing.export_encoder(workdir / ENCODER_DIR, model_config, state.params, state.fixed, step=final_step)
        logging.info("Exported the encoder of step %d to %s", final_step, workdir / ENCODER_DIR)
    writer.flush()
    return state
