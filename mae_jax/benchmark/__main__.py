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

# The docstring above is the program's --help text: absl prints the docstring of `__main__`.
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mae_jax import configuration
from mae_jax.benchmark.json_output import write_json
from mae_jax.benchmark.measure import benchmark
from mae_jax.benchmark.process import require_backend, retain_freed_memory
from mae_jax.benchmark.torch_steps import parse_torch_steps

FLAGS = flags.FLAGS


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
