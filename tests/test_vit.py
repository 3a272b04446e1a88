"""The encoder pieces: position tables against hand-computed values, initialization, encoder-only use."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mae_jax.models.mae import MAE
from mae_jax.models.vit import (
    Block,
    Compute,
    Encoder,
    EncoderConfig,
    fused_attention,
    gelu,
    layer_norm,
    run_blocks,
    sincos_2d,
    softmax_attention,
)

SIN1, COS1 = math.sin(1.0), math.cos(1.0)
SIN001, COS001 = math.sin(0.01), math.cos(0.01)  # width 8: each half has omegas 1 and 10000^(-1/2) = 0.01


def test_sincos_table_matches_hand_computed_values():
    table = sincos_2d(8, 2)  # tokens: cls, (0,0), (0,1), (1,0), (1,1) as (row, column)
    assert table.shape == (5, 8) and table.dtype == np.float32
    np.testing.assert_array_equal(table[0], np.zeros(8))
    zero = [0.0, 0.0, 1.0, 1.0]  # [sin 0, sin 0, cos 0, cos 0]
    one = [SIN1, SIN001, COS1, COS001]
    np.testing.assert_allclose(table[1], zero + zero, atol=1e-7)
    np.testing.assert_allclose(table[2], one + zero, atol=1e-7)  # column 1 lives in the first half
    np.testing.assert_allclose(table[3], zero + one, atol=1e-7)  # row 1 in the second half
    np.testing.assert_allclose(table[4], one + one, atol=1e-7)


def test_sincos_table_rejects_width_not_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(6, 2)


def test_official_initialization_bounds():
    config = EncoderConfig.from_variant("S/16", 32)
    encoder = Encoder(config, rngs=nnx.Rngs(3))
    fan_in = 3 * 16 * 16
    kernel = np.asarray(encoder.patch_embed.proj.kernel[...])
    xavier_bound = math.sqrt(6 / (fan_in + config.width))  # xavier on the (width, 3*p*p) view
    assert 0.95 * xavier_bound < np.abs(kernel).max() <= xavier_bound
    bias = np.asarray(encoder.patch_embed.proj.bias[...])
    assert 0.9 * fan_in**-0.5 < np.abs(bias).max() <= fan_in**-0.5  # PyTorch's conv default
    qkv = encoder.blocks[0].attn.qkv
    qkv_bound = math.sqrt(6 / (config.width + 3 * config.width))
    assert 0.95 * qkv_bound < np.abs(np.asarray(qkv.kernel[...])).max() <= qkv_bound
    np.testing.assert_array_equal(np.asarray(qkv.bias[...]), 0)
    np.testing.assert_array_equal(np.asarray(encoder.norm.scale[...]), 1)
    assert abs(float(jnp.std(encoder.cls_token[...])) - 0.02) < 0.005
    assert not isinstance(encoder.pos_embed, nnx.Param)  # fixed, not trained


def test_variants_have_official_dimensions():
    assert EncoderConfig.from_variant("B/16") == EncoderConfig(224, 16, 768, 12, 12)
    assert EncoderConfig.from_variant("L/16") == EncoderConfig(224, 16, 1024, 24, 16)
    assert EncoderConfig.from_variant("H/14") == EncoderConfig(224, 14, 1280, 32, 16)
    assert EncoderConfig.from_variant("H/14").num_patches == 256
    with pytest.raises(ValueError, match="unknown ViT variant"):
        EncoderConfig.from_variant("X/16")


def test_encoder_alone_equals_mae_latent_without_masking(tiny_model: MAE):
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    num_patches = tiny_model.config.encoder.num_patches
    in_order = jnp.broadcast_to(jnp.linspace(0, 1, num_patches), (2, num_patches))  # keeps image order
    latent = tiny_model(images, 0.0, noise=in_order).latent
    features = tiny_model.encoder(images)
    assert features.shape == (2, 1 + num_patches, tiny_model.config.encoder.width)
    np.testing.assert_allclose(features, latent, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_is_flax_forward_with_the_same_gradients(dtype):
    ours = layer_norm(64, nnx.Rngs(0), dtype)
    theirs = nnx.LayerNorm(64, epsilon=1e-6, use_fast_variance=False, dtype=dtype, rngs=nnx.Rngs(0))
    for norm in (ours, theirs):  # off init, so that a swapped scale and bias would show
        norm.scale[...] = jax.random.normal(jax.random.key(1), (64,))
        norm.bias[...] = jax.random.normal(jax.random.key(2), (64,))
    x = (3 + 2 * jax.random.normal(jax.random.key(3), (4, 10, 64))).astype(dtype)
    cotangent = jax.random.normal(jax.random.key(4), (4, 10, 64))

    def grads(norm: nnx.Module) -> tuple[nnx.State, jax.Array]:
        graphdef, state = nnx.split(norm)
        loss = lambda state, x: jnp.vdot(nnx.merge(graphdef, state)(x).astype(jnp.float32), cotangent)  # noqa: E731
        return jax.grad(loss, argnums=(0, 1))(state, x)

    np.testing.assert_array_equal(ours(x), theirs(x))
    (ours_params, ours_x), (theirs_params, theirs_x) = grads(ours), grads(theirs)
    tolerance = 1e-5 if dtype == jnp.float32 else 1e-2  # flax's backward rounds to bfloat16 in between
    for a, b in [(ours_x, theirs_x), *((ours_params[k][...], theirs_params[k][...]) for k in ("scale", "bias"))]:
        assert a.dtype == b.dtype
        difference = np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)))
        assert difference <= tolerance * np.max(np.abs(np.asarray(b, np.float32)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_is_exact_gelu_with_its_gradient(dtype):
    x = jnp.linspace(-8, 8, 1001).astype(dtype)
    ours, ours_vjp = jax.vjp(gelu, x)
    theirs, theirs_vjp = jax.vjp(lambda x: jax.nn.gelu(x.astype(jnp.float32), approximate=False), x)
    cotangent = jax.random.normal(jax.random.key(0), x.shape)
    tolerance = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(ours, np.float32), theirs, atol=tolerance, rtol=tolerance)
    (ours_grad,), (theirs_grad,) = ours_vjp(cotangent.astype(dtype)), theirs_vjp(cotangent)
    assert ours_grad.dtype == dtype
    np.testing.assert_allclose(np.asarray(ours_grad, np.float32), theirs_grad, atol=tolerance, rtol=tolerance)


def test_softmax_attention_matches_jax_dot_product_attention():
    q, k, v, cotangent = (jax.random.normal(jax.random.key(i), (2, 3, 7, 8)) for i in range(4))  # (N, heads, L, hd)

    def reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:  # jax wants (N, L, heads, hd)
        swap = lambda x: x.swapaxes(1, 2)  # noqa: E731
        return swap(jax.nn.dot_product_attention(swap(q), swap(k), swap(v)))

    ours, ours_vjp = jax.vjp(softmax_attention, q, k, v)
    theirs, theirs_vjp = jax.vjp(reference, q, k, v)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    for a, b in zip(ours_vjp(cotangent), theirs_vjp(cotangent), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("length", [197, 50])
def test_fused_attention_pads_odd_sequences_invisibly(length: int):
    """The cuDNN path's padding token (odd lengths) changes neither outputs nor gradients; run here with XLA's
    implementation of the same `jax.nn.dot_product_attention` call, as cuDNN needs a GPU."""
    q, k, v, cotangent = (jax.random.normal(jax.random.key(i), (2, length, 3, 8)) for i in range(4))
    ours, ours_vjp = jax.vjp(lambda q, k, v: fused_attention(q, k, v, implementation="xla"), q, k, v)
    theirs, theirs_vjp = jax.vjp(jax.nn.dot_product_attention, q, k, v)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    for a, b in zip(ours_vjp(cotangent), theirs_vjp(cotangent), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def fusion_operand_counts(depth: int) -> list[int]:
    """Operand counts of the top-level fusions in the compiled gradient of `depth` blocks."""
    blocks = nnx.List([Block(32, 2, 4, compute=Compute(), rngs=nnx.Rngs(i)) for i in range(depth)])
    graphdef, state = nnx.split(blocks)
    x = jnp.ones((2, 5, 32))
    loss = lambda state, x: jnp.sum(run_blocks(nnx.merge(graphdef, state), x, remat=False) ** 2)  # noqa: E731
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile().as_text()
    entry = text[text.index("\nENTRY") :]
    return [len(re.findall(r"%[\w.\-]+", m[1])) for m in re.finditer(r" fusion\((.*?)\), kind=", entry)]


def test_backward_fusions_do_not_grow_with_depth():
    """The residual-stream gradient is computed once per block: had XLA folded the gradient of the blocks
    above into each block's fusions (as it did with autodiff's LayerNorm backward), their operand counts
    would grow with depth, and the work with its square."""
    assert max(fusion_operand_counts(6)) <= max(fusion_operand_counts(2))
