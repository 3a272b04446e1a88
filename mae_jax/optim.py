"""The pretraining optimizer: AdamW with the official decay mask and a per-step warmup + cosine schedule."""

from __future__ import annotations

import jax
import ml_collections
import optax


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


def decay_mask(params) -> object:
    """Decay every parameter with more than one dimension: no biases or norms; cls and mask tokens yes."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict, lr_schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW; with `skip_nonfinite_steps` > 0, updates from non-finite gradients are dropped, not applied."""
    tx = optax.adamw(lr_schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=decay_mask)
    if config.skip_nonfinite_steps > 0:
        tx = optax.apply_if_finite(tx, max_consecutive_errors=config.skip_nonfinite_steps)
    return tx
