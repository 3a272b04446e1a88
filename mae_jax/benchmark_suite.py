"""The GPU measurement in one go: `python -m mae_jax.benchmark_suite --report=FILE [--dry_run] [--budget_s=450]
[--items=KEY,...]` (`launch/gpu_benchmark.sh` installs what is missing first, then runs this).

GPU time comes in short windows, so every measurement of `ITEMS` runs as its own `python -m mae_jax.benchmark
--config=... --json=...` process, in priority order, each with what is left of the time budget as its timeout:
XLA_FLAGS are read once per process, and one failure or hang must not end the rest. An item that fails, times
out or does not fit what is left of the budget stays in the report with the reason (the end of its stderr);
`--items` runs the ones a window left over in the next. The report (markdown, rewritten after every item, so a
window that closes early still leaves one) holds the environment, one table per comparison with its ratios
computed from the items' JSON, the failed and skipped items, and every item's JSON.

All items compute in bfloat16 on ViT-L/16 (configs/vit_large.py) or ViT-H/14 (configs/vit_huge.py), in the
configs' default block layout except `layouts`. Compilation dominates (ViT-L/16 unrolled: 140-163 s on an
H100), so the items share a fresh persistent compilation cache: a later item whose step an earlier one
compiled loads it in seconds (its compile time is then marked as a cache load), and XLA:GPU's per-fusion
autotuning cache, so a new step does not tune the GEMM shapes an earlier one tuned. Expected time per item on one
H100 or H200, with the unrolled default (`COMPILE_S` has the guesses for scanned blocks; `estimate_s` computes
them): 20 s to start a process, plus the compile, plus 15 s with PyTorch in the run:

| key | what | expected |
|---|---|---|
| layouts | d. ViT-L/16 batch 128, `--both_layouts`: compile and step time of unrolled and scanned blocks | 210 s |
| L16_b128_torch | a. ViT-L/16 batch 128 with `--torch` (step from the cache) | 40 s |
| L16_b256_torch | a. ViT-L/16 batch 256 with `--torch` | 185 s |
| L16_b128 | the baseline of c, e and f: ViT-L/16 batch 128 alone (step from the cache) | 25 s |
| cudnn | c. `--config.model.attention=cudnn` | 170 s |
| autodiff | e. `--config.model.kernels=autodiff`: jax's backward passes instead of the custom VJPs | 170 s |
| cmdbuf_off | f. `--xla_gpu_enable_command_buffer=` (no CUDA graphs) | 170 s |
| cmdbuf_loops | f. `--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL` (loops in CUDA graphs too) | 170 s |
| lhs | f. `--xla_gpu_enable_latency_hiding_scheduler=true` | 170 s |
| H14_b128, H14_b256 | b. ViT-H/14 batch 128 and 256 | 220 s each |
| H14_b128_torch, H14_b256_torch | b. the same with `--torch` (steps from the cache) | 40 s each |

About 1830 s in all: the default budget of 450 s (a window of 8 minutes, the install included) covers the
first three; the report lists the rest with the `--items` command for the next window. With scanned blocks the
default, about 870 s.

`--dry_run` runs the same table on the CPU with a tiny model (mu/4 at 32 px, batch / 32, one round, MFU against
a nominal 1 TFLOP/s, XLA:CPU's cheaper optimization level) so that every item's plumbing runs: about 2 minutes
on a busy 2-core machine. cuDNN attention needs a GPU and is only listed; XLA:CPU parses the GPU flags and
ignores them, so those items run there too. This module imports only the standard
library at the top: `--missing_requirements` and `--jax_pins` serve the install step before anything else is.
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
DRY_RUN_ARGS = (
    "--config.model.variant=mu/4", "--config.image_size=32", "--config.model.decoder_width=32",
    "--config.model.decoder_depth=1", "--config.model.decoder_heads=2", "--rounds=1", "--peak_tflops=1",
)  # fmt: skip
DRY_RUN_BATCH_DIVISOR = 32
# XLA:CPU compiles the tiny steps in half the time: the dry run's speed is not the point
DRY_RUN_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
SHOWN_ENV = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS")  # in the report's commands
STDERR_LINES = 15  # of a failed item's stderr, in the report

# Expected seconds on one H100/H200 (README: ViT-L/16 unrolled compiled in 140-163 s; the rest are guesses).
STARTUP_S = 20  # interpreter, JAX and the GPU up, parameters initialized, warm-up and timed rounds
TORCH_S = 15  # torch imported, ViTMAE built, its steps
CACHE_LOAD_S = 5  # a compiled step loaded from the persistent cache
COMPILE_S = {"L/16": {False: 150, True: 40}, "H/14": {False: 200, True: 50}}  # by variant, then scanned
DRY_RUN_S = 20  # per item on a CPU, tiny model; PyTorch adds TORCH_S
VARIANTS = {VIT_L: "L/16", VIT_H: "H/14"}


# ---------------------------------------------------------------------------------------------------
# Items and tables
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Item:
    """One benchmark process: `config` at `batch` in bf16, with further flags and XLA_FLAGS."""

    key: str
    what: str
    config: str
    batch: int
    args: tuple[str, ...] = ()
    xla_flags: str = ""
    torch: bool = False
    both_layouts: bool = False
    needs_gpu: bool = False

    @property
    def program(self) -> tuple:
        """What decides the compiled mae_jax step (of the config's default layout): equal programs share the
        persistent cache. PyTorch and the other layout add measurements, not a different step."""
        return self.config, self.batch, self.args, self.xla_flags

    def estimate_s(self, compiled: set[tuple], scanned: bool, dry_run: bool) -> float:
        """Expected seconds; `compiled`: the programs earlier items of this run compiled; `scanned`: the
        configs' default layout."""
        torch = TORCH_S if self.torch else 0
        if dry_run:
            return DRY_RUN_S + torch
        compile_s = COMPILE_S[VARIANTS[self.config]]
        own = CACHE_LOAD_S if self.program in compiled else compile_s[scanned]
        return STARTUP_S + own + (compile_s[not scanned] if self.both_layouts else 0) + torch

    def command(self, benchmark: Sequence[str], json_path: pathlib.Path, dry_run: bool) -> list[str]:
        batch = max(1, self.batch // DRY_RUN_BATCH_DIVISOR) if dry_run else self.batch
        flags = [f"--config={self.config}", *COMMON_ARGS, f"--config.batch_size={batch}", *self.args]
        flags += ["--torch"] * self.torch + ["--both_layouts"] * self.both_layouts
        return [*benchmark, *flags, *(DRY_RUN_ARGS if dry_run else ()), f"--json={json_path}"]


ITEMS = (
    Item("layouts", "ViT-L/16, batch 128, both block layouts", VIT_L, 128, both_layouts=True),
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


@dataclasses.dataclass(frozen=True)
class Table:
    """A report table: `kind` "torch" (step figures and the PyTorch ratio), "layouts" (one item's two
    layouts) or "versus" (the first key is the baseline the others are divided into)."""

    title: str
    kind: str
    keys: tuple[str, ...]
    note: str = ""


TABLES = (
    Table("a. ViT-L/16 against transformers' ViTMAE (PyTorch)", "torch", ("L16_b128_torch", "L16_b256_torch")),
    Table(
        "b. ViT-H/14",
        "torch",
        ("H14_b128", "H14_b256", "H14_b128_torch", "H14_b256_torch"),
        "The PyTorch columns come from the items run with it; the rows without are the JAX step alone.",
    ),
    Table("c. XLA against cuDNN attention, ViT-L/16 batch 128", "versus", ("L16_b128", "cudnn")),
    Table("d. Scanned against unrolled blocks, ViT-L/16 batch 128", "layouts", ("layouts",)),
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
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    # GEMM autotuning results shared across items too: the same shapes are not tuned again in each process
    autotune = f"--xla_gpu_per_fusion_autotune_cache_dir={cache_dir / 'autotune'}"
    xla_flags = [os.environ.get("XLA_FLAGS", ""), autotune, DRY_RUN_XLA_FLAGS if dry_run else "", item.xla_flags]
    if any(xla_flags):
        env["XLA_FLAGS"] = " ".join(flag for flag in xla_flags if flag)
    if item.torch:  # JAX would otherwise take 75 % of the GPU's memory up front, and PyTorch run out of it
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    return env


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
) -> list[Outcome]:
    """Run `items` (those in `selected`, when given) in order within `budget_s`; rewrite `report` after each."""
    start, started_at = time.monotonic(), datetime.datetime.now(datetime.UTC)
    scanned = default_layout_scanned() if scanned is None else scanned
    outcomes: list[Outcome] = []
    compiled: set[tuple] = set()
    with tempfile.TemporaryDirectory(prefix="benchmark_suite_") as scratch:
        folder = pathlib.Path(scratch)
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
                command = item.command(benchmark, folder / f"{item.key}.json", dry_run)
                env = item_env(item, folder / "cache", dry_run)
                outcome = run_item(item, command, env, left, folder)
                shown = {k: v for k, v in env.items() if k in SHOWN_ENV and v != os.environ.get(k)}
                json_here = item.command(benchmark, pathlib.Path(f"{item.key}.json"), dry_run)
                outcome.command = " ".join(
                    [f"{k}={shlex.quote(v)}" for k, v in shown.items()] + [shlex.join(json_here)]
                )
                outcome.cache_load, outcome.expected_s = item.program in compiled, estimate
                if outcome.status == "ok":
                    compiled.add(item.program)
                print(f"[{time.monotonic() - start:5.0f} s] {item.key}: {outcome.status}", flush=True)
                outcomes.append(outcome)
            write_report(
                report,
                outcomes,
                items,
                dry_run=dry_run,
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


def _measurement(figures: dict, prefix: str = "", suffix: str = "") -> tuple[str, dict] | None:
    """The (name, figures) of the measurement whose name starts with `prefix` and ends with `suffix`."""
    for name, value in figures.items():
        if isinstance(value, dict) and "step_s" in value and name.startswith(prefix) and name.endswith(suffix):
            return name, value
    return None


def _compile(outcome: Outcome) -> str:
    return _seconds(outcome.figures["compile_s"]) + (" (cache load)" if outcome.cache_load else "")


def _unfinished_row(outcome: Outcome | None, key: str, columns: int) -> str:
    status = "not in the table of items" if outcome is None else outcome.status
    return f"| {key} | {status} |" + " — |" * (columns - 2)


def torch_table(outcomes: dict[str, Outcome], keys: Sequence[str]) -> list[str]:
    header = [
        "item", "batch", "mae_jax step s", "images/s", "MFU", "peak memory GiB (JAX)", "compile s",
        "PyTorch step s", "PyTorch images/s", "PyTorch step ÷ mae_jax step", "median of per-round ratios",
    ]  # fmt: skip
    rows = []
    for key in keys:
        outcome = outcomes.get(key)
        if outcome is None or outcome.figures is None:
            rows.append(_unfinished_row(outcome, key, len(header)))
            continue
        figures = outcome.figures
        mae = figures["mae_jax"]
        torch = _measurement(figures, "PyTorch")
        cells = [
            key, str(figures["config"]["batch_size"]), _seconds(mae["step_s"]), f"{mae['images_per_s']:.0f}",
            _percent(mae["mfu"]), _gib(figures.get("peak_memory_bytes")), _compile(outcome),
        ]  # fmt: skip
        if torch:
            name, values = torch
            cells += [_seconds(values["step_s"]), f"{values['images_per_s']:.0f}"]
            cells += [_ratio(values["step_s"] / mae["step_s"]), _ratio(figures.get(f"ratio {name}"))]
        else:
            cells += ["not in this item"] + ["—"] * 3
        rows.append("| " + " | ".join(cells) + " |")
    return [_header(header), *rows]


def layouts_table(outcomes: dict[str, Outcome], keys: Sequence[str]) -> list[str]:
    header = [
        "layout", "compile s", "step s", "images/s", "MFU", "compile ÷ first row's", "step ÷ first row's",
        "median of per-round step ratios",
    ]  # fmt: skip
    outcome = outcomes.get(keys[0])
    if outcome is None or outcome.figures is None:
        return [_header(header), _unfinished_row(outcome, keys[0], len(header))]
    figures = outcome.figures
    mae = figures["mae_jax"]
    default = "scanned" if figures["config"]["model"]["scan_blocks"] else "unrolled"
    rows = [
        f"| {default} (the default) | {_compile(outcome)} | {_seconds(mae['step_s'])} | {mae['images_per_s']:.0f} "
        f"| {_percent(mae['mfu'])} | 1.00x | 1.00x | — |"
    ]
    other = _measurement(figures, "mae_jax, ", " blocks")
    if other:
        name, values = other
        layout = name.removeprefix("mae_jax, ").removesuffix(" blocks")
        rows.append(
            f"| {layout} | {_seconds(values['compile_s'])} | {_seconds(values['step_s'])} | "
            f"{values['images_per_s']:.0f} | {_percent(values['mfu'])} | "
            f"{_ratio(values['compile_s'] / figures['compile_s'])} | {_ratio(values['step_s'] / mae['step_s'])} | "
            f"{_ratio(figures.get(f'ratio {name}'))} |"
        )
    return [_header(header), *rows]


def versus_table(outcomes: dict[str, Outcome], keys: Sequence[str]) -> list[str]:
    header = [
        "item", "what", "XLA_FLAGS added", "step s", "images/s", "MFU", "peak memory GiB", "compile s",
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
            f"| {key} | {outcome.item.what} | {f'`{outcome.item.xla_flags}`' if outcome.item.xla_flags else '—'} | "
            f"{_seconds(mae['step_s'])} | "
            f"{mae['images_per_s']:.0f} | {_percent(mae['mfu'])} | {_gib(outcome.figures.get('peak_memory_bytes'))} "
            f"| {_compile(outcome)} | {_ratio(speedup)} |"
        )
    return [_header(header), *rows]


def _header(columns: Sequence[str]) -> str:
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


TABLE_WRITERS = {"torch": torch_table, "layouts": layouts_table, "versus": versus_table}


def environment_lines(outcomes: Sequence[Outcome]) -> list[str]:
    ran = next((o.figures for o in outcomes if o.figures), None)
    device = ran["device"] if ran else None
    lines = [
        f"- device: {device['count']} x {device['kind']} ({device['platform']})" if device else "- device: no item ran",
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
            f"ignores them. Every item runs with `XLA_FLAGS={DRY_RUN_XLA_FLAGS}` added.",
            "",
        ]
    lines += [
        f"Started {started_at:%Y-%m-%d %H:%M:%S} UTC; {elapsed_s:.0f} s of the {budget_s:.0f} s budget used; "
        + ("finished." if done else f"in progress: {len(outcomes)} of {len(items)} items."),
        "",
        "## Environment",
        "",
        *environment_lines(outcomes),
        "",
        "## Items",
        "",
        _header(["item", "what", "status", "wall s", "expected s"]),
        *(
            f"| {o.item.key} | {o.item.what} | {o.status} | {_seconds(o.wall_s)} | {_seconds(o.expected_s)} |"
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


def missing_requirements(setup_cfg: pathlib.Path = REPO / "setup.cfg") -> list[str]:
    """setup.cfg's install_requires whose module is not found, then torch and transformers (the test extra's
    ranges) if missing: what the install step installs."""
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
        print("\n".join(missing_requirements() if args.missing_requirements else jax_pins()))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through run_item's cleanup: no orphaned step
    outcomes = run_suite(args.report, dry_run=args.dry_run, budget_s=args.budget_s, selected=args.selected)
    counts = {s: sum(o.status == s for o in outcomes) for s in dict.fromkeys(o.status for o in outcomes)}
    print(f"wrote {args.report} ({', '.join(f'{n} {s}' for s, n in counts.items())})")


if __name__ == "__main__":
    main()
