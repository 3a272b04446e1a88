"""Figures and tables of `launch/ablations.sh ROOT`: linear-probe accuracy against mask ratio and strategy.

    python docs/ablations/plot.py ROOT

Reads each setting's TensorBoard events (pretraining: the last `probe_top1` and `knn_top1`; its `.probe`
workdir: the offline linear probe's last `eval_top1`), writes mask_ratio.png and strategy.png next to this file
and prints the tables as markdown. Needs matplotlib and tensorboard (the test extra).
"""

from __future__ import annotations

import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing import event_accumulator

HERE = pathlib.Path(__file__).parent
RATIOS = ("0.25", "0.5", "0.6", "0.75", "0.85", "0.9")
STRATEGIES = (("random", "0.75"), ("block", "0.5"), ("block", "0.75"), ("grid", "0.75"))


def last_scalar(workdir: pathlib.Path, name: str) -> float | None:
    """The value of `name` at the highest step in the workdir's event files; None if never written."""
    values = {}
    for events in sorted(workdir.glob("events.out.tfevents.*")):
        summaries = event_accumulator.EventAccumulator(str(events), size_guidance={"scalars": 0})
        summaries.Reload()
        if name in summaries.Tags()["scalars"]:
            values |= {event.step: event.value for event in summaries.Scalars(name)}
    return values[max(values)] if values else None


def accuracies(root: pathlib.Path, setting: str) -> dict[str, float | None]:
    """Top-1 in % of one setting: offline probe, online probe, kNN."""
    online, knn = last_scalar(root / setting, "probe_top1"), last_scalar(root / setting, "knn_top1")
    return {
        "offline probe": last_scalar(root / f"{setting}.probe", "eval_top1"),
        "online probe": None if online is None else 100 * online,
        "kNN": None if knn is None else 100 * knn,
    }


def table(rows: dict[str, dict[str, float | None]], first: str) -> str:
    columns = list(next(iter(rows.values())))
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = ("-" if row[c] is None else f"{row[c]:.1f}" for c in columns)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(root: pathlib.Path) -> None:
    by_ratio = {ratio: accuracies(root, f"random_{ratio}") for ratio in RATIOS}
    by_strategy = {
        f"{masking} {float(ratio):.0%}": accuracies(root, f"{masking}_{ratio}") for masking, ratio in STRATEGIES
    }

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for metric, style in (("offline probe", "o-"), ("online probe", "s--"), ("kNN", "^:")):
        ratios = [r for r, v in by_ratio.items() if v[metric] is not None]
        ax.plot([100 * float(r) for r in ratios], [by_ratio[r][metric] for r in ratios], style, label=metric)
    ax.set(xlabel="mask ratio (%)", ylabel="top-1 (%)", title="Fashion-MNIST, ViT mu/4 at 32 px, 3 epochs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "mask_ratio.png", dpi=120)

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    names = list(by_strategy)
    width = 0.27
    for i, metric in enumerate(("offline probe", "online probe", "kNN")):
        values = [by_strategy[name][metric] or 0 for name in names]
        ax.bar([j + (i - 1) * width for j in range(len(names))], values, width, label=metric)
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="top-1 (%)", title="Masking strategies (Fig. 6), same recipe")
    values = [v for row in by_strategy.values() for v in row.values() if v]
    ax.set_ylim(min(values) - 10, max(values) + 6)
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "strategy.png", dpi=120)

    print(table(by_ratio, "mask ratio (random)"), end="\n\n")
    print(table(by_strategy, "masking"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/ablations/plot.py ROOT (the directory launch/ablations.sh filled)")
    main(pathlib.Path(sys.argv[1]))
