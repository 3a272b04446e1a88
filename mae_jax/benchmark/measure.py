"""The measurement itself: the steps asked for built, timed round by round interleaved (so that machine noise
hits all alike), and their figures printed and returned: step times, images/s, TFLOP/s, MFU, ratios, memory."""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from mae_jax import configuration, flops, sharding
from mae_jax.benchmark.jax_steps import assemble, jax_step, matmul_peak
from mae_jax.benchmark.measured import Measured
from mae_jax.benchmark.profile import print_device_ops, trace_steps
from mae_jax.benchmark.torch_steps import TorchStep, torch_steps

WARMUP_ROUNDS = 2


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
