"""`python -m mae_jax.plan` compiles the real train step with the TPU compiler for slices that are not
there (libtpu, the `tpu` extra): a tiny pretraining model on `v5e:2x2` and on the smallest v4 slice."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from mae_jax import plan, sharding
from tests.conftest import REPO, TINY_MAIN_FLAGS, tiny_train_config

KEYS = {
    "topology", "chips", "mesh", "hbm_bytes_per_chip", "hbm_capacity_bytes", "fits", "compile_s",
    "xla_flops_per_chip", "model_flops_per_step", "collectives", "step_s_estimate", "mfu_estimate",
}  # fmt: skip
CLI = [sys.executable, "-m", "mae_jax.plan", "--config=configs/demo.py", *TINY_MAIN_FLAGS]


def run_plan(*flags: str) -> subprocess.CompletedProcess:
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    return subprocess.run([*CLI, *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def by_hand_shard_shapes(assembly, config, chips: int) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, per-chip shape) of every argument of the step, from the shapes and partition specs alone: a
    dimension split over fsdp holds 1/fsdp of its length; each chip holds 1/chips of the batch."""
    fsdp = assembly.mesh.shape[sharding.FSDP_AXIS]
    shapes = []
    for leaf in jax.tree.leaves(assembly.abstract_state):
        spec = tuple(leaf.sharding.spec) + (None,) * (len(leaf.shape) - len(leaf.sharding.spec))
        shapes.append(
            (np.dtype(leaf.dtype).name, tuple(d // fsdp if s else d for d, s in zip(leaf.shape, spec, strict=True)))
        )
    image = (config.batch_size // chips, config.image_size, config.image_size, config.num_channels)
    return [*shapes, ("uint8", image)]


TYPES = {"pred": "bool", "f32": "float32", "bf16": "bfloat16", "s32": "int32", "u32": "uint32", "u8": "uint8"}
LAYOUT = re.compile(r"([a-z0-9]+)\[([\d,]*)\]\{([\d,]*)(?::T\(([\d,]+)\))?")


def padded_bytes(dtype: str, dims: tuple[int, ...], minor_to_major: tuple[int, ...], tile: tuple[int, ...]) -> int:
    """Bytes of an array in a TPU tiled layout: its minor-most dimensions rounded up to the tile."""
    physical = [dims[i] for i in reversed(minor_to_major)] or [1]  # major to minor; a scalar is one element
    for i, size in enumerate(tile[-len(physical) :], start=len(physical) - min(len(tile), len(physical))):
        physical[i] = -(-physical[i] // size) * size
    return math.prod(physical) * np.dtype(dtype).itemsize


@pytest.mark.parametrize("topology", ["v5e:2x2", "v4:2x2x1"])
def test_tiny_pretraining_step_compiles_for_the_slice(topology):
    config = tiny_train_config(**{"mesh.fsdp": 4})
    figures = plan.plan(config, topology)
    assert KEYS <= set(figures)
    assert figures["chips"] == 4 and figures["mesh"] == {"data": 1, "fsdp": 4}
    assert figures["device_kind"] == {"v5e:2x2": "TPU v5 lite", "v4:2x2x1": "TPU v4"}[topology]
    assert figures["fits"] and 0 < figures["hbm_bytes_per_chip"] < 2**30
    assert figures["hbm_capacity_bytes"] == {"v5e:2x2": 16, "v4:2x2x1": 32}[topology] * 2**30
    # XLA's own count of the per-chip FLOPs against the analytic model count (matmuls only): same order
    assert 0.25 < figures["xla_flops_per_chip"] * 4 / figures["model_flops_per_step"] < 4
    assert figures["collectives"]["all-gather"]["count"] > 0  # FSDP gathers the kernels
    assert 0 < figures["mfu_estimate"] <= 1 and figures["step_s_estimate"] > 0


def test_argument_bytes_match_the_shapes_and_shardings():
    """The HBM figure's argument part equals a count made by hand from the state's shapes and shardings."""
    config = tiny_train_config(**{"mesh.fsdp": 4})
    devices = plan.tpu_devices("v5e:2x2")
    assembly = plan.assemble(config, plan.make_mesh(config, devices, 1))
    compiled = assembly.train_step.lower(assembly.abstract_state, *plan.batch_shapes(config, assembly)).compile()
    memory = compiled.memory_analysis()
    # The compiled program's per-chip argument shapes are those the specs give by hand ...
    layout = compiled.as_text().split("entry_computation_layout={(", 1)[1].split(")->", 1)[0]
    arguments = [
        (TYPES[t], tuple(int(d) for d in dims.split(",") if d), m, tile) for t, dims, m, tile in LAYOUT.findall(layout)
    ]
    compiled_shapes = sorted((t, dims) for t, dims, _, _ in arguments if dims)  # jit drops unused scalars
    assert compiled_shapes == sorted(shape for shape in by_hand_shard_shapes(assembly, config, 4) if shape[1])
    # ... and their bytes, padded to the printed TPU tiles, are what memory_analysis counts
    expected = sum(
        padded_bytes(t, dims, tuple(int(i) for i in m.split(",") if i), tuple(int(i) for i in tile.split(",") if i))
        for t, dims, m, tile in arguments
    )
    assert memory.argument_size_in_bytes == pytest.approx(expected, rel=0.03)
    assert plan.hbm_bytes(compiled) >= memory.argument_size_in_bytes


def test_cli_writes_the_json_and_refuses_a_step_that_does_not_fit(tmp_path):
    path = tmp_path / "plan.json"
    fits = run_plan("--topology=v5e:2x2", "--config.mesh.fsdp=4", f"--json={path}")
    assert fits.returncode == 0, fits.stderr[-2000:]
    assert "HBM" in fits.stdout and "all-gather" in fits.stdout
    assert KEYS <= set(json.loads(path.read_text()))
    too_big = run_plan("--topology=v5e:2x2", "--config.batch_size=1048576")
    assert too_big.returncode == 1
    last = too_big.stderr.strip().splitlines()[-1]
    assert last.startswith("does not fit:") and "--config.mesh.fsdp=4" in last and "batch_size" in last


def test_unknown_topology_is_one_line():
    result = run_plan("--topology=v9:2x2")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown topology 'v9:2x2': known are v4:")


def test_multislice_mesh_keeps_fsdp_within_a_slice():
    """Over two slices the data axis crosses the DCN and each FSDP group is one slice's chips."""
    config = tiny_train_config(**{"mesh.fsdp": 4})
    devices = plan.tpu_devices("v5e:2x2", num_slices=2)
    mesh = plan.make_mesh(config, devices, 2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    slices = [{device.slice_index for device in row} for row in mesh.devices]
    assert slices == [{0}, {1}]
