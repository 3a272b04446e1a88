"""mae_jax.newest_checkpoint: the launchers' view of a workdir is the step a resumed run restores."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mae_jax import checkpointing
from mae_jax.newest_checkpoint import newest_step
from tests.conftest import REPO


def test_newest_step_agrees_with_the_manager_that_resumes(tmp_path: pathlib.Path):
    """Two saves by the run's own CheckpointManager, then a third cut short (Orbax's temporary folder left)."""
    assert newest_step(tmp_path) is None  # no checkpoints folder yet
    manager = checkpointing.make_manager(epath.Path(tmp_path), keep=3)
    for step in (1, 2):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.full(4, step)})))
    manager.close()  # waits for the async saves
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(checkpoints / "2", checkpoints / f"3{ocp.path.step.TMP_DIR_SUFFIX}")
    launcher_view = newest_step(tmp_path)
    resumed = checkpointing.make_manager(epath.Path(tmp_path), keep=3)
    assert launcher_view == resumed.latest_step() == 2
    resumed.close()

    # The command line prints nothing for a new workdir (tests/test_launch.py's SLURM jobs read steps through it).
    cli = [sys.executable, "-m", "mae_jax.newest_checkpoint", str(tmp_path / "new")]
    assert subprocess.run(cli, cwd=REPO, capture_output=True, text=True, check=True).stdout == ""
