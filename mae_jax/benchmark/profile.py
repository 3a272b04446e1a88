"""`--profile`: a few steps traced with `jax.profiler`, and the device operations that took the most time read
back from the Perfetto trace: where a GPU or TPU step goes."""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json

import jax
from etils import epath

from mae_jax.benchmark.measured import Measured

PROFILE_STEPS = 3


@dataclasses.dataclass(frozen=True)
class DeviceOp:
    name: str
    ms_per_step: float
    calls_per_step: float


def trace_steps(measured: Measured, directory: str, steps: int = PROFILE_STEPS) -> list[DeviceOp]:
    """Trace `steps` runs into `directory`; the device operations by total time, longest first."""
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for _ in range(steps):
            measured.run()
    newest = max(epath.Path(directory).glob("plugins/profile/*/perfetto_trace.json.gz"), key=lambda p: p.parent.name)
    with gzip.open(newest.open("rb")) as f:
        trace = json.load(f)
    return device_ops(trace["traceEvents"] if isinstance(trace, dict) else trace, steps)


def device_ops(events: list[dict], steps: int) -> list[DeviceOp]:
    """Sum the complete ("X") events of the device processes (`/device:GPU:0`, `/device:TPU:0`, ...) by name.

    GPU processes hold one line of kernels per stream. A TPU's also has "Steps" and "XLA Modules" lines that
    span many ops: where an "XLA Ops" line exists, only it counts. XLA:CPU runs on host threads and has no
    device process: there the list is empty.
    """

    def named(kind: str) -> list[tuple[dict, str]]:  # metadata events: process and thread names
        return [(e, e["args"]["name"]) for e in events if e.get("ph") == "M" and e.get("name") == kind]

    devices = {e["pid"] for e, name in named("process_name") if name.startswith("/device:")}
    op_lines = {(e["pid"], e["tid"]) for e, name in named("thread_name") if e["pid"] in devices and name == "XLA Ops"}
    counted = (lambda e: (e["pid"], e["tid"]) in op_lines) if op_lines else (lambda e: e["pid"] in devices)
    microseconds, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and counted(e):
            microseconds[e["name"]] += e.get("dur", 0)
            calls[e["name"]] += 1
    return [DeviceOp(name, us / steps / 1e3, calls[name] / steps) for name, us in microseconds.most_common()]


def print_device_ops(ops: list[DeviceOp], directory: str, top: int = 25) -> None:
    if not ops:
        print(f"profile in {directory}: no device operations in the trace (XLA:CPU runs on host threads)")
        return
    total = sum(op.ms_per_step for op in ops)
    print(f"profile in {directory}: {total:.2f} ms of device operations per step; the longest:")
    for op in ops[:top]:
        print(f"{op.ms_per_step:9.3f} ms {op.ms_per_step / total:6.1%} {op.calls_per_step:6.1f}x  {op.name[:100]}")
