"""Compute options (bfloat16, rematerialization) and the mask-token baseline; the kernels: test_ops.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mae_jax import configuration
from mae_jax.models.mae import MAE, MAEConfig
from mae_jax.models.vit import Compute, FixedEmbedding
from tests.conftest import TINY, tiny_train_config


def loss_and_grads(config: MAEConfig) -> tuple[jax.Array, jax.Array, nnx.State]:
    """(loss, latent, grads) of the tiny model at seed 0 on fixed images and noise."""
    model = MAE(config, rngs=nnx.Rngs(0))
    graphdef, params, fixed = nnx.split(model, nnx.Param, FixedEmbedding)
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    noise = jax.random.uniform(jax.random.key(2), (4, config.encoder.num_patches))

    @jax.jit
    def run(params: nnx.State) -> tuple[tuple[jax.Array, jax.Array], nnx.State]:
        def loss_fn(params: nnx.State) -> tuple[jax.Array, jax.Array]:
            out = nnx.merge(graphdef, params, fixed)(images, 0.75, noise=noise)
            return out.loss, out.latent

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, latent), grads = run(params)
    return loss, latent, grads


def num_params(config: MAEConfig) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(MAE(config, rngs=nnx.Rngs(0)), nnx.Param)))


@pytest.fixture(scope="module")
def float32_run():
    return loss_and_grads(TINY)


def test_bfloat16_computes_in_bfloat16_with_float32_params_and_loss(float32_run):
    config = dataclasses.replace(TINY, compute=Compute(dtype="bfloat16"))
    params = nnx.state(MAE(config, rngs=nnx.Rngs(0)), nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    loss, latent, grads = loss_and_grads(config)
    assert latent.dtype == jnp.bfloat16 and loss.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(loss, float32_run[0], rtol=2e-2)
    for ours, reference in zip(jax.tree.leaves(grads), jax.tree.leaves(float32_run[2]), strict=True):
        assert np.all(np.isfinite(ours))
        cosine = np.vdot(ours, reference) / (np.linalg.norm(ours) * np.linalg.norm(reference) + 1e-30)
        assert cosine > 0.95 or np.linalg.norm(reference) < 1e-6


def test_remat_changes_nothing_but_memory(float32_run):
    config = dataclasses.replace(TINY, compute=Compute(remat=True))
    graphdef, state = nnx.split(MAE(config, rngs=nnx.Rngs(0)))
    images = jnp.zeros((2, 32, 32, 3))
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(images, key=jax.random.key(0)).loss)(state)
    blocks = TINY.encoder.depth + TINY.decoder_depth
    assert [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns].count("remat2") == blocks  # jax.checkpoint, per block
    loss, _, grads = loss_and_grads(config)
    np.testing.assert_allclose(loss, float32_run[0], rtol=1e-6)
    for ours, reference in zip(jax.tree.leaves(grads), jax.tree.leaves(float32_run[2]), strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-7)


def test_mask_tokens_in_encoder_baseline():
    """Table 2's baseline: the encoder sees all tokens (removed ones as a mask token), one extra parameter."""
    config = dataclasses.replace(TINY, mask_tokens_in_encoder=True)
    loss, latent, _ = loss_and_grads(config)
    assert latent.shape == (4, 1 + TINY.encoder.num_patches, TINY.encoder.width)
    assert np.isfinite(loss)
    assert num_params(config) - num_params(TINY) == TINY.encoder.width


def test_model_json_without_compute_still_loads():
    fields = TINY.to_dict()
    assert MAEConfig.from_dict(fields) == TINY
    del fields["compute"], fields["mask_tokens_in_encoder"]  # a model.json written before these existed
    assert MAEConfig.from_dict(fields) == TINY


def test_config_keys_reach_the_model():
    config = tiny_train_config(**{"model.dtype": "bfloat16", "model.remat": True, "model.mask_tokens_in_encoder": True})
    model_config = configuration.model_config(config)
    assert model_config.compute == Compute("bfloat16", "xla", True) and model_config.mask_tokens_in_encoder


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"grad_accum_steps": 0}, "grad_accum_steps=0 must be >= 1"),
        ({"grad_accum_steps": 3}, "batch_size=8 is not a positive multiple of the 1 devices x grad_accum_steps=3"),
        ({"mesh.fsdp": 2}, "mesh.data=-1 x mesh.fsdp=2 does not fit the 1 devices"),
    ],
)
def test_bad_speed_settings_fail_in_one_line(override, message):
    with pytest.raises(configuration.ConfigError) as error:
        configuration.validate(tiny_train_config(**override))
    assert str(error.value).startswith(message)
