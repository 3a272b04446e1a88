"""Model FLOPs (`flops.py`) against the multiply-adds of every matmul in the model's own jaxpr."""

from __future__ import annotations

import dataclasses
import math
import types

import jax
import pytest
from flax import nnx

from mae_jax import flops
from mae_jax.models.classifier import FINETUNE, LINPROBE, Classifier, ClassifierConfig
from mae_jax.models.mae import MAE, MAEConfig
from tests.conftest import TINY


def matmul_flops(jaxpr: jax.extend.core.Jaxpr) -> int:
    """2 x multiply-adds of every dot_general in a jaxpr (the model has no convolution), nested jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        out = eqn.outvars[0].aval.shape
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            total += 2 * math.prod(out) * math.prod(eqn.invars[0].aval.shape[d] for d in contracting)
        for param in eqn.params.values():
            if isinstance(param, jax.extend.core.ClosedJaxpr):
                total += matmul_flops(param.jaxpr)
    return total


@pytest.mark.parametrize("mask_ratio", [0.75, 0.6])
@pytest.mark.parametrize("baseline", [False, True], ids=["mae", "mask_tokens_in_encoder"])
@pytest.mark.parametrize("variant", ["tiny", "B/16", "tiny 4-band"])
def test_forward_flops_equal_the_models_matmuls(variant: str, baseline: bool, mask_ratio: float):
    config = TINY if variant.startswith("tiny") else MAEConfig.from_variant(variant)
    if variant == "tiny 4-band":
        config = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, num_channels=4))
    config = dataclasses.replace(config, mask_tokens_in_encoder=baseline)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MAE(config, rngs=nnx.Rngs(0))))
    size, channels = config.encoder.image_size, config.encoder.num_channels
    images = jax.ShapeDtypeStruct((2, size, size, channels), jax.numpy.float32)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x, mask_ratio, key=jax.random.key(0)).loss)(
        state, images
    )
    assert flops.forward_flops(config, mask_ratio) * 2 == matmul_flops(jaxpr.jaxpr)


@pytest.mark.parametrize("protocol", [FINETUNE, LINPROBE])
def test_classifier_flops_equal_the_models_matmuls(protocol: str):
    config = ClassifierConfig(TINY.encoder, num_classes=10, protocol=protocol)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Classifier(config, rngs=nnx.Rngs(0))))
    size = config.encoder.image_size
    images = jax.ShapeDtypeStruct((2, size, size, 3), jax.numpy.float32)
    forward = matmul_flops(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, images).jaxpr)
    head = 2 * 2 * config.encoder.width * config.num_classes
    # fine-tuning: forward and backward of everything; probing: the frozen encoder forward, the head 3x
    expected = 3 * forward if protocol == FINETUNE else forward + 2 * head
    assert flops.classifier_train_flops(config, batch_size=2) == expected


# Dense peaks from the vendors' datasheets (sparse figures halved), against names that contain one another.
@pytest.mark.parametrize(
    ("device_kind", "dtype", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.5),  # H100 SXM: BF16 1,979 with sparsity
        ("NVIDIA H100 80GB HBM3", "float32", 494.5),  # TF32 989 with sparsity
        ("NVIDIA H100 PCIe", "bfloat16", 756.5),  # not the SXM's: BF16 1,513 with sparsity
        ("NVIDIA L4", "bfloat16", 121.0),
        ("NVIDIA L40S", "bfloat16", 362.05),  # not the L4's 121
        ("NVIDIA L40", "bfloat16", 181.05),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
        ("NVIDIA RTX A1000", "bfloat16", None),  # not listed: no MFU, not the A100's
        ("TPU v5 lite", "float32", 197.0),  # how JAX names a v5e chip
        ("TPU v5", "bfloat16", 459.0),  # how JAX names a v5p chip
        ("TPU v6 lite", "bfloat16", 918.0),
        ("cpu", "bfloat16", None),
    ],
)
def test_peak_tflops_matches_the_exact_device_kind(device_kind: str, dtype: str, peak: float | None):
    device = types.SimpleNamespace(device_kind=device_kind)
    assert flops.peak_tflops(device, dtype) == peak
