"""The hand-written kernels against jax's and flax's own, and the check of which kernel runs where."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mae_jax import configuration
from mae_jax.models.ops import attention, check_kernels, fused_attention, gelu, softmax_attention
from mae_jax.models.vit import Block, Compute, layer_norm, run_blocks
from tests.conftest import tiny_train_config


@pytest.mark.parametrize("kernels", ["custom", "autodiff"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_is_flax_forward_with_the_same_gradients(dtype, kernels: str):
    """Both kernel sets (`model.kernels`): the hand-written backward and jax's autodiff of the same forward."""
    ours = layer_norm(64, nnx.Rngs(0), dtype, kernels=kernels)
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


def test_attention_on_fused_qkv_is_jax_dot_product_attention():
    """The dispatch's layout: q, k and v are the fused array's third axis, the output (N, L, heads, hd)."""
    qkv = jax.random.normal(jax.random.key(0), (2, 7, 3, 4, 8))  # (N, L, qkv, heads, hd)
    expected = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    np.testing.assert_allclose(attention(qkv, "xla"), expected, atol=1e-6)


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


# bfloat16's unit roundoff, 2^-9: the relative error of rounding one value.
BFLOAT16_ROUNDOFF = 2.0**-9


def plain_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v written out, for jax's autodiff: the reference, not our custom_vjp."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision="highest") * q.shape[-1] ** -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, axis=-1), v, precision="highest")


@pytest.mark.parametrize(
    "shape", [(2, 12, 50, 64), (2, 16, 197, 32)], ids=["B16_encoder_visible", "B16_decoder"]
)  # (batch, heads, tokens, head_dim) of ViT-B/16 MAE's encoder (49 kept + cls) and 512-wide decoder
def test_bfloat16_attention_backward_within_bfloat16_rounding(shape):
    """Our bfloat16 attention gradients against jax autodiff of plain float32 attention on the same inputs.

    The bound is in units of bfloat16's unit roundoff u: the output rounding alone costs up to 1 u per
    element, and the backward rounds the logits' gradient and the scaled key once more before its matmuls.
    Measured here: max abs error 1.9-3.4 u of the largest gradient, RMS error 1.2-1.9 u of the RMS gradient
    (jax's own autodiff of the same attention in bfloat16: 3-6.5 u and 2.3-3.7 u). A dq off by 1 % gives
    an RMS error of 6.5 u; a softmax row term off by 3 %, a max abs error of 9-15 u.
    """
    q, k, v, d_out = (
        jax.random.normal(key, shape).astype(jnp.bfloat16) for key in jax.random.split(jax.random.key(0), 4)
    )
    out, vjp = jax.vjp(softmax_attention, q, k, v)
    grads = vjp(d_out)
    assert out.dtype == jnp.bfloat16 and {g.dtype for g in grads} == {jnp.dtype(jnp.bfloat16)}
    _, reference_vjp = jax.vjp(plain_attention, *(x.astype(jnp.float32) for x in (q, k, v)))
    for name, ours, reference in zip(("dq", "dk", "dv"), grads, reference_vjp(d_out.astype(jnp.float32)), strict=True):
        error = np.asarray(ours, np.float32) - np.asarray(reference)
        max_error = np.max(np.abs(error)) / np.max(np.abs(reference)) / BFLOAT16_ROUNDOFF
        rms_error = np.linalg.norm(error) / np.linalg.norm(reference) / BFLOAT16_ROUNDOFF
        print(f"{name}: max abs error {max_error:.2f} u, RMS {rms_error:.2f} u")
        assert max_error <= 8 and rms_error <= 4, (name, max_error, rms_error)


CUDNN_NEEDS = "attention='cudnn' needs an NVIDIA GPU and dtype='bfloat16'"


@pytest.mark.parametrize(
    ("attention_name", "dtype", "backend", "message"),
    [
        ("xla", "float16", "cpu", "dtype='float16' must be one of ('float32', 'bfloat16')"),
        ("flash", "float32", "gpu", "attention='flash' must be one of ('xla', 'cudnn')"),
        ("cudnn", "float32", "gpu", CUDNN_NEEDS),
        ("cudnn", "bfloat16", "cpu", CUDNN_NEEDS),
        ("cudnn", "bfloat16", "tpu", CUDNN_NEEDS),
        ("cudnn", "float32", None, CUDNN_NEEDS),  # a wrong dtype shows without a machine to check
    ],
)
def test_kernel_check_rejects_each_combination_that_cannot_run(attention_name, dtype, backend, message):
    with pytest.raises(ValueError) as error:
        check_kernels(attention_name, dtype, backend)
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("attention_name", "dtype", "backend"),
    [
        ("xla", "float32", "cpu"),
        ("xla", "bfloat16", "tpu"),
        ("xla", "float32", "gpu"),
        ("cudnn", "bfloat16", "gpu"),
        ("cudnn", "bfloat16", None),  # Compute's check: a GPU run's model.json loads on a CPU
    ],
)
def test_kernel_check_passes_what_runs(attention_name, dtype, backend):
    check_kernels(attention_name, dtype, backend)


def test_compute_checks_its_kernels_but_not_the_machine():
    assert Compute("bfloat16", "cudnn").attention == "cudnn"  # here, on a CPU
    with pytest.raises(ValueError, match=re.escape(CUDNN_NEEDS)):
        Compute("float32", "cudnn")
    with pytest.raises(ValueError, match="dtype='float16' must be one of"):
        Compute("float16")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model.dtype": "float16"}, "model.dtype='float16' must be one of ('float32', 'bfloat16')"),
        ({"model.attention": "flash"}, "model.attention='flash' must be one of ('xla', 'cudnn')"),
        ({"model.attention": "cudnn"}, f"model.{CUDNN_NEEDS}"),  # float32
        ({"model.attention": "cudnn", "model.dtype": "bfloat16"}, f"model.{CUDNN_NEEDS}"),  # this machine's CPU
    ],
)
def test_configuration_reports_the_kernel_check_as_config_error(override, message):
    with pytest.raises(configuration.ConfigError) as error:
        configuration.validate(tiny_train_config(**override))
    assert str(error.value) == message
