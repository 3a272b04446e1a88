"""The ViT encoder's architecture, with the official MAE numerics (facebookresearch/mae).

Every choice that changes outputs follows the official code: LayerNorm eps 1e-6, exact (erf) GELU,
fused qkv with bias, xavier-uniform linears with zero bias, fixed 2-D sin-cos position tables.
The blocks run the hand-written kernels of `ops` (LayerNorm, attention, GELU). `Compute` changes only
how they run (precision, attention kernel, backward passes, recomputation, scanning), never the parameters'
values, which stay float32. Scanned blocks (`Compute.scan_blocks`) hold the same values stacked along a
leading layer axis: one Block whose variables are (depth, ...) arrays, run by `jax.lax.scan`, so that XLA
compiles one block instead of `depth`. Only a run's train state keeps that layout; everything written
outside it (parameter directories, exported encoders, converted files) is in the unrolled one
(`unrolled_layout`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.models import ops

LAYER_NORM_EPS = 1e-6
xavier_uniform = jax.nn.initializers.xavier_uniform()
token_init = jax.nn.initializers.normal(stddev=0.02)


def truncated_normal(stddev: float) -> jax.nn.initializers.Initializer:
    """timm's trunc_normal_(std) with its default absolute bounds of +-2, which at these stds never bind."""
    return jax.nn.initializers.truncated_normal(stddev, lower=-2.0 / stddev, upper=2.0 / stddev)


# Encoder variants: name -> (width, depth, heads). Patch size is given separately, as in "B/16".
VARIANTS: dict[str, tuple[int, int, int]] = {
    "mu": (64, 2, 4),  # micro, for CPU tests and the demo
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}


@dataclasses.dataclass(frozen=True)
class Compute:
    """How the model runs: activation/matmul dtype, attention kernel, backward passes, block rematerialization."""

    dtype: str = "float32"  # params and optimizer state stay float32 either way; the loss is float32
    attention: str = "xla"  # "xla": `ops.softmax_attention`; "cudnn": `ops.fused_attention` (NVIDIA, bf16)
    remat: bool = False  # recompute each block's activations in the backward pass: less memory, ~1/3 more FLOPs
    scan_blocks: bool = False  # the blocks as one scanned layer (stacked parameters): one block to compile
    # The backward passes of LayerNorm, softmax attention and GELU (`ops.KERNEL_SETS`): "custom" (hand-written,
    # tuned on XLA:CPU) or "autodiff" (jax's, of the same forwards); attention="cudnn" is cuDNN's either way
    kernels: str = "custom"

    def __post_init__(self):  # not the machine: a GPU run's model.json loads on a CPU
        ops.check_kernels(self.attention, self.dtype, kernels=self.kernels)

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


ConfigWithCompute = TypeVar("ConfigWithCompute")  # a model config with a `compute` field


def unrolled(config: ConfigWithCompute) -> ConfigWithCompute:
    """`config` (an MAEConfig or ClassifierConfig) with its blocks unrolled: the layout of stored parameters."""
    return dataclasses.replace(config, compute=dataclasses.replace(config.compute, scan_blocks=False))


class FixedEmbedding(nnx.Variable):
    """A position table that is saved with the model but never trained (not an `nnx.Param`)."""


# timm's VisionTransformer (the official classifier) initialises its trained position table so.
TRAINED_POS_EMBED_STD = 0.02


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Shape of a ViT encoder; `from_variant("B/16")` gives the official sizes."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4
    num_channels: int = 3  # image bands: 1 for grayscale, 3 for RGB, any other for multi-band data

    @classmethod
    def from_variant(cls, variant: str, image_size: int = 224, num_channels: int = 3) -> EncoderConfig:
        name, _, patch = variant.partition("/")
        if name not in VARIANTS or not patch.isdigit():
            raise ValueError(f"unknown ViT variant {variant!r}: use NAME/PATCH with NAME in {sorted(VARIANTS)}")
        width, depth, heads = VARIANTS[name]
        return cls(image_size, int(patch), width, depth, heads, num_channels=num_channels)

    @property
    def patch_dim(self) -> int:
        """Pixel values per patch: p * p * channels."""
        return self.patch_size**2 * self.num_channels

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


# torch.nn.functional.interpolate(mode="bicubic")'s cubic convolution coefficient (jax.image.resize: -0.5).
TORCH_BICUBIC_A = -0.75


def _cubic_kernel(distance: float) -> float:
    """Keys' cubic convolution kernel with a = TORCH_BICUBIC_A, at |distance| < 2 from a tap."""
    a, x = TORCH_BICUBIC_A, abs(distance)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float64 weights of torch's bicubic `interpolate(size=..., align_corners=False)` on one axis.

    Output i samples the input at (i + 0.5) * in / out - 0.5 from its four nearest taps; taps beyond the
    border take the border value (torch clamps the indices). No antialiasing, as torch's default.
    """
    matrix = np.zeros((out_size, in_size))
    for out in range(out_size):
        source = (out + 0.5) * in_size / out_size - 0.5
        left = math.floor(source)
        for tap in range(left - 1, left + 3):
            matrix[out, min(max(tap, 0), in_size - 1)] += _cubic_kernel(source - tap)
    return matrix


def resize_position_table(table: np.ndarray, grid_size: int) -> np.ndarray:
    """A (1, 1 + G*G, D) position table for a `grid_size` grid, as the official `interpolate_pos_embed`.

    The cls row is kept; the G x G grid rows are resampled with torch's bicubic interpolation (cubic
    coefficient -0.75, unlike jax.image.resize's -0.5), separably along rows and columns.
    """
    table = np.asarray(table, np.float64)
    old_grid = math.isqrt(table.shape[1] - 1)
    if old_grid * old_grid != table.shape[1] - 1:
        raise ValueError(f"position table of {table.shape[1]} rows is not 1 + G*G")
    if old_grid == grid_size:
        return table.astype(np.float32)
    weights = torch_bicubic_matrix(old_grid, grid_size)
    grid = table[0, 1:].reshape(old_grid, old_grid, -1)
    resized = np.einsum("yi,xj,ijd->yxd", weights, weights, grid).reshape(grid_size * grid_size, -1)
    return np.concatenate([table[0, :1], resized])[None].astype(np.float32)


def split_batch(x: jax.Array) -> jax.Array:
    """Under a mesh (`jax.sharding.use_abstract_mesh`), keep `x` split along its batch over every mesh axis.

    Without this, XLA may shard a matmul along an FSDP-sharded weight and all-gather the activations
    instead of the weight; with it, FSDP gathers weights and activations never leave their device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(mesh.axis_names))


class Linear(nnx.Linear):
    """nnx.Linear whose output stays split along the batch (see `split_batch`)."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return split_batch(super().__call__(inputs))


def linear(in_features: int, out_features: int, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32) -> Linear:
    return Linear(in_features, out_features, kernel_init=xavier_uniform, dtype=dtype, rngs=rngs)


def layer_norm(width: int, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32, kernels: str = "custom") -> LayerNorm:
    # Two-pass variance, as torch.nn.LayerNorm computes it; the statistics stay in float32.
    return LayerNorm(width, epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype, kernels=kernels, rngs=rngs)


class LayerNorm(nnx.LayerNorm):
    """nnx.LayerNorm (same parameters, bit-identical forward) with the backward of the kernel set `kernels`
    (`Compute.kernels`): by default the hand-written one of `ops.layer_norm_function`."""

    def __init__(self, *args: Any, kernels: str = "custom", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.kernels = kernels

    def __call__(self, x: jax.Array) -> jax.Array:
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        return ops.KERNEL_SETS[self.kernels].layer_norm(x, scale, bias, self.epsilon)


# ---------------------------------------------------------------------------------------------------
# Blocks: a list (unrolled) or one Block of stacked variables (scanned), and the two layouts of their state
# ---------------------------------------------------------------------------------------------------
BLOCKS = "blocks"  # the attribute that holds an Encoder's or Decoder's blocks


def make_blocks(blocks: list[Block], scan: bool) -> nnx.List | Block:
    """`blocks` as an `nnx.List`, or with `scan` as one Block whose every variable stacks theirs along a new
    leading layer axis. Both hold the same values: a seed gives the same model in either layout."""
    if not scan:
        return nnx.List(blocks)
    return nnx.merge(nnx.graphdef(blocks[0]), jax.tree.map(lambda *layers: jnp.stack(layers), *map(nnx.state, blocks)))


def run_blocks(
    blocks: nnx.List | Block,
    x: jax.Array,
    remat: bool,
    rngs: nnx.Rngs | None = None,
    drop_path_rates: Sequence[float] | None = None,
) -> jax.Array:
    """Apply the blocks in order; with `remat` the backward pass recomputes each block's activations.

    `rngs` (a "dropout" stream) switches on drop path at each block's rate in `drop_path_rates`, as in
    fine-tuning; without it the blocks are deterministic. Stacked blocks (`make_blocks(..., scan=True)`) run
    as one `jax.lax.scan` over the layer axis, remat inside the scanned body; each layer draws its drop-path
    masks from its own key of one split, so they differ from the unrolled blocks' draws, not in distribution.
    """
    if isinstance(blocks, Block):
        return _scan_blocks(blocks, x, remat, rngs, drop_path_rates)
    for block, rate in zip(blocks, drop_path_rates or [0.0] * len(blocks), strict=True):
        x = split_batch(x)
        # The rate stays a number (static): a rate of 0 then draws no key
        x = nnx.remat(Block.__call__, static_argnums=3)(block, x, rngs, rate) if remat else block(x, rngs, rate)
    return split_batch(x)


def _scan_blocks(
    blocks: Block, x: jax.Array, remat: bool, rngs: nnx.Rngs | None, drop_path_rates: Sequence[float] | None
) -> jax.Array:
    graphdef, stacked = nnx.split(blocks)
    depth = jax.tree.leaves(stacked)[0].shape[0]
    rates = jnp.asarray(drop_path_rates or [0.0] * depth, jnp.float32)
    keys = None if rngs is None else jax.random.split(rngs.dropout(), depth)

    def layer(x: jax.Array, inputs: tuple) -> tuple[jax.Array, None]:
        state, rate, key = inputs
        layer_rngs = None if key is None else nnx.Rngs(dropout=key)
        return nnx.merge(graphdef, state)(split_batch(x), layer_rngs, drop_path_rate=rate), None

    if remat:  # jax.checkpoint's advice for scanned bodies: no CSE barrier, the loop already prevents it
        layer = jax.checkpoint(layer, prevent_cse=False)
    x, _ = jax.lax.scan(layer, x, (stacked, rates, keys))
    return split_batch(x)


Tree = TypeVar("Tree", bound=Mapping)


def _is_index(key: Any) -> bool:
    return str(key).isdigit()


def _map_blocks(tree: Tree, convert: Any) -> Tree:
    """`tree` (an nnx.State or nested dict of a model's variables) with each `BLOCKS` entry converted."""
    if isinstance(tree, nnx.State):  # a State of nested dicts, as nnx builds them
        return nnx.State(_map_blocks(tree.raw_mapping, convert))
    return {
        key: convert(value) if key == BLOCKS else _map_blocks(value, convert) if isinstance(value, Mapping) else value
        for key, value in tree.items()
    }


def _stack(blocks: Mapping) -> Mapping:
    if not all(_is_index(key) for key in blocks):
        return blocks  # stacked already
    return jax.tree.map(lambda *layers: jnp.stack(layers), *(blocks[key] for key in sorted(blocks, key=int)))


def _unstack(blocks: Mapping) -> Mapping:
    if all(_is_index(key) for key in blocks):
        return blocks  # unrolled already
    depth = jax.tree.leaves(blocks)[0].shape[0]
    return {index: jax.tree.map(lambda x, i=index: x[i], blocks) for index in range(depth)}


def scanned_layout(tree: Tree) -> Tree:
    """A model's variables (an nnx.State, or nested dicts as `nnx.to_pure_dict` gives them) with each list of
    blocks stacked into one, as `make_blocks(..., scan=True)` holds them; stacked blocks are left as they are."""
    return _map_blocks(tree, _stack)


def unrolled_layout(tree: Tree) -> Tree:
    """The inverse of `scanned_layout`: stacked blocks split into a list (index -> block); lists left as they are."""
    return _map_blocks(tree, _unstack)


def is_stacked(names: Sequence[str]) -> bool:
    """Whether a variable's path (as names) is in stacked blocks, whose leading axis is the layer: `blocks`
    followed by a submodule's name rather than a block index."""
    return BLOCKS in names[:-1] and not _is_index(names[names.index(BLOCKS) + 1])


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """NHWC images -> (N, L, p*p*C), each patch ordered row-in-patch, column-in-patch, channel."""
    return einops.rearrange(images, "n (h p) (w q) c -> n (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(patches: jax.Array, patch_size: int) -> jax.Array:
    """(N, L, p*p*C) -> NHWC images; the inverse of `patchify` for square grids."""
    grid = round(patches.shape[1] ** 0.5)
    return einops.rearrange(patches, "n (h w) (p q c) -> n (h p) (w q) c", h=grid, w=grid, p=patch_size, q=patch_size)


class PatchEmbed(nnx.Module):
    """The official p x p stride-p convolution, applied as one matmul to patchified pixels.

    As a matmul it embeds any subset of patches, so MAE embeds only the visible quarter; cuDNN ran the
    convolution on all of them at ~40 TFLOP/s on an H100 (2 ms of a 115 ms ViT-L step). The parameters
    keep the convolution's (p, p, C, D) kernel, the layout of checkpoints and of the PyTorch converter.
    """

    def __init__(
        self, patch_size: int, width: int, num_channels: int = 3, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs
    ):
        fan_in = num_channels * patch_size * patch_size
        bound = fan_in**-0.5  # PyTorch's default conv bias init, kept by the official code
        self.dtype = dtype
        self.proj = nnx.Conv(
            num_channels,
            width,
            kernel_size=(patch_size, patch_size),
            strides=patch_size,
            padding="VALID",
            # Xavier on the kernel viewed as (width, C*p*p), as the official code does.
            kernel_init=jax.nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
            bias_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
            rngs=rngs,
        )

    def __call__(self, patches: jax.Array) -> jax.Array:
        """(N, T, p*p*C) pixel patches, in `patchify` order -> (N, T, D) tokens."""
        n, length, patch_dim = patches.shape
        kernel = self.proj.kernel[...].reshape(patch_dim, -1).astype(self.dtype)  # rows in (p q c) order
        rows = patches.reshape(n * length, patch_dim).astype(self.dtype)
        tokens = rows @ kernel + self.proj.bias[...].astype(self.dtype)
        return split_batch(tokens.reshape(n, length, -1))


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv linear.

    The linears here and in `Mlp` see the batch's tokens as rows of one (N*L, width) matrix: their weight
    gradients then contract the output gradient's rows in place, where on (N, L, width) arrays XLA:CPU
    copied a transposed output gradient for every weight gradient.
    """

    def __init__(self, width: int, num_heads: int, *, compute: Compute, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.implementation = compute.attention
        self.kernels = compute.kernels
        self.qkv = linear(width, 3 * width, rngs, compute.jnp_dtype)
        self.proj = linear(width, width, rngs, compute.jnp_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, length, width = x.shape
        qkv = self.qkv(x.reshape(n * length, width)).reshape(n, length, 3, self.num_heads, width // self.num_heads)
        out = ops.attention(qkv, self.implementation, self.kernels)
        return self.proj(split_batch(out.reshape(n * length, width))).reshape(n, length, width)


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, *, dtype: jnp.dtype, kernels: str = "custom", rngs: nnx.Rngs):
        self.fc1 = linear(width, hidden, rngs, dtype)
        self.fc2 = linear(hidden, width, rngs, dtype)
        self.kernels = kernels  # whose GELU: `ops.KERNEL_SETS`

    def __call__(self, x: jax.Array) -> jax.Array:
        tokens = x.reshape(-1, x.shape[-1])  # see `Attention`: linears on (tokens, width)
        hidden = ops.KERNEL_SETS[self.kernels].gelu(self.fc1(tokens))
        return self.fc2(split_batch(hidden)).reshape(x.shape)


def drop_path(x: jax.Array, rate: float | jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    """timm's DropPath, as `nnx.Dropout(rate, broadcast_dims=(1, 2))` computes it: whole samples zeroed with
    probability `rate`, the rest scaled by 1 / (1 - rate). Off without `rngs`; a rate of 0 given as a number
    draws no key, a traced one (scanned blocks) always draws."""
    if rngs is None or (isinstance(rate, int | float) and rate == 0.0):
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rngs.dropout(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jax.lax.select(jnp.broadcast_to(mask, x.shape), x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class Block(nnx.Module):
    """Pre-norm transformer block, with optional drop path (stochastic depth) on both residual branches.

    The drop-path rate is an argument of the call, not an attribute: stacked blocks share one graph, and
    each layer's rate comes with it through the scan.
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: int, *, compute: Compute, rngs: nnx.Rngs):
        self.norm1 = layer_norm(width, rngs, compute.jnp_dtype, compute.kernels)
        self.attn = Attention(width, num_heads, compute=compute, rngs=rngs)
        self.norm2 = layer_norm(width, rngs, compute.jnp_dtype, compute.kernels)
        self.mlp = Mlp(width, mlp_ratio * width, dtype=compute.jnp_dtype, kernels=compute.kernels, rngs=rngs)

    def __call__(
        self, x: jax.Array, rngs: nnx.Rngs | None = None, drop_path_rate: float | jax.Array = 0.0
    ) -> jax.Array:
        x = x + drop_path(self.attn(self.norm1(x)), drop_path_rate, rngs)
        return x + drop_path(self.mlp(self.norm2(x)), drop_path_rate, rngs)


class Encoder(nnx.Module):
    """The ViT encoder. Called on images it sees every token (downstream use); MAE calls the parts."""

    def __init__(
        self,
        config: EncoderConfig,
        *,
        compute: Compute = Compute(),
        drop_path: float = 0.0,
        trained_pos_embed: bool = False,
        rngs: nnx.Rngs,
    ):
        """`trained_pos_embed`: the position table is an `nnx.Param`, as in the official classifier (timm's
        ViT), drawn from trunc_normal(std 0.02) until a pretrained table replaces it. Otherwise it is the fixed
        sin-cos table of MAE pretraining, which the official code never trains."""
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not divisible by patch_size {config.patch_size}")
        self.config = config
        self.remat = compute.remat
        self.patch_embed = PatchEmbed(
            config.patch_size, config.width, config.num_channels, dtype=compute.jnp_dtype, rngs=rngs
        )
        self.cls_token = nnx.Param(token_init(rngs.params(), (1, 1, config.width)))
        if trained_pos_embed:
            shape = (1, 1 + config.num_patches, config.width)
            self.pos_embed = nnx.Param(truncated_normal(TRAINED_POS_EMBED_STD)(rngs.params(), shape))
        else:
            self.pos_embed = FixedEmbedding(jnp.asarray(sincos_2d(config.width, config.grid_size))[None])
        # Drop-path rates rise linearly with depth to `drop_path`, as in timm.
        self.drop_path_rates = tuple(np.linspace(0, drop_path, config.depth).tolist())
        self.blocks = make_blocks(
            [
                Block(config.width, config.num_heads, config.mlp_ratio, compute=compute, rngs=rngs)
                for _ in range(config.depth)
            ],
            compute.scan_blocks,
        )
        self.norm = layer_norm(config.width, rngs, compute.jnp_dtype, compute.kernels)

    def embed_patches(self, patches: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """(N, T, p*p*3) pixel patches -> (N, T, D) tokens with their position embedding, no cls token.

        `positions` (N, T) are the patches' indices on the grid when they are not all of them, in order.
        """
        tokens = self.patch_embed(patches)
        table = self.pos_embed[0, 1:]
        position_embedding = table[None] if positions is None else jnp.take(table, positions, axis=0)
        return tokens + position_embedding.astype(tokens.dtype)

    def encode(self, tokens: jax.Array, *, final_norm: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Prepend cls, run the blocks and the final norm: (N, T, D) -> (N, 1 + T, D).

        Global-pool classifiers leave out the final norm (they have their own `fc_norm`); `rngs` switches on
        drop path.
        """
        cls = jnp.broadcast_to(self.cls_token + self.pos_embed[:, :1], (tokens.shape[0], 1, tokens.shape[-1]))
        x = jnp.concatenate([cls.astype(tokens.dtype), tokens], axis=1)
        x = run_blocks(self.blocks, x, self.remat, rngs, self.drop_path_rates)
        return self.norm(x) if final_norm else x

    def __call__(self, images: jax.Array, *, final_norm: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
        patches = patchify(images, self.config.patch_size)
        return self.encode(self.embed_patches(patches), final_norm=final_norm, rngs=rngs)
