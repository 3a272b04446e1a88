"""The JAX steps the benchmark times: the train step of the config's task, compiled on synthetic batches (with
what XLA says of its compilation), and a square matmul for the CPU's peak."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mae_jax import loop, tasks
from mae_jax.benchmark.measured import Measured


def assemble(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> loop.Assembly:
    """The train step the loop of `config.task` compiles: the task table's `assemble`."""
    # The schedule's length changes no step: a run of `num_epochs` epochs of one batch each.
    return tasks.of(config).assemble(config, mesh, *loop.schedule_steps(config, config.batch_size))


def jax_device() -> str:
    device = jax.devices()[0]
    return f"{jax.default_backend()} ({device.device_kind})"


def jax_step(name: str, assembly: loop.Assembly, config: ml_collections.ConfigDict) -> tuple[Measured, dict]:
    """`assembly`'s step compiled on synthetic batches, and facts about its compilation."""
    rng = np.random.default_rng(0)
    synthetic = {
        "image": lambda: rng.integers(
            0, 256, (config.batch_size, config.image_size, config.image_size, config.num_channels), np.uint8
        ),
        "label": lambda: rng.integers(0, config.num_classes, config.batch_size, dtype=np.int32),
    }
    batch = [jax.device_put(synthetic[key](), assembly.batch_sharding) for key in assembly.batch_keys]
    state = assembly.init()
    start = time.perf_counter()
    compiled = assembly.train_step.lower(state, *batch).compile()
    facts = {"compile_s": time.perf_counter() - start, "xla_flops": _xla_flops(compiled)}
    memory = compiled.memory_analysis()
    if memory is not None:
        facts["footprint_bytes"] = memory.argument_size_in_bytes + memory.temp_size_in_bytes
    holder = [state]

    def run() -> None:
        holder[0], metrics = compiled(holder[0], *batch)
        jax.block_until_ready((holder[0], metrics))

    return Measured(name, run, assembly.flops_per_step, jax_device(), facts["compile_s"]), facts


def _xla_flops(compiled: jax.stages.Compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # one entry per program in older JAX versions
        analysis = analysis[0] if analysis else None
    return analysis.get("flops") if analysis else None


def matmul_peak(dtype: jnp.dtype) -> Measured:
    """The best of a few square matmuls: what this device's matmul units really deliver."""
    size = 2048
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)

    def run() -> None:
        for _ in range(3):
            matmul(a, a).block_until_ready()

    return Measured("matmul", run, 3 * 2 * size**3, jax_device())
