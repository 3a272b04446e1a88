"""The markdown report: the environment (backend, driver, versions, revision), the items' statuses, the
comparison tables, what failed or was skipped with the `--items` for the next window, and every item's command
and JSON."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
from collections.abc import Sequence

from mae_jax.benchmark_suite import cells
from mae_jax.benchmark_suite.backend import GPU_PLATFORM
from mae_jax.benchmark_suite.items import DRY_RUN_XLA_FLAGS, REPO, Item
from mae_jax.benchmark_suite.outcome import Outcome
from mae_jax.benchmark_suite.tables import TABLE_WRITERS, TABLES


def environment_lines(outcomes: Sequence[Outcome], backend: str | None) -> list[str]:
    """`backend`: what JAX started in the GPU check; None in a dry run."""
    ran = next((o.figures for o in outcomes if o.figures), None)
    if backend is None:
        platform_line = "- backend: cpu (DRY RUN: every item with JAX_PLATFORMS=cpu)"
    else:
        platform_line = f"- backend: {backend} (every item with JAX_PLATFORMS={GPU_PLATFORM}; no CPU fallback)"
    lines = [
        platform_line,
        f"- device of the first item: {cells.device(ran)}" if ran else "- device: no item ran",
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
        cells.header(["item", "what", "status", "device", "wall s", "expected s"]),
        *(
            f"| {o.item.key} | {o.item.what} | {o.status} | {cells.device(o.figures) if o.figures else '—'} | "
            f"{cells.seconds(o.wall_s)} | {cells.seconds(o.expected_s)} |"
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
