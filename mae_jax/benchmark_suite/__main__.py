"""The command line, `python -m mae_jax.benchmark_suite`: the install step's answers
(`--missing_requirements`, `--jax_pins`), or the GPU check and the suite run into `--report`."""

from __future__ import annotations

import argparse
import pathlib
import signal
import sys
from collections.abc import Sequence

from mae_jax import benchmark_suite
from mae_jax.benchmark_suite.backend import gpu_backend
from mae_jax.benchmark_suite.install import jax_pins, missing_requirements
from mae_jax.benchmark_suite.items import ITEMS
from mae_jax.benchmark_suite.runner import run_suite


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mae_jax.benchmark_suite", description=benchmark_suite.__doc__.splitlines()[0]
    )
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
