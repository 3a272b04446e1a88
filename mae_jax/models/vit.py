"""ViT encoder pieces with the official MAE numerics (facebookresearch/mae).

Every choice that changes outputs follows the official code: LayerNorm eps 1e-6, exact (erf) GELU,
fused qkv with bias, xavier-uniform linears with zero bias, fixed 2-D sin-cos position tables.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYER_NORM_EPS = 1e-6
xavier_uniform = jax.nn.initializers.xavier_uniform()
token_init = jax.nn.initializers.normal(stddev=0.02)

# Encoder variants: name -> (width, depth, heads). Patch size is given separately, as in "B/16".
VARIANTS: dict[str, tuple[int, int, int]] = {
    "mu": (64, 2, 4),  # micro, for CPU tests and the demo
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}


class FixedEmbedding(nnx.Variable):
    """A position table that is saved with the model but never trained (not an `nnx.Param`)."""


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Shape of a ViT encoder; `from_variant("B/16")` gives the official sizes."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4

    @classmethod
    def from_variant(cls, variant: str, image_size: int = 224) -> EncoderConfig:
        name, _, patch = variant.partition("/")
        if name not in VARIANTS or not patch.isdigit():
            raise ValueError(f"unknown ViT variant {variant!r}: use NAME/PATCH with NAME in {sorted(VARIANTS)}")
        width, depth, heads = VARIANTS[name]
        return cls(image_size, int(patch), width, depth, heads)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


def sincos_1d(width: int, positions: np.ndarray) -> np.ndarray:
    """[sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (width/2)), in float64."""
    omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
    angles = np.einsum("p,k->pk", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(width: int, grid_size: int) -> np.ndarray:
    """The official (1 + G*G, width) table: zero cls row, first half encodes the column, second the row."""
    if width % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {width}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    table = np.concatenate([sincos_1d(width // 2, cols), sincos_1d(width // 2, rows)], axis=1)
    return np.concatenate([np.zeros((1, width)), table], axis=0).astype(np.float32)


def linear(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, kernel_init=xavier_uniform, rngs=rngs)


def layer_norm(width: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance, as torch.nn.LayerNorm computes it.
    return nnx.LayerNorm(width, epsilon=LAYER_NORM_EPS, use_fast_variance=False, rngs=rngs)


class PatchEmbed(nnx.Module):
    """p x p stride-p convolution; tokens come out row-major over the patch grid."""

    def __init__(self, patch_size: int, width: int, *, rngs: nnx.Rngs):
        fan_in = 3 * patch_size * patch_size
        bound = fan_in**-0.5  # PyTorch's default conv bias init, kept by the official code
        self.proj = nnx.Conv(
            3,
            width,
            kernel_size=(patch_size, patch_size),
            strides=patch_size,
            padding="VALID",
            # Xavier on the kernel viewed as (width, 3*p*p), as the official code does.
            kernel_init=jax.nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
            bias_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
            rngs=rngs,
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        tokens = self.proj(images)  # (N, h, w, D)
        return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])


class Attention(nnx.Module):
    def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = linear(width, 3 * width, rngs)
        self.proj = linear(width, width, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, length, width = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = jax.nn.dot_product_attention(q, k, v)  # scale head_dim ** -0.5
        return self.proj(out.reshape(n, length, width))


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = linear(width, hidden, rngs)
        self.fc2 = linear(hidden, width, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
        self.norm1 = layer_norm(width, rngs)
        self.attn = Attention(width, num_heads, rngs=rngs)
        self.norm2 = layer_norm(width, rngs)
        self.mlp = Mlp(width, mlp_ratio * width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Encoder(nnx.Module):
    """The ViT encoder. Called on images it sees every token (downstream use); MAE calls the parts."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not divisible by patch_size {config.patch_size}")
        self.config = config
        self.patch_embed = PatchEmbed(config.patch_size, config.width, rngs=rngs)
        self.cls_token = nnx.Param(token_init(rngs.params(), (1, 1, config.width)))
        self.pos_embed = FixedEmbedding(jnp.asarray(sincos_2d(config.width, config.grid_size))[None])
        self.blocks = nnx.List(
            [Block(config.width, config.num_heads, config.mlp_ratio, rngs=rngs) for _ in range(config.depth)]
        )
        self.norm = layer_norm(config.width, rngs)

    def embed_patches(self, images: jax.Array) -> jax.Array:
        """NHWC images -> (N, L, D) patch tokens with their position embedding, no cls token."""
        return self.patch_embed(images) + self.pos_embed[:, 1:]

    def encode(self, tokens: jax.Array) -> jax.Array:
        """Prepend cls, run the blocks and the final norm: (N, T, D) -> (N, 1 + T, D)."""
        cls = jnp.broadcast_to(self.cls_token + self.pos_embed[:, :1], (tokens.shape[0], 1, tokens.shape[-1]))
        x = jnp.concatenate([cls.astype(tokens.dtype), tokens], axis=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.encode(self.embed_patches(images))
