"""Running the items: each in a benchmark process of its own, in order, within what is left of the time budget,
with the compilation and autotuning caches they share (or an empty one of its own), the report rewritten after
each."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence

from mae_jax.benchmark_suite.backend import GPU_PLATFORM
from mae_jax.benchmark_suite.items import BENCHMARK, DRY_RUN_XLA_FLAGS, ITEMS, REPO, Item
from mae_jax.benchmark_suite.outcome import Outcome
from mae_jax.benchmark_suite.report import write_report

SHOWN_ENV = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS")  # in the report's commands
STDERR_LINES = 15  # of a failed item's stderr, in the report


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
