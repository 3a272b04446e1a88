"""Plan a run before renting the pod: `python -m mae_jax.plan --config=CONFIG --topology=NAME [--num_slices=N]
[--json=FILE] [--config.key=value ...]`.

Compiles the train step of `config.task` (the task table's assembly: the program `main` runs) with the real
TPU compiler for a TPU slice that need not be there (`libtpu`, the `tpu` extra; any host, `JAX_PLATFORMS=cpu`
is enough), on shapes only: no array is allocated and no data read. Prints one table: the step's HBM per chip
against the chip's, the FLOPs, the collectives (`collectives.py`) and a roofline estimate of the step time and
MFU. `--json=FILE` writes the same figures. Exits 0 when the step fits; otherwise prints one line that names
what to change and exits 1.

Topologies are libtpu's names: `v4:2x2x1` (4 chips, one device per chip: megacore), `v5e:2x2`, `v5p:2x2x1`,
`v6e:4x4`... `--num_slices=N` plans N such slices joined over the data-center network (DCN): the data axis
spans the slices, FSDP stays within one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.sharding import AxisType, Mesh
from ml_collections import config_flags

from mae_jax import collectives, configuration, flops, loop, sharding, tasks
from mae_jax.configuration import ConfigError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """What the plan needs of a TPU generation: its HBM per chip and its ICI bandwidth per chip."""

    hbm_bytes: int
    ici_bytes_per_s: float  # one direction, all links of the chip together
    chip_config: str | None = None  # libtpu's `chip_config_name` that makes one JAX device per chip


# Per chip, from the Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e). HBM: v4
# "32 GiB", v5e "16 GB", v5p "95 GiB", v6e "32 GB" (the runtime keeps a little of it: a step within a few
# percent of the capacity may still fail). ICI: the pages' interchip interconnect figure per chip, one way: v5e
# 1,600 Gbps (their "400 GB/s bidirectional"), v5p 4,800 Gbps ("1,200 GB/s bidirectional"), v6e 3,584 Gbps;
# v4's 2,400 Gbps is the figure of the v5p launch post's comparison table (cloud.google.com/blog, Dec 2023).
CHIPS = {
    "v4": Chip(32 * GiB, 2400e9 / 8, chip_config="megacore"),
    "v5e": Chip(16 * GiB, 1600e9 / 8),
    "v5p": Chip(95 * GiB, 4800e9 / 8),
    "v6e": Chip(32 * GiB, 3584e9 / 8),
}
TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+x\d+(?:x\d+)?)$")
# The TPU compiler's refusal of a program larger than the HBM, e.g. "... the total memory required for HLO
# temporaries (66.10G) exceeds available HBM (15.75G)."
OUT_OF_MEMORY = re.compile(r"required for .*?\(([\d.]+)([KMGT]?)\) exceeds available HBM")
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
KNOWN = "v4:AxBxC (e.g. v4:2x2x1), v5e:AxB (v5e:2x2), v5p:AxBxC (v5p:2x2x1), v6e:AxB (v6e:4x4)"


class PlanError(ValueError):
    """A topology or setting that cannot be planned; the message is one line."""


def tpu_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
    """The compile-only devices of `num_slices` slices of `topology`, one per chip, in libtpu's order."""
    match = TOPOLOGY.match(topology)
    if not match:
        raise PlanError(f"unknown topology {topology!r}: known are {KNOWN}")
    if num_slices < 1:
        raise PlanError(f"--num_slices={num_slices} must be >= 1")
    from jax.experimental import topologies

    # libtpu's lockfile keeps a second process off the chips of a TPU VM; compiling touches none.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    chip = CHIPS[match.group(1)]
    kwargs = {"chip_config_name": chip.chip_config} if chip.chip_config else {}
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    try:
        return topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices
    except RuntimeError as error:  # libtpu missing, or a shape libtpu refuses (JaxRuntimeError is one)
        raise PlanError(f"cannot make topology {topology!r}: {str(error).strip().splitlines()[0]}") from None


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], num_slices: int) -> Mesh:
    """`main`'s (data, fsdp) mesh over `devices`; over several slices the data axis spans the slices (DCN)
    and each slice holds whole FSDP groups, so that only the data-parallel reduction crosses the DCN."""
    try:
        data, fsdp = sharding.mesh_shape(config.mesh, len(devices))
    except ValueError as error:
        raise PlanError(str(error)) from None
    if num_slices == 1:
        return sharding.make_mesh(config.mesh, devices)
    if data % num_slices:
        raise PlanError(f"mesh.data={data} is not a multiple of --num_slices={num_slices}: FSDP stays within a slice")
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_hybrid_device_mesh((data // num_slices, fsdp), (num_slices, 1), devices)
    return Mesh(grid, (sharding.DATA_AXIS, sharding.FSDP_AXIS), axis_types=(AxisType.Auto,) * 2)


def check_config(config: ml_collections.ConfigDict, chips: int) -> None:
    """`configuration.validate` for a slice of `chips` chips seen from a host that has none of them."""
    alone = config.copy_and_resolve_references()
    alone.mesh.data, alone.mesh.fsdp = -1, 1  # the device-count checks are made below, for the slice
    configuration.validate(alone)
    per_step = chips * config.grad_accum_steps
    if config.batch_size % per_step:
        raise ConfigError(
            f"batch_size={config.batch_size} is not a positive multiple of the {chips} chips"
            + (f" x grad_accum_steps={config.grad_accum_steps}" if config.grad_accum_steps > 1 else "")
        )


def batch_shapes(config: ml_collections.ConfigDict, assembly: loop.Assembly) -> list[jax.ShapeDtypeStruct]:
    """The batch entries the step takes, as the input pipeline delivers them (uint8 images, int32 labels)."""
    shapes = {
        "image": jax.ShapeDtypeStruct(
            (config.batch_size, config.image_size, config.image_size, config.num_channels), np.uint8
        ),
        "label": jax.ShapeDtypeStruct((config.batch_size,), np.int32),
    }
    return [
        jax.ShapeDtypeStruct(shapes[key].shape, shapes[key].dtype, sharding=assembly.batch_sharding)
        for key in assembly.batch_keys
    ]


def hbm_bytes(compiled: jax.stages.Compiled) -> int:
    """Per-chip HBM of a compiled step: arguments + temporaries + outputs - what the outputs alias (donated)."""
    memory = compiled.memory_analysis()
    return (
        memory.argument_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
    )


def assemble(config: ml_collections.ConfigDict, mesh: Mesh) -> loop.Assembly:
    """The task table's assembly of `config`'s step on `mesh`: what `main` and the benchmark compile."""
    if config.get("init"):  # the step is the same whatever encoder it starts from: plan without reading it
        config = config.copy_and_resolve_references()
        config.init = ""
    return tasks.of(config).assemble(config, mesh, *loop.schedule_steps(config, config.batch_size))


def required_bytes(error: Exception) -> int | None:
    """The HBM the TPU compiler found a step needs, from its out-of-memory error; None if it does not say."""
    found = OUT_OF_MEMORY.search(str(error))
    return int(float(found.group(1)) * UNITS[found.group(2)]) if found else None


def xla_flops(compiled: jax.stages.Compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # one entry per program in older JAX versions
        analysis = analysis[0] if analysis else {}
    return float(analysis.get("flops", 0.0))


def plan(
    config: ml_collections.ConfigDict, topology: str, num_slices: int = 1, hbm_bytes_limit: int | None = None
) -> dict:
    """Compile `config`'s step for `num_slices` slices of `topology` and return the plan's figures; the step
    fits in `hbm_bytes_limit` per chip (default: the chip's HBM)."""
    devices = tpu_devices(topology, num_slices)
    check_config(config, len(devices))
    mesh = make_mesh(config, devices, num_slices)
    assembly = assemble(config, mesh)
    chip = CHIPS[TOPOLOGY.match(topology).group(1)]
    chips = len(devices)
    figures = {
        "topology": topology,
        "num_slices": num_slices,
        "device_kind": devices[0].device_kind,
        "chips": chips,
        "mesh": dict(mesh.shape),
        "batch_size": config.batch_size,
        "hbm_capacity_bytes": hbm_bytes_limit or chip.hbm_bytes,
        "model_flops_per_step": assembly.flops_per_step,
    }
    start = time.perf_counter()
    try:
        compiled = assembly.train_step.lower(assembly.abstract_state, *batch_shapes(config, assembly)).compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise PlanError(f"the TPU compiler failed: {str(error).strip().splitlines()[0]}") from None
        # The compiler refuses a program that needs more than the chip's HBM: the step does not fit.
        unknown = dict.fromkeys(("xla_flops_per_chip", "collectives", "step_s_estimate", "mfu_estimate"))
        return (
            figures
            | unknown
            | {
                "hbm_bytes_per_chip": required_bytes(error),
                "fits": False,
                "compile_s": time.perf_counter() - start,
            }
        )
    compile_s = time.perf_counter() - start
    found = collectives.collectives(compiled.as_text())
    flops_per_chip = xla_flops(compiled)
    peak = flops.peak_tflops(devices[0], config.model.dtype) * 1e12
    moved = sum(size for _, size in found.values())
    step_s = max(flops_per_chip / peak, moved / chip.ici_bytes_per_s)
    hbm = hbm_bytes(compiled)
    return figures | {
        "hbm_bytes_per_chip": hbm,
        "fits": hbm <= figures["hbm_capacity_bytes"],
        "compile_s": compile_s,
        "xla_flops_per_chip": flops_per_chip,
        "collectives": {kind: {"count": count, "bytes": size} for kind, (count, size) in found.items()},
        "step_s_estimate": step_s,
        "mfu_estimate": assembly.flops_per_step / chips / peak / step_s,
    }


def what_to_change(config: ml_collections.ConfigDict, figures: dict) -> str:
    """The one line for a step that does not fit: how far over, and the settings that lower the HBM."""
    chips, fsdp = figures["chips"], figures["mesh"][sharding.FSDP_AXIS]
    options = []
    if fsdp < chips // figures["num_slices"]:
        options.append(f"--config.mesh.fsdp={chips // figures['num_slices']} (now {fsdp})")
    if not config.model.remat:
        options.append("--config.model.remat=True")
    if config.get("task", "pretrain") == "pretrain":
        options.append(f"--config.grad_accum_steps={2 * config.grad_accum_steps}")
    options.append("a smaller --config.batch_size")
    return (
        f"does not fit: {hbm_text(figures)} of {figures['device_kind']} HBM on {figures['topology']} at batch "
        f"{figures['batch_size']}; try " + ", or ".join(options)
    )


def hbm_text(figures: dict) -> str:
    """`X of Y GiB per chip`; for a step the compiler refused, X is at least what it said the temporaries need."""
    needed = figures["hbm_bytes_per_chip"]
    needed = "over" if needed is None else f"{'>= ' if figures['xla_flops_per_chip'] is None else ''}{needed / GiB:.2f}"
    return f"{needed} of {figures['hbm_capacity_bytes'] / GiB:.3g} GiB per chip"


def table(figures: dict) -> str:
    """The plan as one table for the terminal."""
    rows = [
        ("topology", f"{figures['topology']} x {figures['num_slices']} slice(s): {figures['chips']} x "
                     f"{figures['device_kind']}"),
        ("mesh", ", ".join(f"{axis}={size}" for axis, size in figures["mesh"].items())),
        ("global batch", str(figures["batch_size"])),
        ("HBM", f"{hbm_text(figures)} ({'fits' if figures['fits'] else 'does NOT fit'})"),
        ("compile", f"{figures['compile_s']:.1f} s"),
        ("model FLOPs per step", f"{figures['model_flops_per_step'] / 1e12:.4g} TFLOP"),
    ]  # fmt: skip
    if figures["xla_flops_per_chip"] is not None:  # the compiler refused a step that does not fit: no program
        rows.append(("XLA FLOPs per chip", f"{figures['xla_flops_per_chip'] / 1e12:.4g} TFLOP"))
        for kind, found in figures["collectives"].items():
            rows.append((kind, f"{found['count']} ops, {found['bytes'] / 1e6:.1f} MB per chip per step"))
        rows.append(("step (roofline)", f"{figures['step_s_estimate'] * 1e3:.3g} ms"))
        rows.append(("MFU (roofline)", f"{figures['mfu_estimate']:.1%}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined when run as a program: `main`'s `--config` would clash on import."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vit_base.py.", lock_config=True)
    flags.DEFINE_string("topology", None, f"TPU slice, libtpu's name: {KNOWN}.")
    flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-center network (multi-slice).")
    flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
    flags.DEFINE_float("hbm_gib", None, "Plan against this much HBM per chip (GiB) instead of the chip's: headroom.")
    flags.mark_flags_as_required(["config", "topology"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    limit = int(FLAGS.hbm_gib * GiB) if FLAGS.hbm_gib else None
    try:
        figures = plan(config, FLAGS.topology, FLAGS.num_slices, limit)
    except (PlanError, ConfigError) as error:
        sys.exit(f"error: {error}")
    print(table(figures))
    if FLAGS.json:
        with open(FLAGS.json, "w") as file:
            json.dump(figures, file, indent=1)
    if not figures["fits"]:
        sys.exit(what_to_change(config, figures))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=configuration.parse_flags)
