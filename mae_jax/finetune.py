"""Fine-tuning and linear probing of an MAE encoder: the paper's two evaluation protocols.

    python -m mae_jax.main --config=configs/finetune_vit_base.py --workdir=DIR --config.init=PRETRAIN_WORKDIR/encoder
    python -m mae_jax.main --config=configs/linprobe_vit_base.py --workdir=DIR --config.init=mae_pretrain_vit_base.pth

The loop has the pretraining loop's behaviour (async checkpoints with the data position, automatic
resume, preemption, the non-finite guard) and adds top-1/top-5 evaluation on `evals.classification.split`. At the
end the classifier is written as `WORKDIR/classifier.safetensors` in the official (timm) layout, and as
`WORKDIR/classifier.pth` too when PyTorch is installed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from mae_jax import (
    augment,
    configuration,
    convert,
    evaluators,
    flops,
    input_pipeline,
    loop,
    optim,
    pretrained,
    sharding,
    summaries,
)
from mae_jax.convert.official import CLASSIFIER_FILE, CLASSIFIER_PTH_FILE
from mae_jax.loop import TrainState
from mae_jax.models.classifier import FINETUNE, Classifier, ClassifierConfig
from mae_jax.models.vit import Compute, EncoderConfig, resize_position_table, scanned_layout, split_batch


def classifier_config(config: ml_collections.ConfigDict) -> ClassifierConfig:
    m = config.model
    return ClassifierConfig(
        EncoderConfig.from_variant(m.variant, config.image_size, config.num_channels),
        config.num_classes,
        protocol=config.task,
        global_pool=m.global_pool,
        drop_path=m.drop_path,
        compute=Compute(m.dtype, m.attention, m.remat, m.scan_blocks, m.kernels),
    )


def trained_filter(protocol: str) -> nnx.filterlib.Filter:
    """What the optimizer trains: everything when fine-tuning, the head alone when probing."""
    return nnx.Param if protocol == FINETUNE else nnx.All(nnx.Param, nnx.PathContains("head"))


def pretrained_encoder(path: str, model_config: ClassifierConfig) -> nnx.State:
    """The classifier encoder's parameters from the encoder stored at `path`, checked against its shapes.

    The position table is the file's, trained from there on as in the official fine-tuning; for another
    image size than pretraining it is resampled as the official `interpolate_pos_embed` does. Stored
    encoders are unrolled; a classifier with scanned blocks gets them stacked.
    """
    pretrained_config, state = pretrained.load(path)
    encoder = nnx.State(state["encoder"])
    pure = nnx.to_pure_dict(nnx.filter_state(encoder, nnx.Param))
    if model_config.compute.scan_blocks:
        pure = scanned_layout(pure)
    table = np.asarray(nnx.to_pure_dict(encoder)["pos_embed"])
    pure["pos_embed"] = resize_position_table(table, model_config.encoder.grid_size)
    expected = nnx.eval_shape(lambda: Classifier(model_config, rngs=nnx.Rngs(0))).encoder
    expected = nnx.state(expected, nnx.Param)
    shapes = {path: leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(pure)}
    wanted = {path: leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(expected))}
    if shapes != wanted:
        found, wanted_encoder = pretrained_config.encoder, model_config.encoder
        if found.num_channels != wanted_encoder.num_channels:
            raise configuration.ConfigError(
                f"init={path} holds a ViT of {found.num_channels} input channels; num_channels is "
                f"{wanted_encoder.num_channels}"
            )
        raise configuration.ConfigError(
            f"init={path} holds a ViT of width {found.width}, depth {found.depth} and patch {found.patch_size}; "
            f"model.variant asks for width {wanted_encoder.width}, depth {wanted_encoder.depth} and patch "
            f"{wanted_encoder.patch_size}"
        )
    old_grid, new_grid = pretrained_config.encoder.grid_size, model_config.encoder.grid_size
    if old_grid != new_grid:
        logging.info("Position table resampled (bicubic) from %dx%d to %dx%d", old_grid, old_grid, new_grid, new_grid)
    nnx.replace_by_pure_dict(expected, jax.tree.map(jnp.asarray, pure))
    return expected


def init_train_state(
    model_config: ClassifierConfig, tx: optax.GradientTransformation, seed: int, encoder: nnx.State | None
) -> TrainState:
    model = Classifier(model_config, rngs=nnx.Rngs(params=seed))
    if encoder is not None:
        nnx.update(model.encoder, encoder)
    _, params, fixed = nnx.split(model, trained_filter(model_config.protocol), ...)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, fixed=fixed, opt_state=tx.init(params))


def make_optimizer(
    config: ml_collections.ConfigDict, model_config: ClassifierConfig, lr_schedule: optax.Schedule
) -> optax.GradientTransformation:
    if model_config.protocol == FINETUNE:
        return optim.make_finetune_optimizer(config, lr_schedule, model_config.encoder.depth)
    return optim.make_linprobe_optimizer(config, lr_schedule)


# ---------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------
def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """One step on (uint8 images, int labels); its randomness is a function of (seed, step) alone.

    Random erasing, then mixup/cutmix with label smoothing, on the device; drop path in the blocks. The
    state's `fixed` part comes back updated: linear probing's BatchNorm keeps running statistics. On a
    `mesh` with an fsdp axis the activations and the logits stay split along the batch (`sharding.on_mesh`):
    XLA would otherwise split the logits along the classes, as the head's kernel is, and gather the
    features and labels of the whole batch onto every device.
    """
    step_key = jax.random.key(config.seed + 1)
    aug = config.augment
    stats = input_pipeline.pixel_stats(config.dataset)

    def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
        erase_key, mix_key, drop_key = jax.random.split(jax.random.fold_in(step_key, state.step), 3)
        inputs = input_pipeline.normalize(images, stats)
        if aug.random_erasing > 0:
            inputs = augment.random_erasing(inputs, erase_key, aug.random_erasing)
        inputs, targets = augment.mixup_cutmix(
            inputs,
            labels,
            mix_key,
            config.num_classes,
            mixup_alpha=aug.mixup,
            cutmix_alpha=aug.cutmix,
            switch_prob=aug.mixup_switch_prob,
            label_smoothing=aug.label_smoothing,
        )

        def loss_fn(params: nnx.State, fixed: nnx.State) -> tuple[jax.Array, nnx.State]:
            # copy: new Variables of this trace, which BatchNorm may update (merge would reuse the outer ones)
            model = nnx.merge(graphdef, params, fixed, copy=True)
            rngs = nnx.Rngs(dropout=drop_key) if config.model.drop_path > 0 else None
            logits = split_batch(model(inputs, train=True, rngs=rngs).astype(jnp.float32))
            _, _, fixed = nnx.split(model, trained_filter(config.task), ...)
            return optax.softmax_cross_entropy(logits, targets).mean(), fixed

        (loss, fixed), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.fixed)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1, params=optax.apply_updates(state.params, updates), fixed=fixed, opt_state=opt_state
        )
        lr = optim.applied_learning_rate(state.opt_state, lr_schedule)  # skipped steps do not advance it
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr}

    return sharding.on_mesh(train_step, mesh)


def assemble(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, total_steps: int, warmup_steps: int
) -> loop.Assembly:
    """The fine-tuning or linear-probing step for `config` on `mesh`, starting from the encoder `config.init`
    (read and checked here), with a schedule of `total_steps` (`warmup_steps` warmup)."""
    model_config = classifier_config(config)
    encoder = pretrained_encoder(config.init, model_config) if config.init else None
    lr_schedule = optim.schedule(config, total_steps, warmup_steps)
    tx = make_optimizer(config, model_config, lr_schedule)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Classifier(model_config, rngs=nnx.Rngs(0))))
    return loop.assemble(
        model_config=model_config,
        graphdef=graphdef,
        tx=tx,
        lr_schedule=lr_schedule,
        mesh=mesh,
        init_state=functools.partial(init_train_state, model_config, tx, config.seed),
        init_args=(encoder,),
        train_step=make_train_step(graphdef, tx, lr_schedule, config, mesh),
        batch_keys=("image", "label"),
        flops_per_step=flops.classifier_train_flops(model_config, config.batch_size),
        description=f"{config.task}, {config.num_classes} classes",
    )


def export_classifier(workdir: epath.Path, model: Classifier) -> list[epath.Path]:
    """`classifier.safetensors` in the official (timm) layout, and `classifier.pth` when PyTorch is installed.

    Neither needs the run to have PyTorch: mae_jax does not depend on it, and a run that finished training
    must not fail at its last line. Returns the files written.
    """
    state_dict = convert.classifier_to_official(nnx.state(model))
    convert.save_safetensors(workdir / CLASSIFIER_FILE, state_dict)
    written = [workdir / CLASSIFIER_FILE]
    if convert.torch_available():
        convert.save_pth(workdir / CLASSIFIER_PTH_FILE, state_dict)
        written.append(workdir / CLASSIFIER_PTH_FILE)
    else:
        logging.info("PyTorch is not installed: no %s (`pip install torch` to get one)", CLASSIFIER_PTH_FILE)
    logging.info("Wrote the classifier to %s", ", ".join(map(str, written)))
    return written


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Fine-tune or linearly probe as `config.task` says; returns the final top-1/top-5 (%)."""
    # ------------------------------------------------------------------------------------------------
    # Set-up: everything that can fail on bad input fails here, before compiling.
    # ------------------------------------------------------------------------------------------------
    configuration.validate(config)
    source = input_pipeline.make_source(config.dataset)
    if config.dataset.num_train > 0:
        source = input_pipeline.sample_subset(source, config.dataset.num_train, config.seed)
    input_pipeline.check_labels(source, config.num_classes)
    total_steps, warmup_steps = loop.schedule_steps(config, len(source))
    mesh = sharding.make_mesh(config.mesh)
    evals = evaluators.make_evaluators(config, mesh, source)  # opens the eval split and checks its labels
    assembly = assemble(config, mesh, total_steps, warmup_steps)  # reads and checks the pretrained encoder
    workdir, manager, record = loop.open_workdir(
        config, workdir, num_examples=len(source), total_steps=total_steps, warmup_steps=warmup_steps
    )
    logging.info("Config:\n%s", config)
    logging.info("%s from %s; %d training examples; %d steps (%d warmup) of batch %d", config.task,
                 config.init or "random init", len(source), total_steps, warmup_steps, config.batch_size)  # fmt: skip

    # ------------------------------------------------------------------------------------------------
    # Initialize (from the pretrained encoder), or restore the newest checkpoint in the workdir.
    # ------------------------------------------------------------------------------------------------
    state = loop.restore_or_init(manager, assembly)
    start_step = int(state.step)

    # ------------------------------------------------------------------------------------------------
    # Train, evaluating as `config.evals` says.
    # ------------------------------------------------------------------------------------------------
    skipped = input_pipeline.SkippedImages()
    dataset = input_pipeline.train_dataset(
        source,
        config,
        skipped,
        transform=input_pipeline.classifier_train_transform(config),
        position=start_step * config.batch_size,
        rows=input_pipeline.process_rows(assembly.batch_sharding, config.batch_size),
    )
    data_iterator = input_pipeline.label_checked(iter(dataset), config.num_classes)
    batches = input_pipeline.device_prefetch(data_iterator, assembly.batch_sharding, keys=assembly.batch_keys)
    # Opened last: a run that stops before the loop leaves no event file open (see `Bookkeeper.__exit__`)
    writer = summaries.Writer(workdir if jax.process_index() == 0 else None)  # process 0 writes events
    books = loop.Bookkeeper(
        config, manager, writer, skipped,
        start_step=start_step, total_steps=total_steps, workdir=workdir, flops_per_step=assembly.flops_per_step,
        run_record=record, evaluators=evals, model_of=assembly.model,
    )  # fmt: skip
    state = loop.train(books, assembly, state, batches)

    # ------------------------------------------------------------------------------------------------
    # Final: the last evaluation, and the classifier in the official layout.
    # ------------------------------------------------------------------------------------------------
    results = books.finish(state)
    accuracy = {k: results[f"eval_{k}"] for k in ("top1", "top5") if f"eval_{k}" in results}
    # Every process takes part in the gather: with FSDP over several hosts, process 0 holds part of each kernel.
    params, fixed = multihost_utils.process_allgather((state.params, state.fixed), tiled=True)
    if jax.process_index() == 0:
        export_classifier(workdir, nnx.merge(assembly.graphdef, params, fixed))
        if accuracy:
            logging.info("Eval top-1 %.2f%%, top-5 %.2f%%", accuracy["top1"], accuracy["top5"])
    return accuracy
