"""What the benchmark's process needs before it measures: glibc's malloc told to keep freed memory (PyTorch and
XLA:CPU in one process), and JAX's backend checked to start, else one line."""

from __future__ import annotations

import ctypes
import os
import platform

import jax

from mae_jax import configuration

# glibc `mallopt` parameters (malloc.h), for `retain_freed_memory`.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


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
