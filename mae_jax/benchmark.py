"""Train-step speed: `python -m mae_jax.benchmark --config=configs/vit_base.py [--config.batch_size=8] [--baseline]
[--torch [--torch_steps=eager,compiled+fused]] [--rounds=5] [--peak_tflops=...] [--profile=DIR] [--json=PATH]`.

Compiles the real train step of the config's task (pretraining, fine-tuning or linear probing; sharding,
precision, optimizer as `--config` says) on synthetic images and prints the time it took to lower and compile,
the median step time, images/s (total and per device), model TFLOP/s per device and MFU. Model FLOPs are
counted analytically (`flops.py`): the matmuls forward and backward (pretraining: encoder on the visible
tokens, decoder on all), whatever remat recomputes; XLA's own count of the compiled step is printed beside
them. MFU is against the device's dense peak from a table of exact device kinds (`--peak_tflops` overrides it; a
kind the table lacks gets no MFU, and a line saying how to give the peak); on CPU the peak is a matmul measured in
the same run, so MFU says how close the step comes to what this machine can do.

`--baseline` also times the paper's Table 2 baseline (mask tokens in the encoder, which then sees every
token) and prints MAE's speedup over it; `--torch` times transformers' `ViTMAEForPreTraining` train step
(PyTorch, AdamW; on the GPU when JAX runs on one) on the same shapes, as each of `--torch_steps` says: `eager` or
`compiled` (`torch.compile`, backend `--torch_compile_backend`), `+fused` for the fused AdamW (else torch's
default, not fused: for-each on CUDA). Every measurement runs once per round, interleaved, so that machine noise
hits all alike; ratios are medians of per-round ratios. The two block layouts are compared in two processes
(`--config.model.scan_blocks=True` and `False`), each with its own empty compilation cache, as `benchmark_suite`
does: in one process the second compile would reuse the first's GEMM autotuning.

`--profile=DIR` then traces a few more steps with `jax.profiler` into DIR (TensorBoard's profile tab, XProf,
Perfetto) and prints the device operations that took the most time: where a GPU or TPU step goes.

`--json=PATH` also writes the figures to PATH, with the device, the versions, XLA_FLAGS, the config's model
and batch, peak device memory in bytes and every round's step times: what `benchmark_suite` reads for its report.

Before anything allocates, glibc's malloc is told to keep the memory it frees (`retain_freed_memory`): with
PyTorch in the same process, unmapping and faulting in XLA:CPU's per-step buffer again made both slower.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import gzip
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from mae_jax import configuration, convert, flops, loop, sharding, tasks

FLAGS = flags.FLAGS
WARMUP_ROUNDS = 2
PROFILE_STEPS = 3
TORCH_STEP = re.compile(r"(eager|compiled)(\+fused)?")  # an entry of --torch_steps
# glibc `mallopt` parameters (malloc.h), for `retain_freed_memory`.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


# ---------------------------------------------------------------------------------------------------
# Steps to time
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Measured:
    """A step to time: `run()` does one step and waits for it; `flops` per step."""

    name: str
    run: Callable[[], None]
    flops: float
    device: str  # what ran it: "gpu (NVIDIA H100 80GB HBM3)", "cuda (NVIDIA H100 80GB HBM3)", "cpu"
    compile_s: float | None = None  # lower + compile of a JAX step
    times: list[float] = dataclasses.field(default_factory=list)

    def time_once(self) -> float:
        start = time.perf_counter()
        self.run()
        self.times.append(time.perf_counter() - start)
        return self.times[-1]


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


@dataclasses.dataclass(frozen=True)
class TorchStep:
    """How a PyTorch train step runs: the model eager or `torch.compile`d, AdamW fused or torch's default."""

    compiled: bool
    fused: bool


def parse_torch_steps(entries: Sequence[str]) -> list[TorchStep]:
    """`--torch_steps` entries (`eager`, `compiled`, each with an optional `+fused`) as steps."""
    steps = []
    for entry in entries:
        match = TORCH_STEP.fullmatch(entry)
        if entries.count(entry) > 1:
            raise configuration.ConfigError(f"--torch_steps: {entry!r} is given twice")
        if match is None:
            raise configuration.ConfigError(
                f"--torch_steps: {entry!r} is not eager or compiled with an optional +fused (e.g. eager,compiled+fused)"
            )
        steps.append(TorchStep(compiled=match[1] == "compiled", fused=bool(match[2])))
    return steps


def torch_steps(config: ml_collections.ConfigDict, steps: Sequence[TorchStep], compile_backend: str) -> list[Measured]:
    """transformers' ViTMAEForPreTraining train step (AdamW), once per entry of `steps`: on the GPU when JAX runs on
    one (bf16 autocast with `model.dtype=bfloat16`, as the official code's mixed precision), else on CPU with this
    machine's cores. The steps share one model (parameters and gradients; `torch.compile` wraps the same module),
    each with its own optimizer, so a GPU holds one model however many ways it is timed. Fused AdamW runs on CPU
    too since torch 2.4; each step's name says what its optimizer is."""
    import contextlib

    import torch
    import transformers

    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and not torch.cuda.is_available():  # else PyTorch's figures would come from the CPU
        raise configuration.ConfigError(
            f"--torch: JAX runs on the GPU but torch {torch.__version__} finds no CUDA device: install a CUDA build "
            "of torch, or the comparison would time PyTorch on the CPU"
        )
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model_config = configuration.model_config(config)
    hf_config = convert.hf.transformers_config(model_config, config.mask_ratio)
    model = transformers.ViTMAEForPreTraining(hf_config).to(device).train()
    pixels = torch.randn(config.batch_size, config.num_channels, config.image_size, config.image_size, device=device)
    bf16 = config.model.dtype == "bfloat16"
    device_name = f"cuda ({torch.cuda.get_device_name(device)})" if on_gpu else "cpu"
    step_flops = flops.train_flops(model_config, config.mask_ratio, config.batch_size)
    measured = []
    for step in steps:
        forward = torch.compile(model, backend=compile_backend) if step.compiled else model
        opt = torch.optim.AdamW(
            model.parameters(),
            lr=1e-4,
            betas=(config.b1, config.b2),
            weight_decay=config.weight_decay,
            fused=True if step.fused else None,  # None: torch's default, for-each on CUDA, a loop on CPU
        )

        def run(forward: torch.nn.Module = forward, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = forward(pixel_values=pixels).loss
            loss.backward()
            opt.step()
            if on_gpu:
                torch.cuda.synchronize()

        how = [device.type] + ["bf16 autocast"] * bf16
        how.append(f"torch.compile {compile_backend}" if step.compiled else "eager")
        how.append("fused AdamW" if opt.defaults["fused"] else "AdamW not fused")
        measured.append(Measured(f"PyTorch ViTMAE ({', '.join(how)})", run, step_flops, device_name))
    return measured


def matmul_peak(dtype: jnp.dtype) -> Measured:
    """The best of a few square matmuls: what this device's matmul units really deliver."""
    size = 2048
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)

    def run() -> None:
        for _ in range(3):
            matmul(a, a).block_until_ready()

    return Measured("matmul", run, 3 * 2 * size**3, jax_device())


# ---------------------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def no_peak_note(device: jax.Device) -> str:
    """For a device kind without a peak in `flops.PEAK_TFLOPS`: MFU is left out rather than guessed."""
    return (
        f"MFU is not reported: no peak TFLOP/s is known for device kind {device.device_kind!r}; pass its dense "
        "peak per device for the compute dtype with --peak_tflops=<TFLOP/s> (benchmark) or "
        "--config.peak_tflops=<TFLOP/s> (training)"
    )


def peak_memory_bytes(device: jax.Device) -> int | None:
    """The device allocator's high-water mark; None where the device keeps no statistics (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return stats.get("peak_bytes_in_use") if stats else None


def peak_memory(device: jax.Device) -> str:
    peak = peak_memory_bytes(device)
    return f"{peak / 2**30:.2f} GiB" if peak is not None else f"not reported on {device.platform}"


def benchmark(
    config: ml_collections.ConfigDict,
    rounds: int,
    baseline: bool,
    torch_as: Sequence[TorchStep] = (),
    *,
    torch_compile_backend: str = "inductor",
    peak: float | None = None,
    profile_dir: str | None = None,
) -> dict:
    """Time everything asked for, interleaved round by round; returns the figures it prints.

    `torch_as`: a PyTorch step timed beside mae_jax's for each entry (none: no PyTorch).
    `peak`: TFLOP/s per device for MFU; None takes it from `flops.PEAK_TFLOPS`, or on CPU measures a matmul (a
    device kind the table lacks gets no MFU).
    `profile_dir`: afterwards trace a few mae_jax steps there and print the longest device operations.
    """
    configuration.validate(config)
    if torch_as:
        missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
        if missing:  # test-only libraries, not dependencies of mae_jax: say so before compiling anything
            raise configuration.ConfigError(
                f"--torch compares with transformers' ViTMAE and needs {' and '.join(missing)}: "
                "pip install torch==2.13.0 transformers==5.23.0 (or pip install -e '.[test]')"
            )
    # PyTorch first: a torch without CUDA beside a GPU is refused before anything compiles
    torch_measured = torch_steps(config, torch_as, torch_compile_backend) if torch_as else []
    mesh = sharding.make_mesh(config.mesh)
    assembly = assemble(config, mesh)
    device = jax.devices()[0]
    devices = jax.device_count()
    print(
        f"device: {devices} x {device.device_kind} ({device.platform}, backend {jax.default_backend()}), "
        f"{jax.process_count()} process(es); "
        f"mesh data={mesh.shape[sharding.DATA_AXIS]} fsdp={mesh.shape[sharding.FSDP_AXIS]}\n"
        f"model: {config.model.variant} at {config.image_size} px, {assembly.description}, {config.model.dtype}, "
        f"attention {config.model.attention}, remat {config.model.remat}, scan_blocks {config.model.scan_blocks}; "
        f"batch {config.batch_size} "
        f"({config.batch_size // devices} per device), grad_accum_steps {config.grad_accum_steps}",
        flush=True,
    )
    mae, facts = jax_step("mae_jax", assembly, config)
    measured = [mae]
    if baseline:
        baseline_config = config.copy_and_resolve_references()
        baseline_config.model.mask_tokens_in_encoder = True
        baseline_step = assemble(baseline_config, mesh)
        measured.append(jax_step("mae_jax, mask tokens in encoder", baseline_step, baseline_config)[0])
    measured += torch_measured
    peak_source = "given" if peak else "table"
    peak = peak or flops.peak_tflops(device, config.model.dtype)
    matmul = None
    if peak is None and device.platform == "cpu":
        matmul = matmul_peak(jnp.dtype(config.model.dtype))
        measured.append(matmul)

    # Warm-up: first-touch allocations, lazy initialization, and (CPU) a second round for malloc's heap to
    # settle around the interleaved steps' buffers, which otherwise page-faults in the first timed round.
    for _ in range(WARMUP_ROUNDS):
        for m in measured:
            m.run()
    for _ in range(rounds):
        for m in measured:
            m.time_once()

    def median_ratio(a: Measured, b: Measured) -> float:  # per round: b's time / a's time
        return statistics.median(tb / ta for ta, tb in zip(a.times, b.times, strict=True))

    xla = facts["xla_flops"]
    xla_text = f"{xla / 1e9:.1f} GFLOP" if xla else "unavailable"
    if xla and config.model.scan_blocks:  # XLA's cost analysis counts a while loop's body once
        xla_text += " (scanned blocks: each loop body counted once)"
    print(
        f"compile {facts['compile_s']:.1f} s; per step: model {mae.flops / 1e9:.1f} GFLOP (matmuls, forward and "
        f"backward), XLA cost analysis {xla_text}"
    )
    figures = {
        "device": {
            "kind": device.device_kind,
            "platform": device.platform,
            "backend": jax.default_backend(),
            "count": devices,
        },
        "config": {
            "task": config.task,
            "image_size": config.image_size,
            "batch_size": config.batch_size,
            "grad_accum_steps": config.grad_accum_steps,
            "model": config.model.to_dict(),
        },
        "rounds": rounds,
        "compile_s": facts["compile_s"],
        "model_flops": mae.flops,
        "xla_flops": xla,
    }
    width = max(len(m.name) for m in measured)
    print(f"{'':{width}} {'step s':>8} {'images/s':>9} {'/device':>8} {'TFLOP/s/dev':>12} {'MFU':>6}")
    for m in measured:
        if m is matmul:
            continue
        step_s = statistics.median(m.times)
        tflops = m.flops / step_s / devices / 1e12
        if matmul is not None:  # per round, against the matmul measured next to it
            mfu = statistics.median(
                (m.flops / t) / (matmul.flops / tm) for t, tm in zip(m.times, matmul.times, strict=True)
            )
        else:
            mfu = tflops / peak if peak else None
        print(
            f"{m.name:{width}} {step_s:8.3f} {config.batch_size / step_s:9.2f} "
            f"{config.batch_size / step_s / devices:8.2f} {tflops:12.4f} {'—' if mfu is None else f'{mfu:.1%}':>6}"
        )
        figures[m.name] = {
            "step_s": step_s,
            "images_per_s": config.batch_size / step_s,
            "mfu": mfu,
            "times_s": m.times,
            "device": m.device,
        }
        if m.compile_s is not None:
            figures[m.name]["compile_s"] = m.compile_s
    if matmul is not None:
        peak = statistics.median(matmul.flops / t for t in matmul.times) / 1e12
        print(f"peak: {config.model.dtype} {2048}^3 matmul measured in this run, {peak:.4f} TFLOP/s (median)")
    elif peak is None:
        print(f"peak: {no_peak_note(device)}")
    else:
        print(f"peak: {peak} TFLOP/s per device ({peak_source})")
    figures["peak_tflops"] = peak
    for m in measured[1:]:
        if m is matmul:
            continue
        ratio = median_ratio(mae, m)
        if "mask tokens" in m.name:
            print(
                f"MAE speedup over the mask-token baseline: {ratio:.2f}x (median of per-round step-time ratios; "
                f"model FLOPs ratio {m.flops / mae.flops:.2f}x)"
            )
        else:
            print(f"mae_jax vs {m.name}: {ratio:.2f}x (median of per-round step-time ratios)")
        figures[f"ratio {m.name}"] = ratio
    footprint = facts.get("footprint_bytes")
    print(
        f"peak device memory: {peak_memory(device)}"
        + (f"; compiled step arguments + temporaries {footprint / 2**30:.2f} GiB" if footprint else "")
    )
    figures["peak_memory_bytes"] = peak_memory_bytes(device)
    figures["footprint_bytes"] = footprint
    if profile_dir:
        print_device_ops(trace_steps(mae, profile_dir), profile_dir)
    return figures


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in one heap; call before JAX or PyTorch start their threads.

    XLA:CPU allocates a fresh temporary buffer for every step (1.1 GB for ViT-B/16 at batch 8), which glibc
    mmaps and unmaps on free; faulting it in again 4 KiB at a time took 0.5-4 s of kernel time per ~3.5 s
    step when PyTorch's step ran in the same process. One arena, no mmap and no trimming hand the buffer back
    as it was. Only where memory comes from changes, not any result. Returns False on another libc.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(option, value) for option, value in settings)


def require_backend() -> None:
    """JAX's devices, or one line naming the platform JAX_PLATFORMS asked for and JAX could not start. (Unset,
    JAX falls back to the CPU with a warning only: the GPU suite sets JAX_PLATFORMS=cuda.)"""
    try:
        jax.devices()
    except (RuntimeError, AssertionError) as error:  # jax 0.10 asserts where no requested platform is installed
        detail = str(error).splitlines()[0] if str(error) else "no plugin for it is installed"
        raise configuration.ConfigError(
            f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')}: JAX could not start that backend: {detail}"
        ) from None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config.task != "pretrain" and (FLAGS.baseline or FLAGS.torch):
        raise app.UsageError(f"--baseline and --torch compare pretraining steps; config.task is {FLAGS.config.task!r}")
    if not FLAGS.torch and (FLAGS["torch_steps"].present or FLAGS["torch_compile_backend"].present):
        raise app.UsageError("--torch_steps and --torch_compile_backend choose how --torch times PyTorch: add --torch")
    if FLAGS.torch:  # JAX would otherwise take 75 % of a GPU's memory up front, and PyTorch run out of it
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if retain_freed_memory():
        print("glibc malloc: one arena, no mmap, no trimming (freed memory is kept for the next step)")
    try:
        torch_as = parse_torch_steps(FLAGS.torch_steps) if FLAGS.torch else []
        require_backend()
        figures = benchmark(
            FLAGS.config,
            FLAGS.rounds,
            FLAGS.baseline,
            torch_as,
            torch_compile_backend=FLAGS.torch_compile_backend,
            peak=FLAGS.peak_tflops,
            profile_dir=FLAGS.profile,
        )
    except configuration.ConfigError as error:
        sys.exit(f"error: {error}")
    if FLAGS.json:
        write_json(FLAGS.json, figures)


def write_json(path: str, figures: dict) -> None:
    """`figures` and what a report needs beside them: the versions that ran and the flags XLA ran with."""
    versions = {}
    for name in ("jax", "jaxlib", "flax", "torch", "transformers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    run = {"argv": sys.argv[1:], "xla_flags": os.environ.get("XLA_FLAGS", ""), "versions": versions}
    epath.Path(path).write_text(json.dumps({**figures, **run}, indent=1))


def define_flags() -> None:
    """Only when run as a program: `mae_jax.main` defines `--config` too, and both may be imported."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vit_base.py.", lock_config=True)
    flags.DEFINE_integer("rounds", 5, "Timed rounds; each runs every measured step once.")
    flags.DEFINE_bool("baseline", False, "Also time the mask-tokens-in-encoder baseline (paper, Table 2).")
    flags.DEFINE_bool("torch", False, "Also time transformers' ViTMAEForPreTraining train step (PyTorch).")
    flags.DEFINE_list(
        "torch_steps",
        ["eager"],
        "With --torch, the PyTorch steps to time: eager or compiled (torch.compile), +fused for fused AdamW.",
    )
    flags.DEFINE_string("torch_compile_backend", "inductor", "torch.compile's backend for the compiled steps.")
    flags.DEFINE_float("peak_tflops", None, "Peak dense TFLOP/s per device for MFU; default: table, or measured.")
    flags.DEFINE_string("profile", None, "Then trace a few mae_jax steps into this directory and list device ops.")
    flags.DEFINE_string("json", None, "Also write the figures, device, versions and config summary to this file.")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=configuration.parse_flags)
