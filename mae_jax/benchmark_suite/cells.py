"""How the report writes one value in a markdown table: seconds, ratios, percentages, GiB, an item's device,
and a table's header row; "—" where there is no value."""

from __future__ import annotations

import math
from collections.abc import Sequence


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}" if value < 10 else f"{value:.1f}"


def ratio(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def percent(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.1%}"


def gib(value: int | None) -> str:
    return "not reported" if value is None else f"{value / 2**30:.2f}"


def device(figures: dict) -> str:
    """The backend and devices of an item's JAX figures: "gpu: 1 x NVIDIA H100 80GB HBM3"."""
    device = figures["device"]
    return f"{device['backend']}: {device['count']} x {device['kind']}"


def header(columns: Sequence[str]) -> str:
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
