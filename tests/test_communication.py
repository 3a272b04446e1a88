"""What the train steps communicate, read from the compiled program (`mae_jax.collectives`), for 8 CPU devices
and for a 4-chip TPU slice (`v5e:2x2`, compiled here by libtpu without the chips).

FSDP and data parallelism need the weight kernels gathered (forward and backward), the gradients reduced
(a reduce-scatter; an all-reduce, as XLA:CPU does; or on TPU a windowed reduce-scatter of permutes) and
scalars reduced. Activations never cross devices: the masking gather, the unshuffle, the loss and the logits
are per image. The batch is a size that divides no axis of any weight, so a collective of activations shows
a batch axis; one that XLA reshaped is caught by the bound on bytes, as the batch's images and MLP activations
each weigh 2-3x the parameters.

The compiles run once in a subprocess (this file run as a script) with 8 forced CPU devices. A data x fsdp
mesh is checked by tests/test_sharding.py, which runs the step.
"""

from __future__ import annotations

import functools
import json
import re

import pytest

from tests.conftest import run_on_eight_devices

# 120 images: 15 per CPU device, 30 per TPU chip. No kernel, bias or table of the tiny models has an axis
# that is a multiple of these, so a collective array with such an axis holds activations. (The TPU compile takes
# seconds at this batch, ~3x longer at 960.)
BATCH = 120
TPU_TOPOLOGY = "v5e:2x2"
# Gathers (forward and backward) plus the gradient reduction are about 2x the float32 parameter bytes; an
# activation collective of this batch adds 2-3x more.
MAX_BYTES_PER_PARAM_BYTE = 2.5
# task, backend, data x fsdp
CASES = {
    "pretrain_cpu_fsdp": ("pretrain", "cpu", (1, 8)),
    "finetune_cpu_fsdp": ("finetune", "cpu", (1, 8)),
    "pretrain_tpu_fsdp": ("pretrain", TPU_TOPOLOGY, (1, 4)),
    "finetune_tpu_fsdp": ("finetune", TPU_TOPOLOGY, (1, 4)),
}
_COLLECTIVE_LINE = re.compile(
    r"=\s*(.+?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute|collective-broadcast)"
    r"(?:-start)?\("
)


def collective_axes(hlo: str) -> list[list[int]]:
    """The dimensions of every array a collective instruction of `hlo` returns."""
    return [
        [int(d) for d in dims.split(",") if d]
        for shape, _ in _COLLECTIVE_LINE.findall(hlo)
        for dims in re.findall(r"\b[a-z]\w*\[([\d,]*)\]", re.sub(r"\{[^{}]*\}", "", shape))
    ]


def compile_case(task: str, backend: str, mesh_shape: tuple[int, int]) -> dict:
    """Compile the task table's step of a tiny model for `backend` ("cpu" or a TPU topology): its
    collectives, the dimensions of their arrays, the float32 bytes of its trained parameters, and the
    per-device batch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import topologies
    from ml_collections import ConfigDict

    from mae_jax import collectives, sharding, tasks
    from tests.conftest import tiny_downstream_config, tiny_train_config

    if backend == "cpu":
        devices = jax.devices()
    else:
        devices = topologies.get_topology_desc(topology_name=backend, platform="tpu").devices
    mesh = sharding.make_mesh(ConfigDict({"data": mesh_shape[0], "fsdp": mesh_shape[1]}), devices)
    if task == "pretrain":
        config = tiny_train_config(batch_size=BATCH)
    else:
        # Mixup and CutMix pair image i with image N-1-i of the global batch (`augment.mixup_cutmix`): that
        # moves input images between devices by design, so they are off here.
        config = tiny_downstream_config(task, batch_size=BATCH, **{"augment.mixup": 0.0, "augment.cutmix": 0.0})
    assembly = tasks.TASKS[task].assemble(config, mesh, total_steps=100, warmup_steps=1)
    size = config.image_size
    batch = [jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.uint8, sharding=assembly.batch_sharding)]
    if task != "pretrain":
        batch.append(jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=assembly.batch_sharding))
    hlo = assembly.train_step.lower(assembly.abstract_state, *batch).compile().as_text()
    params = jax.tree.leaves(assembly.abstract_state.params)
    return {
        "collectives": collectives.collectives(hlo),
        "axes": collective_axes(hlo),
        "param_bytes": int(sum(4 * np.prod(x.shape) for x in params)),
        "local_batch": BATCH // len(devices),
    }


def worker() -> None:
    print(json.dumps({name: compile_case(*case) for name, case in CASES.items()}))


@functools.cache
def results() -> dict:
    return run_on_eight_devices(__file__)


@pytest.mark.parametrize("case", CASES)
def test_collective_bytes_are_bounded_by_the_parameter_bytes(case: str):
    result = results()[case]
    total = sum(size for _, size in result["collectives"].values())
    assert total <= MAX_BYTES_PER_PARAM_BYTE * result["param_bytes"], (total / result["param_bytes"], result)


@pytest.mark.parametrize("case", CASES)
def test_no_collective_moves_activations(case: str):
    result = results()[case]
    local_batch = result["local_batch"]
    batch_axes = [dims for dims in result["axes"] if any(d and d % local_batch == 0 for d in dims)]
    assert not batch_axes, f"collectives of arrays with a batch axis (per device {local_batch}): {batch_axes}"
    assert "all-to-all" not in result["collectives"]


@pytest.mark.parametrize("case", [name for name, (_, backend, _) in CASES.items() if backend != "cpu"])
def test_tpu_step_gathers_weights_and_reduces_gradients(case: str):
    """The TPU compiler's own program: weights gathered, gradients reduce-scattered (`all-reduce-scatter`
    fusions, or windowed loops of permutes on larger models)."""
    found = results()[case]["collectives"]
    assert found["all-gather"][0] > 0
    assert "reduce-scatter" in found or "collective-permute" in found, found


if __name__ == "__main__":
    worker()
