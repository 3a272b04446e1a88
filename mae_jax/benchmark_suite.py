"""The GPU measurement in one go: `python -m mae_jax.benchmark_suite --report=FILE [--dry_run] [--budget_s=450]
[--items=KEY,...]` (`launch/gpu_benchmark.sh` installs what is missing first, then runs this).

GPU time comes in short windows, so every measurement of `ITEMS` runs as its own `python -m mae_jax.benchmark
--config=... --json=...` process, in priority order, each with what is left of the time budget as its timeout:
XLA_FLAGS are read once per process, and one failure or hang must not end the rest. An item that fails, times
out or does not fit what is left of the budget stays in the report with the reason (the end of its stderr);
`--items` runs the ones a window left over in the next. The report (markdown, rewritten after every item, so a
window that closes early still leaves one) holds the environment, one table per comparison with its ratios
computed from the items' JSON, the failed and skipped items, and every item's JSON.

Every item runs with `JAX_PLATFORMS=cuda`, after a check that JAX starts that backend (else one line and no
run: JAX would otherwise fall back to the CPU with a warning only); the report names the backend and device of
every figure. All items compute in bfloat16 on ViT-L/16 (configs/vit_large.py) or ViT-H/14
(configs/vit_huge.py), in the configs' default block layout except `layout_other`. Compilation dominates
(ViT-L/16 unrolled: 140-163 s on an H100), so the items share a fresh persistent compilation cache: a later item
whose step an earlier one compiled loads it in seconds (its compile time is then marked as a cache load), and
XLA:GPU's per-fusion autotuning cache, so a new step does not tune the GEMM shapes an earlier one tuned. The two
items whose compile times are compared (`layout_*`) each compile with an empty cache of their own instead, so
neither reuses the other's compilation or autotuning; what they compiled joins the shared cache afterwards.
Items with PyTorch time transformers' ViTMAE twice, interleaved: eager with torch's default AdamW (not fused),
and `torch.compile`d with the fused AdamW. Expected time per item on one H100 or H200, with the unrolled default
(`COMPILE_S` has the guesses for scanned blocks; `estimate_s` computes them): 20 s to start a process, plus the
compile, plus 15 s for eager PyTorch and 90 s for compiling it:

| key | what | expected |
|---|---|---|
| layout_default | d. ViT-L/16 batch 128, the default block layout, compiled with an empty cache | 170 s |
| layout_other | d. the same with `model.scan_blocks` flipped, in its own process and empty cache | 60 s |
| L16_b128_torch | a. ViT-L/16 batch 128 with `--torch` (step from the cache) | 130 s |
| L16_b256_torch | a. ViT-L/16 batch 256 with `--torch` | 275 s |
| L16_b128 | the baseline of c, e and f: ViT-L/16 batch 128 alone (step from the cache) | 25 s |
| cudnn | c. `--config.model.attention=cudnn` | 170 s |
| autodiff | e. `--config.model.kernels=autodiff`: jax's backward passes instead of the custom VJPs | 170 s |
| cmdbuf_off | f. `--xla_gpu_enable_command_buffer=` (no CUDA graphs) | 170 s |
| cmdbuf_loops | f. `--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL` (loops in CUDA graphs too) | 170 s |
| lhs | f. `--xla_gpu_enable_latency_hiding_scheduler=true` | 170 s |
| H14_b128, H14_b256 | b. ViT-H/14 batch 128 and 256 | 220 s each |
| H14_b128_torch, H14_b256_torch | b. the same with `--torch` (steps from the cache) | 130 s each |

About 2200 s in all: the default budget of 450 s (a window of 8 minutes, the install included) covers the
first three; the report lists the rest with the `--items` command for the next window. With scanned blocks the
default, about 1250 s.

`--dry_run` runs the same table on the CPU (`JAX_PLATFORMS=cpu`, named so in the report) with a tiny model (mu/4
at 32 px, batch / 32, one round, MFU against a nominal 1 TFLOP/s, XLA:CPU's cheaper optimization level, PyTorch
compiled with torch.compile's `aot_eager` backend: no code generation) so that every item's plumbing runs: about
2 minutes on a busy 2-core machine. cuDNN attention needs a GPU and is only listed; XLA:CPU parses the GPU flags
and ignores them, so those items run there too. This module imports only the standard library at the top:
`--missing_requirements` and `--jax_pins` serve the install step before anything else is.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCHMARK = (sys.executable, "-m", "mae_jax.benchmark")
VIT_L, VIT_H = "configs/vit_large.py", "configs/vit_huge.py"
COMMON_ARGS = ("--config.model.dtype=bfloat16",)
TORCH_ARGS = ("--torch", "--torch_steps=eager,compiled+fused")  # the README's comparison, and PyTorch at its best
DRY_RUN_ARGS = (
    "--config.model.variant=mu/4", "--config.image_size=32", "--config.model.decoder_width=32",
    "--config.model.decoder_depth=1", "--config.model.decoder_heads=2", "--rounds=1", "--peak_tflops=1",
)  # fmt: skip
# inductor's C++ code generation takes a minute for the tiny model on a 2-core CPU: the dry run traces only
DRY_RUN_TORCH_ARGS = ("--torch_compile_backend=aot_eager",)
DRY_RUN_BATCH_DIVISOR = 32
# XLA:CPU compiles the tiny steps in half the time: the dry run's speed is not the point
DRY_RUN_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
SHOWN_ENV = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS")  # in the report's commands
GPU_PLATFORM = "cuda"  # JAX_PLATFORMS of every item: no silent fallback to the CPU
# Asked of JAX in a process of its own before the first item (this one must not hold the GPU)
BACKEND_CHECK = "import jax; d = jax.devices(); print(f'{jax.default_backend()}: {len(d)} x {d[0].device_kind}')"
STDERR_LINES = 15  # of a failed item's stderr, in the report

# Expected seconds on one H100/H200 (README: ViT-L/16 unrolled compiled in 140-163 s; the rest are guesses).
STARTUP_S = 20  # interpreter, JAX and the GPU up, parameters initialized, warm-up and timed rounds
TORCH_S = 15  # torch imported, ViTMAE built, its eager steps
TORCH_COMPILE_S = 90  # torch.compile (inductor) of ViTMAE's forward and backward
CACHE_LOAD_S = 5  # a compiled step loaded from the persistent cache
COMPILE_S = {"L/16": {False: 150, True: 40}, "H/14": {False: 200, True: 50}}  # by variant, then scanned
DRY_RUN_S = 20  # per item on a CPU, tiny model; PyTorch adds TORCH_S
VARIANTS = {VIT_L: "L/16", VIT_H: "H/14"}


# ---------------------------------------------------------------------------------------------------
# Items and tables
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Item:
    """One benchmark process: `config` at `batch` in bf16, with further flags and XLA_FLAGS. `flip_layout`: the
    blocks in the layout the configs do not default to; `own_cache`: compiled with an empty cache of its own (a
    compile time to compare), not the one the items share."""

    key: str
    what: str
    config: str
    batch: int
    args: tuple[str, ...] = ()
    xla_flags: str = ""
    torch: bool = False
    flip_layout: bool = False
    own_cache: bool = False
    needs_gpu: bool = False

    @property
    def program(self) -> tuple:
        """What decides the compiled mae_jax step: equal programs share the persistent cache. PyTorch adds
        measurements, not a different step."""
        return self.config, self.batch, self.args, self.xla_flags, self.flip_layout

    def estimate_s(self, compiled: set[tuple], scanned: bool, dry_run: bool) -> float:
        """Expected seconds; `compiled`: the programs earlier items of this run compiled into the shared cache;
        `scanned`: the configs' default layout."""
        torch = TORCH_S + TORCH_COMPILE_S if self.torch else 0
        if dry_run:
            return DRY_RUN_S + (TORCH_S if self.torch else 0)
        compile_s = COMPILE_S[VARIANTS[self.config]]
        cached = self.program in compiled and not self.own_cache
        return STARTUP_S + (CACHE_LOAD_S if cached else compile_s[scanned != self.flip_layout]) + torch

    def command(self, benchmark: Sequence[str], json_path: pathlib.Path, dry_run: bool, scanned: bool) -> list[str]:
        """The benchmark's command line; `scanned`: the configs' default layout (which `flip_layout` flips)."""
        batch = max(1, self.batch // DRY_RUN_BATCH_DIVISOR) if dry_run else self.batch
        flags = [f"--config={self.config}", *COMMON_ARGS, f"--config.batch_size={batch}", *self.args]
        flags += [f"--config.model.scan_blocks={not scanned}"] * self.flip_layout
        if self.torch:
            flags += [*TORCH_ARGS, *(DRY_RUN_TORCH_ARGS if dry_run else ())]
        return [*benchmark, *flags, *(DRY_RUN_ARGS if dry_run else ()), f"--json={json_path}"]


ITEMS = (
    Item("layout_default", "ViT-L/16, batch 128, default block layout", VIT_L, 128, own_cache=True),
    Item("layout_other", "ViT-L/16, batch 128, other block layout", VIT_L, 128, flip_layout=True, own_cache=True),
    Item("L16_b128_torch", "ViT-L/16, batch 128, with PyTorch", VIT_L, 128, torch=True),
    Item("L16_b256_torch", "ViT-L/16, batch 256, with PyTorch", VIT_L, 256, torch=True),
    Item("L16_b128", "ViT-L/16, batch 128 (baseline)", VIT_L, 128),
    Item("cudnn", "cuDNN attention", VIT_L, 128, ("--config.model.attention=cudnn",), needs_gpu=True),
    Item("autodiff", "jax's autodiff backward passes", VIT_L, 128, ("--config.model.kernels=autodiff",)),
    Item("cmdbuf_off", "command buffers off", VIT_L, 128, xla_flags="--xla_gpu_enable_command_buffer="),
    Item(
        "cmdbuf_loops",
        "command buffers with loops",
        VIT_L,
        128,
        xla_flags="--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL",
    ),
    Item("lhs", "latency-hiding scheduler", VIT_L, 128, xla_flags="--xla_gpu_enable_latency_hiding_scheduler=true"),
    Item("H14_b128", "ViT-H/14, batch 128", VIT_H, 128),
    Item("H14_b256", "ViT-H/14, batch 256", VIT_H, 256),
    Item("H14_b128_torch", "ViT-H/14, batch 128, with PyTorch", VIT_H, 128, torch=True),
    Item("H14_b256_torch", "ViT-H/14, batch 256, with PyTorch", VIT_H, 256, torch=True),
)


TORCH_NOTE = (
    "PyTorch runs twice in each item, interleaved with mae_jax's step: eager with torch's default AdamW (not "
    "fused; for-each on CUDA), and `torch.compile`d with the fused AdamW. Each row names the one it compares."
)


@dataclasses.dataclass(frozen=True)
class Table:
    """A report table: `kind` "torch" (step figures and the PyTorch ratio), "layouts" (one item's two
    layouts) or "versus" (the first key is the baseline the others are divided into)."""

    title: str
    kind: str
    keys: tuple[str, ...]
    note: str = ""


TABLES = (
    Table(
        "a. ViT-L/16 against transformers' ViTMAE (PyTorch)",
        "torch",
        ("L16_b128_torch", "L16_b256_torch"),
        TORCH_NOTE,
    ),
    Table(
        "b. ViT-H/14",
        "torch",
        ("H14_b128", "H14_b256", "H14_b128_torch", "H14_b256_torch"),
        "The PyTorch columns come from the items run with it; the rows without are the JAX step alone. " + TORCH_NOTE,
    ),
    Table("c. XLA against cuDNN attention, ViT-L/16 batch 128", "versus", ("L16_b128", "cudnn")),
    Table(
        "d. Scanned against unrolled blocks, ViT-L/16 batch 128",
        "layouts",
        ("layout_default", "layout_other"),
        "Each layout compiled in its own process with an empty compilation cache of its own (no persistent cache, "
        "no XLA autotuning results shared): the ratios compare separate runs.",
    ),
    Table("e. Custom-VJP kernels against jax's autodiff, ViT-L/16 batch 128", "versus", ("L16_b128", "autodiff")),
    Table(
        "f. XLA flags, ViT-L/16 batch 128",
        "versus",
        ("L16_b128", "cmdbuf_off", "cmdbuf_loops", "lhs"),
        "Each flag in its own process, added to the environment's XLA_FLAGS.",
    ),
)


# ---------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    """What became of an item: status "ok", "failed", "timed out", "skipped" (the budget), "needs a GPU" (in a
    dry run) or "not selected" (`--items`)."""

    item: Item
    status: str
    reason: str = ""
    command: str = ""  # as a shell line: the variables the suite set, then the arguments
    expected_s: float | None = None
    wall_s: float | None = None
    figures: dict | None = None
    cache_load: bool = False  # its step came from the cache that an earlier item filled


def tail(path: pathlib.Path, lines: int = STDERR_LINES) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return "\n".join(text[-lines:])


def run_item(item: Item, command: list[str], env: dict[str, str], timeout_s: float, folder: pathlib.Path) -> Outcome:
    """Run one benchmark process in its own session (killed with its children at the timeout or when this
    process is stopped); its figures from the JSON it wrote."""
    json_path, stdout_path, stderr_path = (folder / f"{item.key}.{ext}" for ext in ("json", "out", "err"))
    start = time.monotonic()
    with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # it may end between the two calls
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    wall_s = time.monotonic() - start
    outcome = Outcome(item, "ok", wall_s=wall_s)
    if code is None:
        outcome.status = "timed out"
        outcome.reason = f"killed after {timeout_s:.0f} s, what was left of the budget; its output ended:\n"
        outcome.reason += tail(stderr_path) or tail(stdout_path)
    elif code != 0:
        outcome.status, outcome.reason = "failed", f"exit code {code}; stderr ended:\n{tail(stderr_path)}"
    elif not json_path.exists():
        outcome.status, outcome.reason = "failed", f"exit code 0 but no JSON; stderr ended:\n{tail(stderr_path)}"
    else:
        outcome.figures = json.loads(json_path.read_text())
    return outcome


def item_env(item: Item, cache_dir: pathlib.Path, dry_run: bool) -> dict[str, str]:
    """The item's environment: its compilation and autotuning caches in `cache_dir`, its platform (the CPU in a dry
    run, else the GPU and nothing else), its XLA_FLAGS added after the environment's."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    env["JAX_PLATFORMS"] = "cpu" if dry_run else GPU_PLATFORM
    # GEMM autotuning results shared across items too: the same shapes are not tuned again in each process
    autotune = f"--xla_gpu_per_fusion_autotune_cache_dir={cache_dir / 'autotune'}"
    xla_flags = [os.environ.get("XLA_FLAGS", ""), autotune, DRY_RUN_XLA_FLAGS if dry_run else "", item.xla_flags]
    if any(xla_flags):
        env["XLA_FLAGS"] = " ".join(flag for flag in xla_flags if flag)
    if item.torch:  # JAX would otherwise take 75 % of the GPU's memory up front, and PyTorch run out of it
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


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


def default_layout_scanned() -> bool:
    """The configs' `model.scan_blocks` (what every item but `layouts` runs with)."""
    from mae_jax import configuration  # jax: only once the install step has run

    return bool(configuration.base_config().model.scan_blocks)


def run_suite(
    report: pathlib.Path,
    *,
    dry_run: bool,
    budget_s: float,
    items: Sequence[Item] = ITEMS,
    selected: set[str] | None = None,
    benchmark: Sequence[str] = BENCHMARK,
    scanned: bool | None = None,
    backend: str | None = None,
) -> list[Outcome]:
    """Run `items` (those in `selected`, when given) in order within `budget_s`; rewrite `report` after each.

    Items share one compilation cache, except those with `own_cache`: each compiles with an empty one of its own,
    merged into the shared one after it ran. Both are at one path: JAX's cache key holds the cache's path (the
    autotuning cache inside it, and XLA_FLAGS), so the shared cache is set aside, not pointed elsewhere.
    `backend`: what the GPU check found (None in a dry run)."""
    start, started_at = time.monotonic(), datetime.datetime.now(datetime.UTC)
    scanned = default_layout_scanned() if scanned is None else scanned
    outcomes: list[Outcome] = []
    compiled: set[tuple] = set()
    with tempfile.TemporaryDirectory(prefix="benchmark_suite_") as scratch:
        folder = pathlib.Path(scratch)
        cache, set_aside = folder / "cache", folder / "cache_set_aside"
        for item in items:
            left = budget_s - (time.monotonic() - start)
            estimate = item.estimate_s(compiled, scanned, dry_run)
            if selected is not None and item.key not in selected:
                outcomes.append(Outcome(item, "not selected", "not in --items"))
            elif dry_run and item.needs_gpu:
                outcomes.append(Outcome(item, "needs a GPU", "not run in a dry run"))
            elif estimate > left:
                reason = f"does not fit the budget: expected ~{estimate:.0f} s, {max(left, 0):.0f} s left"
                outcomes.append(Outcome(item, "skipped", reason))
            else:
                print(f"[{time.monotonic() - start:5.0f} s] {item.key}: expected ~{estimate:.0f} s", flush=True)
                command = item.command(benchmark, folder / f"{item.key}.json", dry_run, scanned)
                if item.own_cache and cache.exists():
                    cache.rename(set_aside)
                env = item_env(item, cache, dry_run)
                outcome = run_item(item, command, env, left, folder)
                if set_aside.exists():  # later items load what it compiled, and what the others did
                    shutil.copytree(set_aside, cache, dirs_exist_ok=True)
                    shutil.rmtree(set_aside)
                shown = {k: v for k, v in env.items() if k in SHOWN_ENV and v != os.environ.get(k)}
                json_here = item.command(benchmark, pathlib.Path(f"{item.key}.json"), dry_run, scanned)
                outcome.command = " ".join(
                    [f"{k}={shlex.quote(v)}" for k, v in shown.items()] + [shlex.join(json_here)]
                )
                outcome.cache_load = item.program in compiled and not item.own_cache
                outcome.expected_s = estimate
                if outcome.status == "ok":
                    compiled.add(item.program)
                print(f"[{time.monotonic() - start:5.0f} s] {item.key}: {outcome.status}", flush=True)
                outcomes.append(outcome)
            write_report(
                report,
                outcomes,
                items,
                dry_run=dry_run,
                backend=backend,
                budget_s=budget_s,
                started_at=started_at,
                elapsed_s=time.monotonic() - start,
            )
    return outcomes


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def _percent(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.1%}"


def _gib(value: int | None) -> str:
    return "not reported" if value is None else f"{value / 2**30:.2f}"


def _compile(outcome: Outcome) -> str:
    return _seconds(outcome.figures["compile_s"]) + (" (cache load)" if outcome.cache_load else "")


def _unfinished_row(outcome: Outcome | None, key: str, columns: int) -> str:
    status = "not in the table of items" if outcome is None else outcome.status
    return f"| {key} | {status} |" + " — |" * (columns - 2)


def _device(figures: dict) -> str:
    """The backend and devices of an item's JAX figures: "gpu: 1 x NVIDIA H100 80GB HBM3"."""
    device = figures["device"]
    return f"{device['backend']}: {device['count']} x {device['kind']}"


def _torch_measurements(figures: dict) -> list[tuple[str, dict]]:
    return [(name, value) for name, value in figures.items() if name.startswith("PyTorch") and isinstance(value, dict)]


def torch_table(outcomes: dict[str, Outcome], keys: Sequence[str]) -> list[str]:
    """One row per PyTorch step an item timed (eager, compiled), beside the item's mae_jax figures."""
    header = [
        "item", "device", "batch", "mae_jax step s", "images/s", "MFU", "peak memory GiB (JAX)", "compile s",
        "PyTorch as timed", "PyTorch step s", "PyTorch images/s", "PyTorch step ÷ mae_jax step",
        "median of per-round ratios",
    ]  # fmt: skip
    rows = []
    for key in keys:
        outcome = outcomes.get(key)
        if outcome is None or outcome.figures is None:
            rows.append(_unfinished_row(outcome, key, len(header)))
            continue
        figures = outcome.figures
        mae = figures["mae_jax"]
        cells = [
            key, str(figures["config"]["batch_size"]), _seconds(mae["step_s"]), f"{mae['images_per_s']:.0f}",
            _percent(mae["mfu"]), _gib(figures.get("peak_memory_bytes")), _compile(outcome),
        ]  # fmt: skip
        for name, values in _torch_measurements(figures) or [("", None)]:
            if values is None:
                torch_cells = ["not in this item"] + ["—"] * 4
                device = f"JAX {_device(figures)}"
            else:
                torch_cells = [name, _seconds(values["step_s"]), f"{values['images_per_s']:.0f}"]
                torch_cells += [_ratio(values["step_s"] / mae["step_s"]), _ratio(figures.get(f"ratio {name}"))]
                device = f"JAX {_device(figures)}; PyTorch {values['device']}"
            rows.append("| " + " | ".join([cells[0], device, *cells[1:], *torch_cells]) + " |")
    return [_header(header), *rows]


def layouts_table(outcomes: dict[str, Outcome], keys: Sequence[str]) -> list[str]:
    """One row per item (a layout each, its own process and cache), divided by the first row's."""
    header = [
        "layout", "item", "device", "compile s", "step s", "images/s", "MFU", "peak memory GiB",
        "compile ÷ first row's", "step ÷ first row's",
    ]  # fmt: skip
    first = outcomes.get(keys[0])
    base = first.figures if first and first.figures else None
    rows = []
    for key in keys:
        outcome = outcomes.get(key)
        if outcome is None or outcome.figures is None:
            rows.append(_unfinished_row(outcome, key, len(header)))
            continue
        figures = outcome.figures
        mae = figures["mae_jax"]
        layout = "scanned" if figures["config"]["model"]["scan_blocks"] else "unrolled"
        ratios = ["—", "—"]
        if base:
            ratios = [
                _ratio(figures["compile_s"] / base["compile_s"]),
                _ratio(mae["step_s"] / base["mae_jax"]["step_s"]),
            ]
        rows.append(
            f"| {layout}{' (the default)' if not outcome.item.flip_layout else ''} | {key} | {_device(figures)} | "
            f"{_compile(outcome)} | {_seconds(mae['step_s'])} | {mae['images_per_s']:.0f} | {_percent(mae['mfu'])} | "
            f"{_gib(figures.get('peak_memory_bytes'))} | {' | '.join(ratios)} |"
        )
    return [_header(header), *rows]


def versus_table(outcomes: dict[str, Outcome], keys: Sequence[str]) -> list[str]:
    header = [
        "item", "what", "device", "XLA_FLAGS added", "step s", "images/s", "MFU", "peak memory GiB", "compile s",
        "baseline step ÷ this step",
    ]  # fmt: skip
    baseline = outcomes.get(keys[0])
    base_step = baseline.figures["mae_jax"]["step_s"] if baseline and baseline.figures else None
    rows = []
    for key in keys:
        outcome = outcomes.get(key)
        if outcome is None or outcome.figures is None:
            rows.append(_unfinished_row(outcome, key, len(header)))
            continue
        mae = outcome.figures["mae_jax"]
        speedup = base_step / mae["step_s"] if base_step else None
        rows.append(
            f"| {key} | {outcome.item.what} | {_device(outcome.figures)} | "
            f"{f'`{outcome.item.xla_flags}`' if outcome.item.xla_flags else '—'} | {_seconds(mae['step_s'])} | "
            f"{mae['images_per_s']:.0f} | {_percent(mae['mfu'])} | {_gib(outcome.figures.get('peak_memory_bytes'))} "
            f"| {_compile(outcome)} | {_ratio(speedup)} |"
        )
    return [_header(header), *rows]


def _header(columns: Sequence[str]) -> str:
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


TABLE_WRITERS = {"torch": torch_table, "layouts": layouts_table, "versus": versus_table}


def environment_lines(outcomes: Sequence[Outcome], backend: str | None) -> list[str]:
    """`backend`: what JAX started in the GPU check; None in a dry run."""
    ran = next((o.figures for o in outcomes if o.figures), None)
    if backend is None:
        platform_line = "- backend: cpu (DRY RUN: every item with JAX_PLATFORMS=cpu)"
    else:
        platform_line = f"- backend: {backend} (every item with JAX_PLATFORMS={GPU_PLATFORM}; no CPU fallback)"
    lines = [
        platform_line,
        f"- device of the first item: {_device(ran)}" if ran else "- device: no item ran",
        f"- driver: {nvidia_smi()}",
        f"- Python {platform.python_version()} on {platform.platform()}",
        f"- versions: {versions()}",
        f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`" if os.environ.get("XLA_FLAGS") else "- XLA_FLAGS: unset",
        f"- mae_jax: {git_revision()}",
    ]
    return lines


def nvidia_smi() -> str:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        result = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "nvidia-smi did not answer in 30 s"
    return "; ".join(result.stdout.strip().splitlines()) or f"nvidia-smi failed: {result.stderr.strip()[:200]}"


def versions() -> str:
    """jax and its GPU plugins, and the libraries beside it, as installed (not imported)."""
    names = ["jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers"]
    names += sorted(
        d.metadata["Name"] for d in importlib.metadata.distributions() if re.match(r"jax[-_]cuda", d.metadata["Name"])
    )
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=False)
    except OSError:
        return "not a git checkout"
    if head.returncode:
        return "not a git checkout"
    return head.stdout.strip() + (" with local changes" if dirty.stdout.strip() else "")


def write_report(
    path: pathlib.Path,
    outcomes: Sequence[Outcome],
    items: Sequence[Item],
    *,
    dry_run: bool,
    backend: str | None,
    budget_s: float,
    started_at: datetime.datetime,
    elapsed_s: float,
) -> None:
    by_key = {o.item.key: o for o in outcomes}
    done = len(outcomes) == len(items)
    title = "mae_jax benchmark suite" + (": DRY RUN on the CPU" if dry_run else "")
    lines = [f"# {title}", ""]
    if dry_run:
        lines += [
            "A tiny model (mu/4 at 32 px, batch ÷ 32, one timed round, MFU against a nominal 1 TFLOP/s): the figures",
            "show that every item's plumbing runs, nothing about speed. The ViT-H/14 items run the same tiny model",
            "as the ViT-L/16 ones (their steps come from the cache), and XLA:CPU parses table f's GPU flags and",
            f"ignores them. Every item runs on the CPU backend with `XLA_FLAGS={DRY_RUN_XLA_FLAGS}` added; PyTorch's",
            "compiled step uses torch.compile's aot_eager backend (tracing, no code generation) instead of inductor.",
            "",
        ]
    lines += [
        f"Started {started_at:%Y-%m-%d %H:%M:%S} UTC; {elapsed_s:.0f} s of the {budget_s:.0f} s budget used; "
        + ("finished." if done else f"in progress: {len(outcomes)} of {len(items)} items."),
        "",
        "## Environment",
        "",
        *environment_lines(outcomes, backend),
        "",
        "## Items",
        "",
        _header(["item", "what", "status", "device", "wall s", "expected s"]),
        *(
            f"| {o.item.key} | {o.item.what} | {o.status} | {_device(o.figures) if o.figures else '—'} | "
            f"{_seconds(o.wall_s)} | {_seconds(o.expected_s)} |"
            for o in outcomes
        ),
        "",
        "Times are medians over the timed rounds; ratios beside times are ratios of those times. Items are separate",
        "processes: a ratio between rows of different items compares separate runs; a 'median of per-round ratios'",
        "compares steps timed in turn in one process. Compile times marked 'cache load' are an earlier item's",
        "compiled step loaded from the persistent cache.",
    ]
    for table in TABLES:
        lines += ["", f"## {table.title}", ""]
        if table.note:
            lines += [table.note, ""]
        lines += TABLE_WRITERS[table.kind](by_key, table.keys)
    unfinished = [o for o in outcomes if o.status not in ("ok", "not selected")]
    lines += ["", "## Failed, timed out, skipped", ""]
    lines += [f"- **{o.item.key}**: {o.status}: {o.reason.splitlines()[0]}" for o in unfinished] or ["none"]
    for o in unfinished:
        if "\n" in o.reason:
            lines += ["", f"{o.item.key}:", "```", o.reason.split("\n", 1)[1], "```"]
    rerun = [o.item.key for o in unfinished if o.status in ("failed", "timed out") or "budget" in o.reason]
    if rerun:
        lines += ["", f"Next window: `--items={','.join(rerun)}`"]
    lines += ["", "## Commands and raw JSON", ""]
    for o in outcomes:
        if o.command:
            lines += [f"### {o.item.key}", "", "```", o.command, "```"]
            if o.figures is not None:
                lines += ["", "```json", json.dumps(o.figures), "```"]
            lines.append("")
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------
# Install step (standard library only: it runs before the dependencies are there)
# ---------------------------------------------------------------------------------------------------
MODULES = {  # distribution -> the module that shows it is installed, where the names differ
    "absl-py": "absl",
    "etils": "etils.epath",
    "ml-collections": "ml_collections",
    "orbax-checkpoint": "orbax.checkpoint",
    "pillow": "PIL",
    "scikit-image": "skimage",
    "tensorflow-datasets": "tensorflow_datasets",
}
COMPARED_WITH = ("torch", "transformers")  # from the test extra: only --torch needs them
CUDA_PLUGIN = re.compile(r"jax[-_]cuda\d+[-_]plugin")  # the distribution that gives jax its CUDA backend
JAX_CUDA_MAJORS = (13, 12)  # jax's extras cuda13 and cuda12, newest first


def cuda_plugins() -> list[str]:
    return sorted(
        d.metadata["Name"] for d in importlib.metadata.distributions() if CUDA_PLUGIN.fullmatch(d.metadata["Name"])
    )


def driver_cuda_version() -> tuple[int, int]:
    """The newest CUDA the NVIDIA driver supports, as `nvidia-smi` prints it in its header ("CUDA Version: 12.8");
    exits with one line where there is no driver to ask."""
    if shutil.which("nvidia-smi") is None:
        sys.exit("error: nvidia-smi not found: no NVIDIA driver to run the GPU benchmark on (--dry-run runs the CPU)")
    try:
        result = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        sys.exit("error: nvidia-smi did not answer within 60 s: the NVIDIA driver is not ready")
    match = re.search(r"CUDA Version\s*:\s*(\d+)\.(\d+)", result.stdout)
    if match is None:
        why = (result.stderr.strip() or result.stdout.strip() or f"exit code {result.returncode}").splitlines()[0]
        sys.exit(f"error: nvidia-smi names no CUDA version ({why}): the NVIDIA driver is not working")
    return int(match[1]), int(match[2])


def jax_for_gpu(requirement: str) -> str:
    """The jax requirement that brings the CUDA plugin for this driver: `jax[cuda13]` or `jax[cuda12]`, the newest
    CUDA both the driver and jax support, at the installed jax's version (else setup.cfg's range). Plain `jax` is
    the CPU wheel: JAX would then run everything on the CPU with a warning only."""
    major, minor = driver_cuda_version()
    try:
        installed = importlib.metadata.version("jax")
        offered = importlib.metadata.metadata("jax").get_all("Provides-Extra") or []
    except importlib.metadata.PackageNotFoundError:
        installed, offered = None, [f"cuda{m}" for m in JAX_CUDA_MAJORS]
    usable = [m for m in JAX_CUDA_MAJORS if m <= major and f"cuda{m}" in offered]
    if not usable:
        sys.exit(
            f"error: the NVIDIA driver supports CUDA {major}.{minor}; jax's CUDA wheels need CUDA 12 or 13 "
            f"({' '.join(offered) or 'no extras'} offered by jax {installed}): update the driver"
        )
    extra = f"jax[cuda{usable[0]}]"
    chosen = f"{extra}=={installed}" if installed else extra + requirement.removeprefix("jax")
    print(f"jax has no CUDA plugin; the driver supports CUDA {major}.{minor}: {chosen}", file=sys.stderr)
    return chosen


def missing_requirements(setup_cfg: pathlib.Path = REPO / "setup.cfg", *, gpu: bool = False) -> list[str]:
    """setup.cfg's install_requires whose module is not found, then torch and transformers (the test extra's
    ranges) if missing: what the install step installs. `gpu`: jax without a CUDA plugin counts as missing, and
    comes as the `jax[cudaNN]` that the driver runs (`jax_for_gpu`)."""
    options = configparser.ConfigParser()
    options.read(setup_cfg)

    def requirements(lines: str) -> list[str]:
        return [line.partition("#")[0].strip() for line in lines.splitlines() if line.partition("#")[0].strip()]

    wanted = requirements(options["options"]["install_requires"])
    extra = requirements(options["options.extras_require"]["test"])
    wanted += [r for r in extra if re.match(r"[A-Za-z0-9_.-]+", r).group() in COMPARED_WITH]
    missing = []
    for requirement in wanted:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group()
        if gpu and name == "jax" and not cuda_plugins():
            missing.append(jax_for_gpu(requirement))
            continue
        module = MODULES.get(name, name.replace("-", "_"))
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package of a dotted name is missing
            found = False
        if not found:
            missing.append(requirement)
    return missing


def jax_pins() -> list[str]:
    """`name==version` of every installed jax distribution (jax, jaxlib, the CUDA plugins): pip constraints
    that keep a GPU image's own build when an install would upgrade it."""
    names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    jax_names = [n for n in names if re.fullmatch(r"jax|jaxlib|jax[-_](cuda|rocm).*", n)]
    return sorted(f"{n}=={importlib.metadata.version(n)}" for n in jax_names)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mae_jax.benchmark_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=pathlib.Path, help="The markdown report to write.")
    parser.add_argument("--dry_run", action="store_true", help="A tiny model on the CPU: the plumbing only.")
    parser.add_argument("--budget_s", type=float, default=450.0, help="Seconds all items together may take.")
    parser.add_argument("--items", help="Comma-separated keys: run only these (in the table's order).")
    parser.add_argument("--missing_requirements", action="store_true", help="Print what the install step installs.")
    parser.add_argument("--jax_pins", action="store_true", help="Print name==version of the installed jax packages.")
    args = parser.parse_args(argv)
    keys = {item.key for item in ITEMS}
    selected = set(args.items.split(",")) if args.items else None
    if selected and selected - keys:
        parser.error(f"--items: unknown {sorted(selected - keys)}; the items are {[item.key for item in ITEMS]}")
    if not (args.report or args.missing_requirements or args.jax_pins):
        parser.error("--report=FILE is required")
    if args.budget_s <= 0:
        parser.error(f"--budget_s={args.budget_s} must be positive")
    args.selected = selected
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.missing_requirements or args.jax_pins:
        print("\n".join(missing_requirements(gpu=not args.dry_run) if args.missing_requirements else jax_pins()))
        return
    backend = None if args.dry_run else gpu_backend()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through run_item's cleanup: no orphaned step
    outcomes = run_suite(
        args.report, dry_run=args.dry_run, budget_s=args.budget_s, selected=args.selected, backend=backend
    )
    counts = {s: sum(o.status == s for o in outcomes) for s in dict.fromkeys(o.status for o in outcomes)}
    print(f"wrote {args.report} ({', '.join(f'{n} {s}' for s, n in counts.items())})")


if __name__ == "__main__":
    main()
