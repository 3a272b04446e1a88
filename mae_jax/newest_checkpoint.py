"""The newest complete checkpoint step of a workdir, for launchers that must know whether a run saved.

`python -m mae_jax.newest_checkpoint WORKDIR` prints that step, or nothing when there is none. A step counts
once Orbax has finalised it (its folder renamed from the temporary name, or on gs:// its commit marker
written), as a resumed run's `CheckpointManager.latest_step()` finds it; a save cut short does not count.
It imports Orbax but starts no JAX backend, so it is quick and leaves the node's accelerators alone.
"""

from __future__ import annotations

import sys

import orbax.checkpoint as ocp
from etils import epath

CHECKPOINTS_DIR = "checkpoints"  # the folder of a workdir that holds its steps (`checkpointing.make_manager`)


def newest_step(workdir: str | epath.Path) -> int | None:
    """The newest finalised step under `workdir`, or None when there is none (or no such workdir)."""
    name_format = ocp.path.step.standard_name_format()  # the manager's: plain step numbers
    newest = ocp.path.step.latest_step_metadata(epath.Path(workdir) / CHECKPOINTS_DIR, name_format)
    return None if newest is None else newest.step


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m mae_jax.newest_checkpoint WORKDIR", file=sys.stderr)
        return 2
    try:
        step = newest_step(argv[0])
    except Exception as error:  # any storage error: one line for the launcher's log, not a traceback
        reason = " ".join(str(error).split())  # storage errors span lines
        print(f"newest_checkpoint: cannot read the checkpoints of {argv[0]}: {reason}", file=sys.stderr)
        return 1
    if step is not None:
        print(step)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
