"""Optimizers: decay masks, schedule, AdamW (plain and layer-decayed) and LARS, against PyTorch and official code."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from mae_jax import convert, finetune, optim
from mae_jax.configuration import base_config
from mae_jax.models.classifier import FINETUNE, Classifier, ClassifierConfig
from mae_jax.models.mae import MAE
from mae_jax.models.vit import EncoderConfig


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


# ---------------------------------------------------------------------------------------------------
# Downstream optimizers
# ---------------------------------------------------------------------------------------------------
ENCODER = EncoderConfig.from_variant("mu/8", 32)  # depth 2, width 64, 4 x 4 patches


def classifier() -> Classifier:
    """The fine-tuning classifier (global pool: fc_norm, head), whose position table is a parameter."""
    return Classifier(ClassifierConfig(ENCODER, 10, protocol=FINETUNE), rngs=nnx.Rngs(0))


def trained_params(model: Classifier) -> nnx.State:
    return nnx.state(model, finetune.trained_filter(FINETUNE))


def downstream_config(**overrides) -> ml_collections.ConfigDict:
    values = dict(b1=0.9, b2=0.999, weight_decay=0.05, layer_decay=0.75, skip_nonfinite_steps=0)
    return ml_collections.ConfigDict(values | overrides)


class OfficialBlock(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(width, eps=1e-6)
        self.attn = torch.nn.Module()
        self.attn.qkv = torch.nn.Linear(width, 3 * width)
        self.attn.proj = torch.nn.Linear(width, width)
        self.norm2 = torch.nn.LayerNorm(width, eps=1e-6)
        self.mlp = torch.nn.Module()
        self.mlp.fc1 = torch.nn.Linear(width, 4 * width)
        self.mlp.fc2 = torch.nn.Linear(4 * width, width)


class OfficialClassifier(torch.nn.Module):
    """The parameters of the official fine-tuning model, `models_vit.VisionTransformer(global_pool=True)`
    (timm's ViT without `norm`), by the official names and shapes. Only the parameters matter here."""

    def __init__(self, config: EncoderConfig, num_classes: int):
        super().__init__()
        width = config.width
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 1 + config.num_patches, width))
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(config.num_channels, width, config.patch_size, config.patch_size)
        self.blocks = torch.nn.ModuleList([OfficialBlock(width) for _ in range(config.depth)])
        self.fc_norm = torch.nn.LayerNorm(width, eps=1e-6)
        self.head = torch.nn.Linear(width, num_classes)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}  # timm's VisionTransformer.no_weight_decay


def official_layer_id(name: str, num_layers: int) -> int:
    """util/lr_decay.get_layer_id_for_vit."""
    if name in ("cls_token", "pos_embed"):
        return 0
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def official_param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> dict[str, dict]:
    """util/lr_decay.param_groups_lrd (main_finetune.py's call), keyed by group name."""
    num_layers = len(model.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim == 1 or name in model.no_weight_decay())
        layer = official_layer_id(name, num_layers)
        group = groups.setdefault(
            f"layer_{layer}_{'decay' if decay else 'no_decay'}",
            {
                "lr_scale": layer_scales[layer],
                "weight_decay": weight_decay if decay else 0.0,
                "params": [],
                "names": [],
            },
        )
        group["params"].append(p)
        group["names"].append(name)
    return groups


def test_layer_id_accepts_string_and_integer_keys():
    assert optim.layer_id(("encoder", "blocks", 1, "mlp", "fc1", "kernel"), 12) == 2
    assert optim.layer_id(("encoder", "blocks", "11", "norm1", "scale"), 12) == 12
    assert optim.layer_id(("encoder", "pos_embed"), 12) == 0
    assert optim.layer_id(("encoder", "norm", "scale"), 12) == 13
    assert optim.layer_id(("head", "kernel"), 12) == 13


def test_layer_scales_follow_official_rule():
    decay = 0.5
    scales = nnx.to_pure_dict(optim.layer_scales(trained_params(classifier()), depth=2, decay=decay))
    encoder = scales["encoder"]
    assert encoder["patch_embed"]["proj"]["kernel"] == encoder["patch_embed"]["proj"]["bias"] == decay**3
    assert encoder["cls_token"] == encoder["pos_embed"] == decay**3
    assert encoder["blocks"][0]["attn"]["qkv"]["kernel"] == encoder["blocks"][0]["norm1"]["scale"] == decay**2
    assert encoder["blocks"][1]["mlp"]["fc2"]["bias"] == decay
    assert encoder["norm"]["scale"] == scales["fc_norm"]["bias"] == scales["head"]["kernel"] == 1.0


def test_finetune_decay_mask_follows_official_rule():
    mask = nnx.to_pure_dict(optim.finetune_decay_mask(trained_params(classifier())))
    assert not mask["encoder"]["cls_token"] and not mask["encoder"]["pos_embed"]  # decayed in pretraining, not here
    assert mask["encoder"]["patch_embed"]["proj"]["kernel"] and mask["head"]["kernel"]
    assert mask["encoder"]["blocks"][1]["attn"]["proj"]["kernel"]
    assert not mask["encoder"]["blocks"][1]["attn"]["proj"]["bias"] and not mask["head"]["bias"]
    assert not mask["encoder"]["norm"]["scale"] and not mask["fc_norm"]["scale"]


def test_finetune_adamw_matches_official_layer_decay_groups_per_official_name():
    """Three AdamW steps of mae_jax's fine-tuning optimizer against torch.optim.AdamW on the official
    model's parameters grouped by util/lr_decay.param_groups_lrd, compared name by official name."""
    config = downstream_config(weight_decay=0.3, layer_decay=0.5)  # far from 1: a wrong group shows
    model = classifier()
    params = trained_params(model)
    official = OfficialClassifier(ENCODER, 10)
    initial = convert.classifier_to_official(nnx.state(model))
    official.load_state_dict({key: torch.tensor(value) for key, value in initial.items()}, strict=True)
    trained = dict(official.named_parameters())
    # Every parameter the official fine-tuning trains is trained here, the position table included.
    assert sorted(convert.classifier_to_official(params)) == sorted(trained)

    groups = official_param_groups(official, config.weight_decay, config.layer_decay)
    assert groups["layer_0_no_decay"]["names"] == ["cls_token", "pos_embed", "patch_embed.proj.bias"]
    assert groups["layer_0_decay"]["names"] == ["patch_embed.proj.weight"]
    lr_schedule = optax.linear_schedule(1e-2, 2e-3, transition_steps=3)
    tx = optim.make_finetune_optimizer(config, lr_schedule, ENCODER.depth)
    opt_state = tx.init(params)
    torch_opt = torch.optim.AdamW(
        [{key: group[key] for key in ("params", "weight_decay", "lr_scale")} for group in groups.values()],
        lr=0.0,
        betas=(config.b1, config.b2),
    )

    rng = np.random.default_rng(0)
    for step in range(3):
        for group in torch_opt.param_groups:  # util/lr_sched.adjust_learning_rate
            group["lr"] = float(lr_schedule(step)) * group["lr_scale"]
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        for name, grad in convert.classifier_to_official(grads).items():
            trained[name].grad = torch.tensor(grad)
        torch_opt.step()
    ours = convert.classifier_to_official(params)
    for name, theirs in official.named_parameters():
        np.testing.assert_allclose(ours[name], theirs.detach().numpy(), rtol=1e-6, atol=1e-6, err_msg=name)
    assert not np.array_equal(ours["pos_embed"], initial["pos_embed"])


def test_lars_matches_hand_computed_official_update():
    """Two steps of util/lars.py by hand: trust ratio and decay for the matrix only, lr applied after momentum."""
    weight_decay, eta, momentum = 0.1, 0.001, 0.9
    lrs = (0.5, 2.0)  # changing lr: the official momentum buffer holds no lr, unlike optax.lars's
    tx = optim.make_linprobe_optimizer(
        downstream_config(weight_decay=weight_decay), lambda step: jnp.where(step == 0, lrs[0], lrs[1])
    )
    w = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)
    b = np.array([0.25, -1.0], np.float32)
    zero = np.zeros((2, 2), np.float32)  # ||p|| = 0 on the first step: trust ratio 1
    grads = [
        {"w": np.array([[0.3, 0.1], [-0.2, 0.4]], np.float32), "b": np.array([1.0, -2.0], np.float32)},
        {"w": np.array([[-0.1, 0.5], [0.2, 0.0]], np.float32), "b": np.array([0.5, 0.5], np.float32)},
    ]
    for grad in grads:
        grad["zero"] = 2 * grad["w"]
    params = {"w": jnp.asarray(w), "b": jnp.asarray(b), "zero": jnp.asarray(zero)}
    opt_state = tx.init(params)

    def matrix_step(p: np.ndarray, g: np.ndarray, mu: np.ndarray, lr: float) -> tuple[np.ndarray, np.ndarray]:
        d = g + weight_decay * p
        q = eta * np.linalg.norm(p) / np.linalg.norm(d) if np.linalg.norm(p) > 0 else 1.0
        mu = momentum * mu + q * d
        return p - lr * mu, mu

    mu_w, mu_b, mu_zero = np.zeros_like(w), np.zeros_like(b), np.zeros_like(zero)
    for step, (lr, grad) in enumerate(zip(lrs, grads, strict=True)):
        updates, opt_state = tx.update(jax.tree.map(jnp.asarray, grad), opt_state, params)
        params = optax.apply_updates(params, updates)
        w, mu_w = matrix_step(w, grad["w"], mu_w, lr)
        zero, mu_zero = matrix_step(zero, grad["zero"], mu_zero, lr)
        if step == 0:
            np.testing.assert_allclose(zero, -lr * grad["zero"])  # no trust ratio, and 0 decay, from ||p|| = 0
        mu_b = momentum * mu_b + grad["b"]  # bias: neither decay nor trust ratio
        b = b - lr * mu_b
        for name, expected in (("w", w), ("b", b), ("zero", zero)):
            np.testing.assert_allclose(np.asarray(params[name]), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b, [0.25 - 0.5 * 1.0 - 2.0 * (0.9 * 1.0 + 0.5), -1.0 + 0.5 * 2.0 - 2.0 * (-1.8 + 0.5)])


@pytest.mark.parametrize("make", ["finetune", "linprobe"])
def test_downstream_optimizers_skip_nonfinite_steps(make: str):
    config = downstream_config(skip_nonfinite_steps=3)
    schedule = optax.constant_schedule(1e-2)
    tx = (
        optim.make_finetune_optimizer(config, schedule, 2)
        if make == "finetune"
        else optim.make_linprobe_optimizer(config, schedule)
    )
    params = {"encoder": {"blocks": {0: {"kernel": jnp.ones((2, 2))}}}, "head": {"bias": jnp.ones(2)}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for new, old in zip(jax.tree.leaves(optax.apply_updates(params, updates)), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize("make", ["pretrain", "finetune", "linprobe"])
def test_applied_learning_rate_is_the_schedule_at_the_updates_applied(make: str):
    """Dropped (non-finite) updates do not advance the optimizer's schedule: after k of them, update n (from 0)
    applies optax's schedule at n - k, the rate the loops log."""
    config = downstream_config(skip_nonfinite_steps=3)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=8)
    tx = {
        "pretrain": lambda: optim.make_optimizer(config, schedule),
        "finetune": lambda: optim.make_finetune_optimizer(config, schedule, 2),
        "linprobe": lambda: optim.make_linprobe_optimizer(config, schedule),
    }[make]()
    params = {"encoder": {"blocks": {0: {"kernel": jnp.ones((2, 2))}}}, "head": {"bias": jnp.ones(2)}}
    finite, nonfinite = jax.tree.map(jnp.ones_like, params), jax.tree.map(lambda p: p * jnp.nan, params)
    state, skipped, update = tx.init(params), 0, jax.jit(tx.update)
    for n, grads in enumerate([finite, nonfinite, nonfinite, finite, finite, nonfinite, finite]):
        assert float(optim.applied_learning_rate(state, schedule)) == float(schedule(n - skipped)), n
        _, state = update(grads, state, params)
        skipped += grads is nonfinite
