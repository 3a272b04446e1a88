"""The report's comparison tables: which items each compares (`TABLES`), and their markdown rows with the
ratios computed from the items' JSON."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mae_jax.benchmark_suite import cells
from mae_jax.benchmark_suite.outcome import Outcome

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


def _compile(outcome: Outcome) -> str:
    return cells.seconds(outcome.figures["compile_s"]) + (" (cache load)" if outcome.cache_load else "")


def _unfinished_row(outcome: Outcome | None, key: str, columns: int) -> str:
    status = "not in the table of items" if outcome is None else outcome.status
    return f"| {key} | {status} |" + " — |" * (columns - 2)


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
        mae_cells = [
            key, str(figures["config"]["batch_size"]), cells.seconds(mae["step_s"]), f"{mae['images_per_s']:.0f}",
            cells.percent(mae["mfu"]), cells.gib(figures.get("peak_memory_bytes")), _compile(outcome),
        ]  # fmt: skip
        for name, values in _torch_measurements(figures) or [("", None)]:
            if values is None:
                torch_cells = ["not in this item"] + ["—"] * 4
                device = f"JAX {cells.device(figures)}"
            else:
                torch_cells = [name, cells.seconds(values["step_s"]), f"{values['images_per_s']:.0f}"]
                torch_cells += [
                    cells.ratio(values["step_s"] / mae["step_s"]),
                    cells.ratio(figures.get(f"ratio {name}")),
                ]
                device = f"JAX {cells.device(figures)}; PyTorch {values['device']}"
            rows.append("| " + " | ".join([mae_cells[0], device, *mae_cells[1:], *torch_cells]) + " |")
    return [cells.header(header), *rows]


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
                cells.ratio(figures["compile_s"] / base["compile_s"]),
                cells.ratio(mae["step_s"] / base["mae_jax"]["step_s"]),
            ]
        rows.append(
            f"| {layout}{' (the default)' if not outcome.item.flip_layout else ''} | {key} | {cells.device(figures)} | "
            f"{_compile(outcome)} | {cells.seconds(mae['step_s'])} | {mae['images_per_s']:.0f} | "
            f"{cells.percent(mae['mfu'])} | {cells.gib(figures.get('peak_memory_bytes'))} | {' | '.join(ratios)} |"
        )
    return [cells.header(header), *rows]


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
            f"| {key} | {outcome.item.what} | {cells.device(outcome.figures)} | "
            f"{f'`{outcome.item.xla_flags}`' if outcome.item.xla_flags else '—'} | {cells.seconds(mae['step_s'])} | "
            f"{mae['images_per_s']:.0f} | {cells.percent(mae['mfu'])} | "
            f"{cells.gib(outcome.figures.get('peak_memory_bytes'))} | {_compile(outcome)} | {cells.ratio(speedup)} |"
        )
    return [cells.header(header), *rows]


TABLE_WRITERS = {"torch": torch_table, "layouts": layouts_table, "versus": versus_table}
