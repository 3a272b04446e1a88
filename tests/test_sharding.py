"""The train step on meshes of 8 fake CPU devices (data x fsdp = 2 x 4, and 8 x 1), against one device.

The pytest process has already started JAX with one device, so the 8-device runs happen once in a
subprocess (this file run as a script) that reports what the tests check: losses and parameters after
two steps, the state's shardings, and the collectives in the compiled step's HLO.
"""

from __future__ import annotations

import functools
import json
import re

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from mae_jax import sharding
from tests.conftest import run_on_eight_devices

BATCH = 16  # 2 images per device
STEPS = 2


def flatten(tree) -> list[tuple[tuple, jax.Array]]:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def local_batch(images: np.ndarray, batch_sharding: jax.sharding.NamedSharding) -> jax.Array:
    """The global batch built from this process's rows only, as `input_pipeline.device_prefetch` feeds it."""
    here = [
        i for d, i in batch_sharding.devices_indices_map(images.shape).items() if d.process_index == jax.process_index()
    ]
    rows = sorted({index[0].indices(len(images))[:2] for index in here})
    local = np.concatenate([images[start:stop] for start, stop in rows])
    return jax.make_array_from_process_local_data(batch_sharding, local, images.shape)


def run_steps(mesh: jax.sharding.Mesh, grad_accum_steps: int = 1, **overrides) -> dict:
    """STEPS steps of the tiny model on `mesh` (of one or more processes), as the task table assembles the
    pretraining step: losses, parameters (gathered to every host), every state leaf's global and per-device
    shape, and the compiled step's HLO. `overrides` are further dotted config keys."""
    from jax.experimental import multihost_utils

    from mae_jax import tasks
    from tests.conftest import tiny_train_config

    # lr 1e-3 from the first step (no warmup), almost constant over a long cosine
    config = tiny_train_config(
        batch_size=BATCH, grad_accum_steps=grad_accum_steps, base_lr=1e-3 * 256 / BATCH, **overrides
    )
    assembly = tasks.TASKS["pretrain"].assemble(config, mesh, total_steps=10_000, warmup_steps=0)
    state = assembly.init()
    batches = [np.random.default_rng(i).integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8) for i in range(STEPS)]
    compiled = assembly.train_step.lower(state, local_batch(batches[0], assembly.batch_sharding)).compile()
    shapes = {jax.tree_util.keystr(p): [x.shape, x.addressable_shards[0].data.shape] for p, x in flatten(state)}
    losses = []
    for images in batches:
        state, metrics = compiled(state, local_batch(images, assembly.batch_sharding))
        losses.append(float(metrics["loss"]))
    params = multihost_utils.process_allgather(state.params, tiled=True)
    return {
        "losses": losses,
        "params": {jax.tree_util.keystr(p): np.asarray(x).tolist() for p, x in flatten(params)},
        "shard_shapes": shapes,
        "hlo": compiled.as_text(),
    }


def worker() -> None:
    assert jax.device_count() == 8
    results = {
        "single": run_steps(sharding.make_mesh(ConfigDict({"data": 1, "fsdp": 1}), jax.devices()[:1])),
        "fsdp": run_steps(sharding.make_mesh(ConfigDict({"data": 2, "fsdp": 4}))),
        "data_accum": run_steps(sharding.make_mesh(ConfigDict({"data": 8, "fsdp": 1})), grad_accum_steps=2),
    }
    print(json.dumps(results))


@functools.cache
def eight_device_results() -> dict:
    return run_on_eight_devices(__file__)


def assert_same_training(a: dict, b: dict) -> None:
    """Equal losses and parameters within float32 reduction-order tolerance."""
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    # Adam divides each gradient element by its own size, so an element whose gradient nearly cancels carries
    # its reduction-order noise (up to ~1 % of it) into the update: allow 1 % of one step of lr 1e-3. A wrong
    # sharding or batch split moves parameters by whole steps.
    assert_same_params(a["params"], b["params"], rtol=1e-4, atol=1e-5)


def assert_same_params(a: dict, b: dict, *, rtol: float, atol: float) -> None:
    """Parameters (name -> array or nested list) equal within tolerance, but for the attention key biases."""
    assert a.keys() == b.keys()
    for name, value in a.items():
        x, y = np.asarray(value), np.asarray(b[name])
        if name.endswith("['qkv']['bias'].value"):
            # The key bias adds the same logit to every key, which softmax ignores: its gradient is exactly zero,
            # and Adam turns the rounding noise left in its place into steps of +-lr. Compare the q and v parts
            # (along the last axis: stacked blocks have a leading layer axis).
            keys = np.s_[x.shape[-1] // 3 : 2 * x.shape[-1] // 3]
            x, y = np.delete(x, keys, axis=-1), np.delete(y, keys, axis=-1)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=name)


def test_sharded_step_equals_single_device():
    results = eight_device_results()
    assert_same_training(results["fsdp"], results["single"])


def test_grad_accumulation_equals_one_big_batch():
    results = eight_device_results()
    assert_same_training(results["data_accum"], results["fsdp"])


def test_fsdp_shards_kernels_and_their_adam_moments():
    shard_shapes = eight_device_results()["fsdp"]["shard_shapes"]
    kernels = [name for name in shard_shapes if "['kernel']" in name]
    assert len(kernels) == 3 * 15  # 15 kernels in the tiny MAE: params, Adam mu and nu
    for name in kernels:
        (rows, cols, *rest), shard = shard_shapes[name]
        assert np.prod(shard) * 4 == rows * cols * np.prod(rest), name  # a quarter on each device
    for name, (shape, shard) in shard_shapes.items():
        if "['kernel']" not in name:
            assert shape == shard, name  # biases, norms, tokens, position tables, counters: replicated


def collectives(hlo: str) -> dict[str, list[tuple[int, ...]]]:
    """Result shapes of every all-gather, all-to-all and collective-permute in compiled HLO text."""
    found: dict[str, list[tuple[int, ...]]] = {"all-gather": [], "all-to-all": [], "collective-permute": []}
    for result, op in re.findall(r"= (.*?) (all-gather|all-to-all|collective-permute)(?:-start)?\(", hlo):
        found[op] += [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", result)]
    return found


def test_fsdp_gathers_weights_never_activations():
    """The masking and unshuffle gathers included: activations stay on their device; FSDP gathers kernels."""
    results = eight_device_results()["fsdp"]
    found = collectives(results["hlo"])
    kernels = [tuple(shape) for name, (shape, _) in results["shard_shapes"].items() if "['kernel']" in name]
    # The patch embedding multiplies by its (p, p, 3, D) kernel as a (p*p*3, D) matrix: XLA may gather it in that view.
    kernel_shapes = set(kernels) | {(int(np.prod(shape[:-1])), shape[-1]) for shape in kernels}
    assert found["all-gather"], "FSDP must gather the kernels"
    assert set(found["all-gather"]) <= kernel_shapes, set(found["all-gather"]) - kernel_shapes
    assert not found["all-to-all"] and not found["collective-permute"]


def test_data_parallel_gathers_nothing():
    """Replicated parameters, batch-split activations: only the gradient all-reduce crosses devices."""
    assert collectives(eight_device_results()["data_accum"]["hlo"]) == {
        "all-gather": [],
        "all-to-all": [],
        "collective-permute": [],
    }


def test_mesh_shape_from_config():
    assert sharding.mesh_shape(ConfigDict({"data": -1, "fsdp": 4}), 8) == (2, 4)
    assert sharding.mesh_shape(ConfigDict({"data": 2, "fsdp": -1}), 8) == (2, 4)
    assert sharding.mesh_shape(ConfigDict({"data": -1, "fsdp": 1}), 1) == (1, 1)
    for data, fsdp in [(3, -1), (2, 2), (-1, -1), (0, 8)]:
        with pytest.raises(ValueError, match=r"mesh\.data"):
            sharding.mesh_shape(ConfigDict({"data": data, "fsdp": fsdp}), 8)


if __name__ == "__main__":
    worker()
