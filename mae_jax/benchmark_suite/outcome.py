"""What became of an item (`Outcome`): the record the runner fills in and the report reads."""

from __future__ import annotations

import dataclasses

from mae_jax.benchmark_suite.items import Item


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
