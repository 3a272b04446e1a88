"""`model.kernels`: the blocks' hand-written backward passes ("custom") against jax's autodiff ("autodiff").

The two differ in the backward pass only, so they must give the same loss and gradients up to float32
rounding, and the switch must reach every LayerNorm, attention and GELU of the model (no custom_vjp left on
the autodiff path). The autodiff attention and GELU are checked against jax's own ops here; LayerNorm (both sets) and
the custom kernels in tests/test_ops.py.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mae_jax import configuration, finetune
from mae_jax.models.classifier import Classifier
from mae_jax.models.mae import MAE, MAEConfig
from mae_jax.models.ops import KERNEL_SETS, check_kernels
from mae_jax.models.vit import Compute
from tests.conftest import TINY, tiny_downstream_config, tiny_train_config

AUTODIFF = KERNEL_SETS["autodiff"]


def with_kernels(kernels: str, scan_blocks: bool) -> MAEConfig:
    return dataclasses.replace(TINY, compute=Compute(scan_blocks=scan_blocks, kernels=kernels))


def loss_function(config: MAEConfig):
    """(params -> the tiny MAE's loss on fixed images and masking noise, params at seed 0)."""
    graphdef, params, fixed = nnx.split(MAE(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    noise = jax.random.uniform(jax.random.key(2), (4, config.encoder.num_patches))
    return lambda params: nnx.merge(graphdef, params, fixed)(images, noise=noise).loss, params


def custom_vjp_calls(jaxpr: jax.extend.core.Jaxpr) -> int:
    """How many custom_vjp functions `jaxpr` calls, counting those in nested jaxprs (scan bodies, jit calls)."""
    calls = 0
    for eqn in jaxpr.eqns:
        calls += eqn.primitive.name == "custom_vjp_call"
        calls += sum(custom_vjp_calls(inner) for inner in jax.extend.core.jaxprs_in_params(eqn.params))
    return calls


# ---------------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scan_blocks", [False, True], ids=["unrolled", "scanned"])
def test_autodiff_kernels_give_the_custom_loss_and_gradients(scan_blocks: bool):
    """float32 on both paths. The gradients' tolerance, 1e-5 of each parameter's largest gradient: the two
    backward passes compute the same derivative in another order (e.g. the softmax row term as sum(dO * O)
    or as sum(dP * P)), each rounding at float32's 6e-8 per operation through 3 blocks' sums of a few hundred
    terms; measured here below 5e-7. A wrong term in any backward (say LayerNorm's mean term dropped, or GELU's
    x phi(x)) moves gradients by far more than that."""
    (custom_loss, custom_grads), (loss, grads) = (
        jax.jit(jax.value_and_grad(function))(params)
        for function, params in (loss_function(with_kernels(kernels, scan_blocks)) for kernels in KERNEL_SETS)
    )
    np.testing.assert_allclose(loss, custom_loss, rtol=1e-6, atol=0)
    custom_leaves = jax.tree_util.tree_leaves_with_path(custom_grads)
    assert jax.tree.structure(grads) == jax.tree.structure(custom_grads)
    for (path, expected), actual in zip(custom_leaves, jax.tree.leaves(grads), strict=True):
        bound = 1e-5 * float(np.max(np.abs(expected)))
        np.testing.assert_allclose(actual, expected, rtol=0, atol=bound, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("scan_blocks", [False, True], ids=["unrolled", "scanned"])
def test_the_switch_reaches_every_layer_norm_attention_and_gelu(scan_blocks: bool):
    """A custom kernel shows in a jaxpr as a custom_vjp call in the forward pass that jax differentiates (the
    gradient's jaxpr inlines its forward and backward rules). With "custom" each LayerNorm (final norms too),
    Attention and Mlp of the model makes one (scanned: once per stack, in the scan's body); with "autodiff"
    neither the forward nor the gradient has any."""
    model = nnx.eval_shape(lambda: MAE(with_kernels("custom", scan_blocks), rngs=nnx.Rngs(0)))
    modules = collections.Counter(type(node).__name__ for _, node in nnx.iter_graph(model))
    function, params = loss_function(with_kernels("custom", scan_blocks))
    kernel_modules = modules["LayerNorm"] + modules["Attention"] + modules["Mlp"]
    assert kernel_modules == (10 if scan_blocks else 14)  # 4 a block, 3 blocks (2 stacks), 2 final norms
    assert custom_vjp_calls(jax.make_jaxpr(function)(params).jaxpr) == kernel_modules
    function, params = loss_function(with_kernels("autodiff", scan_blocks))
    assert custom_vjp_calls(jax.make_jaxpr(function)(params).jaxpr) == 0
    assert custom_vjp_calls(jax.make_jaxpr(jax.grad(function))(params).jaxpr) == 0


def test_model_json_keeps_the_kernels_and_loads_without_them():
    config = with_kernels("autodiff", scan_blocks=False)
    assert MAEConfig.from_dict(config.to_dict()).compute.kernels == "autodiff"
    fields = config.to_dict()
    del fields["compute"]["kernels"]  # a model.json written before the field existed
    assert MAEConfig.from_dict(fields) == TINY


def test_config_key_reaches_the_model():
    config = tiny_train_config(**{"model.kernels": "autodiff"})
    configuration.validate(config)
    assert configuration.model_config(config).compute == Compute(kernels="autodiff")
    assert configuration.model_config(tiny_train_config()).compute.kernels == "custom"


def test_unknown_kernels_are_a_one_line_error():
    message = "kernels='triton' must be one of ('custom', 'autodiff')"
    with pytest.raises(configuration.ConfigError) as error:
        configuration.validate(tiny_train_config(**{"model.kernels": "triton"}))
    assert str(error.value) == f"model.{message}"
    for check in (lambda: check_kernels("xla", "float32", "cpu", "triton"), lambda: Compute(kernels="triton")):
        with pytest.raises(ValueError) as error:
            check()
        assert str(error.value) == message


# ---------------------------------------------------------------------------------------------------
# The autodiff kernels against flax's and jax's own
# ---------------------------------------------------------------------------------------------------
def test_autodiff_gelu_is_jax_exact_gelu():
    """erf against jax's erfc lowering: the two agree within 1e-6 in value and slope (float32)."""
    x = jnp.linspace(-8, 8, 1001)
    ours, ours_vjp = jax.vjp(AUTODIFF.gelu, x)
    theirs, theirs_vjp = jax.vjp(lambda x: jax.nn.gelu(x, approximate=False), x)
    cotangent = jax.random.normal(jax.random.key(0), x.shape)
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(ours_vjp(cotangent)[0], theirs_vjp(cotangent)[0], atol=1e-6, rtol=1e-6)


def test_autodiff_attention_is_jax_dot_product_attention():
    q, k, v, cotangent = (jax.random.normal(jax.random.key(i), (2, 3, 7, 8)) for i in range(4))  # (N, heads, L, hd)

    def reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:  # jax wants (N, L, heads, hd)
        swap = lambda x: x.swapaxes(1, 2)  # noqa: E731
        return swap(jax.nn.dot_product_attention(swap(q), swap(k), swap(v)))

    ours, ours_vjp = jax.vjp(AUTODIFF.softmax_attention, q, k, v)
    theirs, theirs_vjp = jax.vjp(reference, q, k, v)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    for a, b in zip(ours_vjp(cotangent), theirs_vjp(cotangent), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_fine_tuning_config_switches_the_classifier_kernels_too():
    """The classifier's own fc_norm included: no custom_vjp left in its forward with "autodiff"."""
    config = finetune.classifier_config(tiny_downstream_config("finetune", **{"model.kernels": "autodiff"}))
    assert config.compute.kernels == "autodiff" and config.global_pool
    model = Classifier(config, rngs=nnx.Rngs(0))
    assert model.fc_norm.kernels == "autodiff"
    graphdef, state = nnx.split(model)
    images = jnp.zeros((2, 32, 32, 3))
    jaxpr = jax.make_jaxpr(lambda state: nnx.merge(graphdef, state)(images))(state).jaxpr
    assert custom_vjp_calls(jaxpr) == 0
