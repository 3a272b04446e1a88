"""The kernels the ViT blocks run: LayerNorm, attention and GELU, and which of them run where.

Each has the numerics of the official code (facebookresearch/mae, through torch and timm) and is written by
hand for speed or memory, not for different results: autodiff's LayerNorm backward made XLA:CPU recompute
the gradient of every block above in each block, `jax.nn.gelu`'s erfc lowering is slow on CPU, and the
hand-written backwards keep fewer and smaller arrays for the backward pass. Each kernel's docstring says
what it changes and by how much; tests/test_ops.py checks each against jax's or flax's own.
`fused_attention` is cuDNN's fused kernel instead, for NVIDIA GPUs in bfloat16 (`check_kernels`).
The backwards were tuned on XLA:CPU; `KERNEL_SETS["autodiff"]` runs the same forwards with jax's own
backward passes instead, for XLA:GPU, which may fuse those better (`Compute.kernels`; tests/test_kernels.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")  # `softmax_attention`; jax.nn.dot_product_attention's cuDNN kernel
COMPUTE_DTYPES = ("float32", "bfloat16")


def check_kernels(attention: str, dtype: str, backend: str | None = None, kernels: str = "custom") -> None:
    """Raise a one-line ValueError unless the `attention` kernel runs in `dtype` (and on `backend`, given) and
    `kernels` names a kernel set (`KERNEL_SETS`).

    The messages name the values as `Compute` does (`dtype=`, `attention=`, `kernels=`). Without `backend`
    the machine is not checked: a model.json written on a GPU still loads on a CPU.
    """
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {COMPUTE_DTYPES}")
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={attention!r} must be one of {ATTENTION_IMPLEMENTATIONS}")
    if kernels not in KERNEL_SETS:
        raise ValueError(f"kernels={kernels!r} must be one of {tuple(KERNEL_SETS)}")
    if attention == "cudnn" and (dtype != "bfloat16" or backend not in (None, "gpu")):
        raise ValueError("attention='cudnn' needs an NVIDIA GPU and dtype='bfloat16'")


# ---------------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_function(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32, as flax's `LayerNorm(use_fast_variance=False)`.

    Autodiff's backward ends each norm with the add of a broadcast row term, which XLA:CPU duplicates into
    every consumer of the residual-stream gradient: each block's gradient fusions recomputed the gradient
    of every block above it (~1 s of a 5 s ViT-B/16 step). Here the input gradient is one expression of
    full-size arrays, so XLA computes the residual-stream gradient once per block. The backward keeps the
    input in its own dtype and the per-row statistics, not the float32 centered input: under bfloat16 that
    halves what each norm holds for the backward pass.
    """
    return _layer_norm_forward(x, scale, bias, epsilon)[0]


def _layer_norm_statistics(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x - mean, mean, 1 / std) in float32, the two-pass variance of torch.nn.LayerNorm."""
    mean = jnp.mean(x.astype(jnp.float32), axis=-1, keepdims=True)
    centered = x.astype(jnp.float32) - mean
    return centered, mean, jax.lax.rsqrt(jnp.mean(jax.lax.square(centered), axis=-1, keepdims=True) + epsilon)


def _layer_norm_forward(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> tuple[jax.Array, tuple]:
    centered, mean, inv_std = _layer_norm_statistics(x, epsilon)
    y = centered * (inv_std * scale) + bias  # flax's order of operations
    return y.astype(x.dtype), (x, mean, inv_std, scale)


def _layer_norm_backward(epsilon: float, residuals: tuple, d_y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    del epsilon  # in inv_std already
    x, mean, inv_std, scale = residuals  # x, scale and bias share one dtype (nnx's promote_dtype)
    d_y = d_y.astype(jnp.float32)
    normed = (x.astype(jnp.float32) - mean) * inv_std  # the forward's centered values, recomputed
    d_normed = d_y * scale
    d_x = inv_std * (
        d_normed
        - jnp.mean(d_normed, axis=-1, keepdims=True)
        - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True)
    )
    rows = tuple(range(d_y.ndim - 1))
    return tuple(g.astype(scale.dtype) for g in (d_x, jnp.sum(d_y * normed, rows), jnp.sum(d_y, rows)))


layer_norm_function.defvjp(_layer_norm_forward, _layer_norm_backward)


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------


def attention(qkv: jax.Array, implementation: str, kernels: str = "custom") -> jax.Array:
    """Self-attention on a fused (batch, tokens, 3, heads, head_dim) q/k/v array -> (batch, tokens, heads,
    head_dim), with the kernel `implementation` names (one of ATTENTION_IMPLEMENTATIONS). The "xla" kernel
    is the `softmax_attention` of the kernel set `kernels` names; "cudnn" is `fused_attention` whatever it is."""
    if implementation == "cudnn":
        return fused_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (N, heads, L, head_dim)
    return KERNEL_SETS[kernels].softmax_attention(q, k, v).transpose(0, 2, 1, 3)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` (cuDNN's fused kernel) on (batch, tokens, heads, head_dim) arrays.

    cuDNN trains only on even token counts (the decoder has 197 tokens): an odd sequence gets one padding
    token, which the sequence lengths keep out of every softmax, and its output row is dropped.
    """
    n, length = q.shape[:2]
    if length % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    q, k, v = (jnp.pad(t, ((0, 0), (0, 1), (0, 0), (0, 0))) for t in (q, k, v))
    lengths = jnp.full((n,), length, jnp.int32)
    out = jax.nn.dot_product_attention(
        q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=implementation
    )
    return out[:, :length]


@jax.custom_vjp
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v on (batch, heads, tokens, head_dim) arrays, softmax in float32.

    The hand-written backward keeps the probabilities from the forward and takes the softmax's row term
    from the small output (sum(dO * O) instead of sum(dP * P) over tokens x tokens): ~10% faster decoder
    blocks on CPU than XLA's own differentiation of `jax.nn.dot_product_attention`. The scale multiplies q
    (as timm's attention does), not the tokens x tokens logits: XLA:CPU hands a scalar times the logits
    to YNNPACK as a materialized tokens x tokens operand, which made the decoder's attention ~30% slower.
    """
    return _attention_forward(q, k, v)[0]


def _attention_forward(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, tuple]:
    q = q * q.shape[-1] ** -0.5
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
    return out, (q, k, v, probs, out)


def _attention_backward(residuals: tuple, d_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    scaled_q, k, v, probs, out = residuals
    d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    rows = jnp.sum(d_out.astype(jnp.float32) * out, axis=-1, keepdims=True)
    d_logits = (probs * (d_probs - rows)).astype(k.dtype)
    d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k * k.shape[-1] ** -0.5)
    d_k = jnp.einsum("bhqk,bhqd->bhkd", d_logits, scaled_q)
    d_v = jnp.einsum("bhqk,bhqd->bhkd", probs, d_out)
    return d_q, d_k, d_v


softmax_attention.defvjp(_attention_forward, _attention_backward)


# ---------------------------------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------------------------------


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), written with erf as torch.nn.GELU computes it.

    `jax.nn.gelu(approximate=False)` uses erfc, whose piecewise lowering made the MLP's forward and backward
    ~40% slower on CPU; the two agree within 1e-6. The backward keeps only the input: autodiff kept four
    MLP-hidden-size arrays per block for it (0.5 x, 1 + erf, the exp term and the output).
    """
    return 0.5 * x * (1 + jax.lax.erf(x * 2**-0.5))


def _gelu_forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return gelu(x), x


def _gelu_backward(x: jax.Array, d_out: jax.Array) -> tuple[jax.Array]:
    """d/dx x Phi(x) = Phi(x) + x phi(x), in float32."""
    x32 = x.astype(jnp.float32)
    cdf = 0.5 * (1 + jax.lax.erf(x32 * 2**-0.5))
    pdf = jnp.exp(-0.5 * x32 * x32) * (2 * np.pi) ** -0.5
    return ((d_out.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_forward, _gelu_backward)


# ---------------------------------------------------------------------------------------------------
# Kernel sets: which backward passes the blocks run (`Compute.kernels`)
# ---------------------------------------------------------------------------------------------------


class Kernels(NamedTuple):
    """The blocks' LayerNorm, softmax attention and GELU, each with one kind of backward pass."""

    layer_norm: Callable[[jax.Array, jax.Array, jax.Array, float], jax.Array]  # (x, scale, bias, epsilon)
    softmax_attention: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (q, k, v)
    gelu: Callable[[jax.Array], jax.Array]


# "custom": the hand-written backwards above. "autodiff": the functions those custom_vjps wrap (the same
# forwards) for jax to differentiate: the backwards that were slower on XLA:CPU, which XLA:GPU may fuse better.
KERNEL_SETS: dict[str, Kernels] = {
    "custom": Kernels(layer_norm_function, softmax_attention, gelu),
    "autodiff": Kernels(layer_norm_function.__wrapped__, softmax_attention.__wrapped__, gelu.__wrapped__),
}
