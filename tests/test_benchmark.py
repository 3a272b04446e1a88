"""The benchmark command line end to end, its device-operation tables and memory release (FLOPs: test_flops.py)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from mae_jax import benchmark, configuration
from tests.conftest import REPO


def test_benchmark_prints_its_figures(tmp_path: pathlib.Path):
    command = [
        sys.executable, "-m", "mae_jax.benchmark", "--config=configs/demo.py", "--config.image_size=32",
        "--config.batch_size=8", "--config.model.decoder_width=32", "--config.model.decoder_depth=1",
        "--config.model.decoder_heads=2", "--rounds=2", "--baseline", "--torch",
        "--torch_steps=eager,compiled+fused", "--torch_compile_backend=aot_eager", f"--profile={tmp_path}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    number = r"[\d.]+"
    # PyTorch as each --torch_steps entry asks: eager with torch's default AdamW, compiled with the fused one
    eager, compiled = (
        "PyTorch ViTMAE (cpu, eager, AdamW not fused)",
        "PyTorch ViTMAE (cpu, torch.compile aot_eager, fused AdamW)",
    )
    for name in ("mae_jax", "mae_jax, mask tokens in encoder", eager, compiled):  # step s, images/s, ..., MFU
        assert re.search(rf"^{re.escape(name)} +{number} +{number} +{number} +{number} +{number}%$", out, re.M), out
    assert "(cpu, backend cpu)" in out and "remat False, scan_blocks False;" in out, out
    assert re.search(rf"^compile {number} s; per step", out, re.M), out
    assert re.search(rf"MAE speedup over the mask-token baseline: {number}x", out), out
    for name in (eager, compiled):
        assert re.search(rf"mae_jax vs {re.escape(name)}: {number}x", out), out
    assert re.search(rf"peak: float32 2048\^3 matmul measured in this run, {number} TFLOP/s", out), out
    assert re.search(rf"per step: model {number} GFLOP .*XLA cost analysis {number} GFLOP", out), out
    assert "glibc malloc: one arena, no mmap, no trimming" in out, out
    assert f"profile in {tmp_path}: no device operations" in out, out  # CPU: XLA's work is on host threads
    assert len(list(tmp_path.glob("plugins/profile/*/perfetto_trace.json.gz"))) == 1


def test_benchmark_refuses_a_missing_gpu_backend_in_one_line():
    """JAX_PLATFORMS=cuda without a GPU backend (unset, JAX would fall back to the CPU with a warning only)."""
    command = [sys.executable, "-m", "mae_jax.benchmark", "--config=configs/demo.py"]
    env = {**os.environ, "JAX_PLATFORMS": "cuda"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    line = "error: JAX_PLATFORMS=cuda: JAX could not start that backend: "
    assert result.returncode == 1 and result.stderr.splitlines()[-1].startswith(line), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "compile" not in result.stdout, result.stdout + result.stderr


def test_torch_beside_a_gpu_needs_a_cuda_torch(monkeypatch: pytest.MonkeyPatch):
    """This torch is the CPU build: beside a GPU it would time PyTorch on the CPU."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    steps = benchmark.parse_torch_steps(["eager"])
    with pytest.raises(configuration.ConfigError, match=r"^--torch: JAX runs on the GPU but torch \S+ finds no CUDA"):
        benchmark.torch_steps(configuration.base_config(), steps, "inductor")


@pytest.mark.parametrize("task", ["finetune", "linprobe"])
def test_benchmark_times_the_downstream_steps(task: str):
    command = [
        sys.executable, "-m", "mae_jax.benchmark", f"--config=configs/{task}_vit_base.py", "--config.image_size=32",
        "--config.model.variant=mu/8", "--config.batch_size=8", "--config.num_classes=10", "--rounds=1",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"model: mu/8 at 32 px, {task}, 10 classes" in result.stdout, result.stdout
    assert re.search(r"^mae_jax +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+%$", result.stdout, re.M), result.stdout
    refused = subprocess.run([*command, "--torch"], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert refused.returncode != 0 and f"config.task is '{task}'" in refused.stderr, refused.stderr[-3000:]


def test_device_ops_sum_each_device_operation_per_step():
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}},
        *({"ph": "X", "pid": 1, "tid": 7, "name": "gemm", "dur": 300.0} for _ in range(4)),
        *({"ph": "X", "pid": 1, "tid": 8, "name": "fusion.1", "dur": 500.0} for _ in range(2)),
        {"ph": "X", "pid": 2, "tid": 1, "name": "gemm", "dur": 9000.0},  # host side: not a device operation
        {"ph": "i", "pid": 1, "tid": 7, "name": "marker"},
    ]
    ops = benchmark.device_ops(events, steps=2)
    assert ops == [benchmark.DeviceOp("gemm", 0.6, 2.0), benchmark.DeviceOp("fusion.1", 0.5, 1.0)]


def test_device_ops_of_a_tpu_count_its_ops_line_only():
    events = [
        {"ph": "M", "name": "process_name", "pid": 3, "args": {"name": "/device:TPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 3, "tid": 1, "args": {"name": "XLA Modules"}},
        {"ph": "M", "name": "thread_name", "pid": 3, "tid": 2, "args": {"name": "XLA Ops"}},
        {"ph": "X", "pid": 3, "tid": 1, "name": "jit_train_step", "dur": 1000.0},  # spans the ops below
        {"ph": "X", "pid": 3, "tid": 2, "name": "convolution.3", "dur": 700.0},
        {"ph": "X", "pid": 3, "tid": 2, "name": "fusion.9", "dur": 300.0},
    ]
    assert [op.name for op in benchmark.device_ops(events, steps=1)] == ["convolution.3", "fusion.9"]


RSS_AFTER_FREE = """
import numpy as np
from mae_jax import benchmark
if {retain}:
    assert benchmark.retain_freed_memory()
def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
block = np.ones(64 * 2**20 // 8)  # 64 MiB: above glibc's mmap threshold
del block
print(rss_mib())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads glibc behaviour and /proc")
def test_retain_freed_memory_keeps_a_freed_buffer_in_the_process():
    def rss_after_free(retain: bool) -> int:
        code = RSS_AFTER_FREE.format(retain=retain)
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
        return int(result.stdout)

    assert rss_after_free(retain=True) - rss_after_free(retain=False) >= 56


def test_torch_steps_read_each_entry_once():
    steps = benchmark.parse_torch_steps(["eager", "compiled+fused", "eager+fused", "compiled"])
    assert [(s.compiled, s.fused) for s in steps] == [(False, False), (True, True), (False, True), (True, False)]
    for entries, problem in (
        (["jit"], "'jit' is not eager or compiled"),
        (["eager", "eager"], "'eager' is given twice"),
    ):
        with pytest.raises(configuration.ConfigError, match=f"^--torch_steps: {problem}"):
            benchmark.parse_torch_steps(entries)
