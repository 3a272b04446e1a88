"""Where arrays live: a (data, fsdp) mesh over every device of every host.

Batches are split over both axes. FSDP shards each weight kernel along its largest dimension that the
fsdp axis divides (XLA gathers it for the matmul and reduce-scatters its gradient); biases, norms, tokens
and the fixed position tables are small and replicated. Optimizer moments take the sharding of their
parameter, so FSDP divides their memory too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mae_jax.models.vit import is_stacked

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over every device


def mesh_shape(mesh_config: ml_collections.ConfigDict, device_count: int) -> tuple[int, int]:
    """(data, fsdp) sizes; one of them may be -1 for "the remaining devices"."""
    sizes = [mesh_config.data, mesh_config.fsdp]
    known = math.prod(size for size in sizes if size != -1)
    if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes) or device_count % known:
        raise ValueError(f"mesh.data={sizes[0]} x mesh.fsdp={sizes[1]} does not fit the {device_count} devices")
    sizes = [device_count // known if size == -1 else size for size in sizes]
    if math.prod(sizes) != device_count:
        raise ValueError(f"mesh.data={sizes[0]} x mesh.fsdp={sizes[1]} is not the {device_count} devices")
    return sizes[0], sizes[1]


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    # Automatic axis types: shardings are given at jit boundaries and XLA propagates them inside.
    return jax.make_mesh(
        mesh_shape(mesh_config, len(devices)), (DATA_AXIS, FSDP_AXIS), (AxisType.Auto,) * 2, devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_sharding(mesh: Mesh, path: tuple, shape: tuple[int, ...]) -> NamedSharding:
    """A kernel is split over fsdp along its largest dimension the axis divides; everything else replicated.

    The leading axis of stacked blocks' kernels (`Compute.scan_blocks`) is the layer, never split: the scan
    slices one layer per step, and each layer's kernel is split as the unrolled one is.
    """
    fsdp = mesh.shape[FSDP_AXIS]
    if fsdp > 1 and any(getattr(key, "key", None) == "kernel" for key in path):
        names = [jax.tree_util.keystr((key,), simple=True) for key in path]
        layer_axes = 1 if is_stacked(names) else 0
        for dim in sorted(range(layer_axes, len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % fsdp == 0:
                return NamedSharding(mesh, PartitionSpec(*[FSDP_AXIS if d == dim else None for d in range(len(shape))]))
    return replicated(mesh)


def params_shardings(mesh: Mesh, params: Any) -> Any:
    """The FSDP rule over a parameter tree (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: param_sharding(mesh, path, x.shape), params)


def train_state_shardings(mesh: Mesh, state: Any, tx: optax.GradientTransformation) -> Any:
    """Shardings for a train state with fields step, params, fixed and opt_state (abstract or concrete).

    `fixed` (what the optimizer does not train) follows the parameters' rule: a frozen encoder is sharded too.

    Moments are mapped from the parameter shardings through the optimizer's own state structure
    (`jax.jit(tx.init)` alone would leave them replicated); counters are replicated.
    """
    params = params_shardings(mesh, state.params)
    everywhere = replicated(mesh)
    opt_state = optax.tree_map_params(
        tx, lambda _, shard: shard, state.opt_state, params, transform_non_params=lambda _: everywhere
    )
    return state.replace(step=everywhere, params=params, fixed=params_shardings(mesh, state.fixed), opt_state=opt_state)


def on_mesh(step: Callable, mesh: Mesh | None) -> Callable:
    """`step` traced under `mesh` when it has an fsdp axis, so that `models.vit.split_batch` keeps activations
    split along the batch and FSDP gathers weights, never activations. Without FSDP it is `step` itself: XLA
    keeps the batch split by itself, and on CPU the constraints cost ~10% speed."""
    if mesh is None or mesh.shape[FSDP_AXIS] == 1:
        return step

    @functools.wraps(step)
    def step_on_mesh(*args: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step(*args)

    return step_on_mesh
