"""The GPU check before the first item: JAX must start its CUDA backend (asked in a process of its own, which
then lets the GPU go), else one line and no run, rather than figures from the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

GPU_PLATFORM = "cuda"  # JAX_PLATFORMS of every item: no silent fallback to the CPU
# Asked of JAX in a process of its own before the first item (this one must not hold the GPU)
BACKEND_CHECK = "import jax; d = jax.devices(); print(f'{jax.default_backend()}: {len(d)} x {d[0].device_kind}')"


def gpu_backend(python: str = sys.executable) -> str:
    """What JAX starts with JAX_PLATFORMS=cuda ("gpu: 1 x NVIDIA H100 80GB HBM3"), asked in a process of its own;
    exits with one line where it starts none (no CUDA plugin, no driver): nothing is benchmarked on the CPU."""
    env = {**os.environ, "JAX_PLATFORMS": GPU_PLATFORM, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    try:
        result = subprocess.run(
            [python, "-c", BACKEND_CHECK], env=env, capture_output=True, text=True, timeout=300, check=False
        )
    except subprocess.TimeoutExpired:
        sys.exit(f"error: JAX did not start its {GPU_PLATFORM} backend within 300 s (JAX_PLATFORMS={GPU_PLATFORM})")
    if result.returncode:
        why = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        sys.exit(
            f"error: JAX has no GPU backend here (JAX_PLATFORMS={GPU_PLATFORM}: {why}): no benchmark runs on the "
            "CPU in its place; the install step installs jax[cuda12] or jax[cuda13] for the driver's CUDA; "
            "--dry-run runs the plumbing on the CPU"
        )
    return result.stdout.strip().splitlines()[-1]
