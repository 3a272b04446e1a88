"""Stands in for `python -m mae_jax.main` under srun: what the launchers rely on, without training.

Like main.py on SIGTERM it stops, process 0 (SLURM_PROCID) writes a checkpoint as Orbax does on a local file
system (a temporary folder, renamed to the step number once complete) and every process exits 143. With
FAKE_MAIN_SAVES=0 it stops without saving, as a run does when the signal comes before its first step.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import time

PREEMPTED_EXIT_CODE = 143


def say(line: str) -> None:
    """One write per line: the tasks share the job's output, and print() may write a line in two parts."""
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


def main(argv: list[str]) -> int:
    workdir = pathlib.Path(next(arg.split("=", 1)[1] for arg in argv if arg.startswith("--workdir=")))
    rank = int(os.environ["SLURM_PROCID"])
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: stop.append(signum))
    say(f"task {rank} started")
    while not stop:
        time.sleep(0.02)  # a training step
    if rank == 0 and os.environ.get("FAKE_MAIN_SAVES", "1") == "1":
        step = os.environ["FAKE_MAIN_STEP"]
        staging = workdir / "checkpoints" / f"{step}.orbax-checkpoint-tmp"  # Orbax 0.12's name for it
        (staging / "state").mkdir(parents=True)
        staging.rename(staging.parent / step)
        say(f"task 0 saved step {step}")
    return PREEMPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
