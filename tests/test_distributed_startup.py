"""Start-up of `python -m mae_jax.main` across processes: it joins the others, or fails in one line.

A run that cannot join its cluster must not train as "process 0 of 1" on every host. These runs stop
before training: bad flags and failed joins at start, the plain run at a bad config value after start-up.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess

import pytest

from tests.conftest import REPO, TINY_MAIN_FLAGS, main_command

CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "JAX_COORDINATOR", "KUBERNETES_", "TPU_")
# One step of the tiny model, for the old behaviour of training alone (the checks fail before it here).
ONE_STEP = (*TINY_MAIN_FLAGS, "--config.total_steps=1", "--config.warmup_steps=0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(process_id: int, num_processes: int, port: int) -> dict[str, str]:
    """What `srun` sets that JAX's SLURM detection reads, for a job whose process 0 runs on this machine."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "127.0.0.1",
        "SLURM_NTASKS": str(num_processes),
        "SLURM_PROCID": str(process_id),
        "SLURM_LOCALID": str(process_id),
        "JAX_COORDINATOR_PORT": str(port),
    }


def run(workdir: pathlib.Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {key: value for key, value in os.environ.items() if not key.startswith(CLUSTER_PREFIXES)}
    return subprocess.run(
        main_command(workdir, *flags), cwd=REPO, env={**clean, **(env or {})}, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


def assert_one_line_error(result: subprocess.CompletedProcess, workdir: pathlib.Path, message: str) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (workdir / "checkpoints").exists()  # never trained


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--num_processes=2",), "error: --num_processes without --coordinator_address and --process_id"),
        (("--coordinator_address=127.0.0.1:1234",), "error: --coordinator_address without --num_processes and"),
        (("--num_processes=2", "--process_id=1"), "error: --num_processes and --process_id without --coordinator"),
    ],
    ids=["count_alone", "address_alone", "no_address"],
)
def test_incomplete_distributed_flags_fail_in_one_line(tmp_path: pathlib.Path, flags: tuple, message: str):
    assert_one_line_error(run(tmp_path, *ONE_STEP, *flags), tmp_path, message)


def test_slurm_job_with_inconsistent_ids_fails_in_one_line(tmp_path: pathlib.Path):
    """Process 2 of 2 cannot join (JAX refuses it with a ValueError too): an error, not a machine on its own."""
    result = run(tmp_path, *ONE_STEP, env=slurm_env(2, 2, free_port()))
    message = "error: cannot join the slurm cluster JAX detected: ValueError: process id 2 is not one of the 2"
    assert_one_line_error(result, tmp_path, message)
    assert result.stderr.rstrip().endswith("to run this process on its own, pass --coordinator_address=127.0.0.1:PORT "
                                          "--num_processes=1 --process_id=0")  # fmt: skip


def test_slurm_job_whose_coordinator_is_unreachable_fails_in_one_line(tmp_path: pathlib.Path):
    """Process 1 of a SLURM job whose process 0 never starts: nothing listens on the coordinator's port."""
    port = free_port()
    result = run(tmp_path, *ONE_STEP, "--initialization_timeout=2", env=slurm_env(1, 2, port))
    message = f"error: cannot join the slurm cluster JAX detected: TimeoutError: the coordinator 127.0.0.1:{port} "
    assert_one_line_error(result, tmp_path, message)


def test_run_without_a_cluster_says_it_is_one_process(tmp_path: pathlib.Path):
    """Start-up goes on as one process and says so; a bad config value then stops the run before training."""
    result = run(tmp_path, "--config.mask_ratio=1.0")
    assert "No cluster (TPU VM, SLURM, Open MPI) detected and no --coordinator_address: single process" in result.stderr
    assert "JAX process 0 of 1" in result.stderr
    assert_one_line_error(result, tmp_path, "error: mask_ratio=1.0 must be in [0, 1)")
