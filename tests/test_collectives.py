"""`collectives.collectives` counts what a compiled program communicates: checked on a program whose
collectives are known by construction, compiled for 4 CPU devices (its own process: the device count is set
before JAX starts) and for a TPU slice (the TPU compiler writes them asynchronously, fused, combined)."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mae_jax.collectives import collectives
from tests.conftest import run_on_eight_devices

DEVICES = 4
F32 = 4
GATHERED = DEVICES * 64 * 128 * F32  # one all-gather's result, run 3 times in the scan
SUMMED = 32 * 128 * F32  # the psum's operand
SCATTERED = 32 * 128 * F32  # the psum_scatter's (unreduced) input
PERMUTED = 64 * 128 * F32
EXPECTED = {
    "all-gather": (3, 3 * GATHERED),
    "all-reduce": (1, SUMMED),
    "collective-permute": (1, PERMUTED),
    "reduce-scatter": (1, SCATTERED),
}


def known_program(devices: list[jax.Device]) -> str:
    """The HLO text of a program with one gather in a 3-step loop, one sum, one reduce-scatter, one permute."""
    mesh = jax.make_mesh((DEVICES,), ("x",), (AxisType.Explicit,), devices=devices)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=(P("x"), P(), P("x"), P("x")))
    def program(a, b):
        def body(carry, _):
            return carry + jax.lax.all_gather(carry, "x", tiled=True)[:64] * 2, None

        looped, _ = jax.lax.scan(body, a, None, length=3)
        ring = [(i, (i + 1) % DEVICES) for i in range(DEVICES)]
        return (
            looped,
            jax.lax.psum(b, "x"),
            jax.lax.psum_scatter(b * 3, "x", tiled=True),
            jax.lax.ppermute(a, "x", ring),
        )

    a = jax.ShapeDtypeStruct((DEVICES * 64, 128), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    b = jax.ShapeDtypeStruct((DEVICES * 32, 128), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    return jax.jit(program).lower(a, b).compile().as_text()


def test_cpu_program_collectives_are_the_constructed_ones():
    assert run_on_eight_devices(__file__) == {kind: list(found) for kind, found in EXPECTED.items()}


def test_tpu_program_moves_the_same_bytes():
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # as plan.py: compiling uses no chip
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    text = known_program(devices)
    found = collectives(text)
    # The TPU compiler may combine the sum with the reduce-scatter into one all-reduce: kinds may merge, the
    # bytes may not change. The loop's gather is written once, in a loop whose trip count only its condition
    # (`i < 3`) tells: it runs 3 times.
    assert found["all-gather"] == EXPECTED["all-gather"]
    assert text.count("all-gather(") < 3
    assert sum(size for _, size in found.values()) == sum(size for _, size in EXPECTED.values())


def test_not_a_compiled_program():
    try:
        collectives("HloModule m\n")
    except ValueError as error:
        assert "ENTRY" in str(error)
    else:
        raise AssertionError("no error")


if __name__ == "__main__":
    print(json.dumps(collectives(known_program(jax.devices()[:DEVICES]))))
