"""The encoder pieces: position tables against hand-computed values, initialization, encoder-only use."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mae_jax.models.mae import MAE
from mae_jax.models.vit import Encoder, EncoderConfig, sincos_2d

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
