"""MAE pretraining: the step (`assemble`), and the loop from set-up to the exported encoder."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from mae_jax import checkpointing, configuration, evaluators, flops, input_pipeline, loop, optim, sharding, summaries
from mae_jax.loop import TrainState
from mae_jax.models.mae import MAE, MAEConfig
from mae_jax.models.vit import FixedEmbedding

ENCODER_DIR = "encoder"


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
    stats: input_pipeline.PixelStats = input_pipeline.IMAGENET_STATS,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """One AdamW step; the masking noise is a function of (seed, step) alone, so resumed runs redraw it.

    With `grad_accum_steps` = k the batch runs as k micro-batches (micro-batch j holds every k-th image, so
    each stays spread over all devices) and their gradients are averaged. The noise is drawn for the whole
    batch and every image loses the same number of patches, so this is the whole batch's loss and gradient
    at 1/k of the activation memory. On a `mesh` with an fsdp axis the model keeps activations split along
    the batch (`sharding.on_mesh`), so FSDP gathers weights, never activations.
    """
    noise_key = jax.random.key(seed + 1)

    def train_step(state: TrainState, images: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        def loss_fn(params: nnx.State, images: jax.Array, noise: jax.Array) -> jax.Array:
            model = nnx.merge(graphdef, params, state.fixed)
            return model(input_pipeline.normalize(images, stats), mask_ratio, noise=noise).loss

        model = nnx.merge(graphdef, state.params, state.fixed)
        noise = model.draw_noise(jax.random.fold_in(noise_key, state.step), images.shape[0], mask_ratio)
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
        lr = optim.applied_learning_rate(state.opt_state, lr_schedule)  # skipped steps do not advance it
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr}

    return sharding.on_mesh(train_step, mesh)


def assemble(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, total_steps: int, warmup_steps: int
) -> loop.Assembly:
    """The pretraining step for `config` on `mesh`, with a schedule of `total_steps` (`warmup_steps` warmup)."""
    model_config = configuration.model_config(config)
    lr_schedule = optim.schedule(config, total_steps, warmup_steps)
    tx = optim.make_optimizer(config, lr_schedule)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MAE(model_config, rngs=nnx.Rngs(0))))
    step = make_train_step(
        graphdef,
        tx,
        lr_schedule,
        config.mask_ratio,
        config.seed,
        grad_accum_steps=config.grad_accum_steps,
        mesh=mesh,
        stats=input_pipeline.pixel_stats(config.dataset),
    )
    m = config.model
    return loop.assemble(
        model_config=model_config,
        graphdef=graphdef,
        tx=tx,
        lr_schedule=lr_schedule,
        mesh=mesh,
        init_state=functools.partial(init_train_state, model_config, tx, config.seed),
        train_step=step,
        batch_keys=("image",),
        flops_per_step=flops.train_flops(model_config, config.mask_ratio, config.batch_size),
        description=f"MAE, decoder {m.decoder_depth}x{m.decoder_width}, mask ratio {config.mask_ratio}",
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Pretrain an MAE as `config` says, writing summaries and checkpoints to `workdir`."""
    # ------------------------------------------------------------------------------------------------
    # Set-up: everything that can fail on bad input fails here, before compiling.
    # ------------------------------------------------------------------------------------------------
    configuration.validate(config)
    source = input_pipeline.make_source(config.dataset)
    total_steps, warmup_steps = loop.schedule_steps(config, len(source))
    mesh = sharding.make_mesh(config.mesh)
    evals = evaluators.make_evaluators(config, mesh, source)  # opens their splits: the kNN's labeled ones
    assembly = assemble(config, mesh, total_steps, warmup_steps)
    workdir, manager, record = loop.open_workdir(
        config, workdir, num_examples=len(source), total_steps=total_steps, warmup_steps=warmup_steps
    )
    logging.info("Config:\n%s", config)
    logging.info("Data: %d examples; %d steps (%d warmup) of batch %d", len(source), total_steps, warmup_steps,
                 config.batch_size)  # fmt: skip

    # ------------------------------------------------------------------------------------------------
    # Initialize, or restore the newest checkpoint in the workdir.
    # ------------------------------------------------------------------------------------------------
    state = loop.restore_or_init(manager, assembly)
    start_step = int(state.step)

    # ------------------------------------------------------------------------------------------------
    # Train.
    # ------------------------------------------------------------------------------------------------
    skipped = input_pipeline.SkippedImages()
    rows = input_pipeline.process_rows(assembly.batch_sharding, config.batch_size)
    dataset = input_pipeline.train_dataset(source, config, skipped, position=start_step * config.batch_size, rows=rows)
    batches = input_pipeline.device_prefetch(iter(dataset), assembly.batch_sharding, image_size=config.image_size)
    # Opened last: a run that stops before the loop leaves no event file open (see `Bookkeeper.__exit__`)
    writer = summaries.Writer(workdir if jax.process_index() == 0 else None)  # process 0 writes events
    books = loop.Bookkeeper(
        config, manager, writer, skipped,
        start_step=start_step, total_steps=total_steps, workdir=workdir, flops_per_step=assembly.flops_per_step,
        run_record=record, evaluators=evals, model_of=assembly.model,
    )  # fmt: skip
    state = loop.train(books, assembly, state, batches)

    # ------------------------------------------------------------------------------------------------
    # Final: the last evaluations (reconstruction grid), the encoder export.
    # ------------------------------------------------------------------------------------------------
    books.finish(state)
    final_step = int(state.step)
    if checkpointing.exported_step(workdir / ENCODER_DIR) != final_step:  # none yet, or of an earlier step
        checkpointing.export_encoder(workdir / ENCODER_DIR, assembly.model_config, state.params, state.fixed,
                                     step=final_step)  # fmt: skip
        logging.info("Exported the encoder of step %d to %s", final_step, workdir / ENCODER_DIR)
    return state
