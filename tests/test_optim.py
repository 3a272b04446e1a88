"""Optimizer: the official decay mask, schedule and AdamW, checked against PyTorch and the official formula."""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
import optax
import torch
from flax import nnx

from mae_jax import optim
from mae_jax.configuration import base_config
from mae_jax.models.mae import MAE


def test_decay_mask_follows_official_rule(tiny_model: MAE):
    params = nnx.state(tiny_model, nnx.Param)
    mask = nnx.to_pure_dict(optim.decay_mask(params))
    assert mask["encoder"]["cls_token"] and mask["decoder"]["mask_token"]  # tokens are decayed
    assert mask["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"]
    assert mask["encoder"]["patch_embed"]["proj"]["kernel"]
    assert not mask["encoder"]["blocks"][0]["attn"]["qkv"]["bias"]
    assert not mask["encoder"]["norm"]["scale"] and not mask["decoder"]["pred"]["bias"]
    assert "pos_embed" not in params["encoder"] and "pos_embed" not in params["decoder"]  # never trained


def official_lr(step: int, steps_per_epoch: int, config: ml_collections.ConfigDict) -> float:
    """util/lr_sched.adjust_learning_rate of the official code, with the fractional epoch of a step."""
    epoch = step / steps_per_epoch
    lr = config.base_lr * config.batch_size / 256
    if epoch < config.warmup_epochs:
        return lr * epoch / config.warmup_epochs
    progress = (epoch - config.warmup_epochs) / (config.num_epochs - config.warmup_epochs)
    return config.min_lr + (lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def test_schedule_matches_official_per_step_formula():
    config = base_config()
    config.min_lr = 1e-6
    steps_per_epoch = 312
    total, warmup = config.num_epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch
    schedule = optim.schedule(config, total, warmup)
    assert optim.learning_rate(1.5e-4, 4096) == 2.4e-3
    for step in [0, 1, 1000, warmup, warmup + 1, total // 2, total - 1, total]:
        np.testing.assert_allclose(
            float(schedule(step)), official_lr(step, steps_per_epoch, config), rtol=1e-5, atol=1e-6 * 2.4e-3
        )


def test_adamw_matches_torch_with_official_param_groups(tiny_model: MAE):
    config = base_config()
    params = nnx.state(tiny_model, nnx.Param)
    lr = 1e-3
    tx = optim.make_optimizer(config, optax.constant_schedule(lr))
    opt_state = tx.init(params)

    leaves = jax.tree.leaves(params)
    torch_params = [torch.nn.Parameter(torch.tensor(np.asarray(p))) for p in leaves]
    groups = [
        {"params": [p for p in torch_params if p.ndim > 1], "weight_decay": config.weight_decay},
        {"params": [p for p in torch_params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    torch_opt = torch.optim.AdamW(groups, lr=lr, betas=(config.b1, config.b2))

    rng = np.random.default_rng(0)
    for _ in range(3):
        grads_np = [rng.normal(size=p.shape).astype(np.float32) for p in leaves]
        grads = jax.tree.unflatten(jax.tree.structure(params), grads_np)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        for p, g in zip(torch_params, grads_np, strict=True):
            p.grad = torch.tensor(g)
        torch_opt.step()
    for ours, theirs in zip(jax.tree.leaves(params), torch_params, strict=True):
        np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), atol=1e-6)
