"""Optimizers of the official recipes, with a per-step warmup + cosine schedule.

Pretraining: AdamW with the official decay mask. Fine-tuning: AdamW with layer-wise lr decay
(util/lr_decay.py). Linear probing: LARS (util/lars.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mae_jax.models.vit import is_stacked


def learning_rate(base_lr: float, batch_size: int) -> float:
    """The paper's linear scaling rule: lr = base_lr * batch / 256."""
    return base_lr * batch_size / 256


def schedule(config: ml_collections.ConfigDict, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine to `min_lr`, per step as the official `adjust_learning_rate`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate(config.base_lr, config.batch_size),
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=config.min_lr,
    )


def _names(path: tuple) -> tuple[str, ...]:
    """A jax key path as plain names: dict keys, list indices and attribute names, all as strings."""
    return tuple(jax.tree_util.keystr((entry,), simple=True) for entry in path)


def _layer_ndim(path: tuple, param: jax.Array) -> int:
    """The dimensions of one layer's parameter: stacked blocks (`Compute.scan_blocks`) add a leading layer axis."""
    return param.ndim - 1 if is_stacked(_names(path)) else param.ndim


def decay_mask(params) -> object:
    """Decay every parameter with more than one dimension: no biases or norms; cls and mask tokens yes."""
    return jax.tree_util.tree_map_with_path(lambda path, p: _layer_ndim(path, p) > 1, params)


def _skip_nonfinite(
    tx: optax.GradientTransformation, config: ml_collections.ConfigDict
) -> optax.GradientTransformation:
    """`tx` with `optax.apply_if_finite`'s state whatever `skip_nonfinite_steps` is: a resume may switch it.

    With N > 0 an update from non-finite gradients is dropped, unless it is the (N + 1)-th in a row. With 0,
    apply_if_finite would apply every update; `tx` then runs as it is, without the conditional in the step:
    the run's NonFiniteGuard stops it at a non-finite step, before it is saved. So every update a saved
    state holds is finite, and it ends any streak of dropped ones a resumed checkpoint held (the in-a-row
    count the guard starts from, `nonfinite_streak`).
    """
    guarded = optax.apply_if_finite(tx, max_consecutive_errors=config.skip_nonfinite_steps)
    if config.skip_nonfinite_steps > 0:
        return guarded

    def update(
        updates: optax.Updates, state: optax.ApplyIfFiniteState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.ApplyIfFiniteState]:
        updates, inner_state = tx.update(updates, state.inner_state, params)
        return updates, state._replace(inner_state=inner_state, notfinite_count=jnp.zeros_like(state.notfinite_count))

    return optax.GradientTransformation(guarded.init, update)


def nonfinite_streak(opt_state: optax.OptState) -> int:
    """The dropped (non-finite) updates in a row that end `opt_state`'s history: apply_if_finite applies the
    next one past `skip_nonfinite_steps`, so a resumed run's NonFiniteGuard starts counting from here.

    0 for a state without apply_if_finite's counters (mae_jax <= 07cd2d5 saved them only when skipping).
    """
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        return int(opt_state.notfinite_count)
    return 0


def applied_learning_rate(opt_state: optax.OptState, lr_schedule: optax.Schedule) -> jax.Array:
    """The rate the next update applies: `lr_schedule` at the optimizer's own count of applied updates.

    That count, not the train step, drives the schedule: updates apply_if_finite drops do not advance it.
    """
    (schedule_state,) = [
        leaf
        for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
        if isinstance(leaf, optax.ScaleByScheduleState)
    ]
    return lr_schedule(schedule_state.count)


def make_optimizer(config: ml_collections.ConfigDict, lr_schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW; with `skip_nonfinite_steps` > 0, updates from non-finite gradients are dropped, not applied."""
    tx = optax.adamw(lr_schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=decay_mask)
    return _skip_nonfinite(tx, config)


# ---------------------------------------------------------------------------------------------------
# Downstream: fine-tuning (AdamW with layer-wise lr decay) and linear probing (LARS)
# ---------------------------------------------------------------------------------------------------
NO_WEIGHT_DECAY = ("cls_token", "pos_embed")  # the official ViT's `no_weight_decay()`
LARS_MOMENTUM = 0.9
LARS_TRUST_COEFFICIENT = 0.001  # util/lars.py's default, which main_linprobe.py keeps


def layer_id(path: tuple[str | int, ...], depth: int) -> int:
    """util/lr_decay.get_layer_id_for_vit on a parameter path of a classifier with its encoder at "encoder".

    0 for the embeddings (cls token, position table, patch projection), i + 1 for block i and depth + 1 for
    everything after the blocks (final norm, fc_norm, head).
    """
    names = path[1:] if path and path[0] == "encoder" else path
    if names[0] in ("cls_token", "pos_embed", "patch_embed"):
        return 0
    if names[0] == "blocks":
        return int(names[1]) + 1
    return depth + 1


def layer_scales(params, depth: int, decay: float) -> object:
    """Per-parameter lr multiplier decay ** (depth + 1 - layer_id): 1 for the head, smallest for the embeddings.

    A parameter of stacked blocks (`Compute.scan_blocks`) gets its layers' multipliers as a float32 array along
    its leading (layer) axis, the values the unrolled blocks' parameters get one by one.
    """
    block_scales = np.asarray([decay ** (depth - block) for block in range(depth)], np.float32)  # layer_id block+1

    def scale(path: tuple, leaf: jax.Array) -> float | np.ndarray:
        names = _names(path)
        if is_stacked(names):
            return block_scales.reshape((depth,) + (1,) * (leaf.ndim - 1))
        return decay ** (depth + 1 - layer_id(names, depth))

    return jax.tree_util.tree_map_with_path(scale, params)


def finetune_decay_mask(params) -> object:
    """The fine-tuning rule (param_groups_lrd), unlike pretraining's: no decay for 1-D params nor the cls token."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: _layer_ndim(path, p) != 1 and not set(NO_WEIGHT_DECAY) & set(_names(path)), params
    )


def make_finetune_optimizer(
    config: ml_collections.ConfigDict, lr_schedule: optax.Schedule, depth: int
) -> optax.GradientTransformation:
    """AdamW whose whole update, Adam step and decoupled decay alike, is scaled per layer.

    The official code gives each parameter group lr * lr_scale, which scales both terms of torch's AdamW;
    scaling the finished update by the same tree is that, with one Adam state for all parameters.
    """
    scale_by_layer = optax.stateless(  # updates have the params' paths, hence their layer ids
        lambda updates, _: jax.tree.map(
            lambda update, scale: update * scale, updates, layer_scales(updates, depth, config.layer_decay)
        )
    )
    adamw = optax.adamw(
        lr_schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=finetune_decay_mask
    )
    return _skip_nonfinite(optax.chain(adamw, scale_by_layer), config)


def make_linprobe_optimizer(
    config: ml_collections.ConfigDict, lr_schedule: optax.Schedule
) -> optax.GradientTransformation:
    """LARS as the official util/lars.py: mu = 0.9 mu + q (g + wd p); p -= lr mu.

    Decay and the trust ratio q = 0.001 ||p|| / ||g + wd p|| (1 where either norm is 0) apply only to
    params with more than one dimension. Unlike `optax.lars`, the learning rate multiplies the momentum
    buffer instead of entering it, so a scheduled lr does not reweight past gradients.
    """
    tx = optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=LARS_TRUST_COEFFICIENT), decay_mask),
        optax.trace(decay=LARS_MOMENTUM),
        optax.scale_by_learning_rate(lr_schedule),
    )
    return _skip_nonfinite(tx, config)
