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

CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "JAX_COORDINATOR", "KUBERNETES_", "TPU_", "JOB_COMPLETION_INDEX")
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


# The `kubernetes` package as far as JAX's Kubernetes cluster class uses it to decide whether it is in a
# cluster: `config.load_incluster_config`, with the checks of the real one (kubernetes-client/python's
# `incluster_config`: the service's address, then the service account's token and certificate, each a
# ConfigException), and the API classes it builds once that succeeds. The account's folder is the real path
# unless the test names another.
KUBERNETES_STAND_IN = {
    "__init__.py": "from kubernetes import client, config\n",
    "config/__init__.py": """import os

ACCOUNT = os.environ.get("STAND_IN_SERVICE_ACCOUNT_DIR", "/var/run/secrets/kubernetes.io/serviceaccount")


class ConfigException(Exception):
    pass


def load_incluster_config(client_configuration=None, try_refresh_token=True):
    if not os.environ.get("KUBERNETES_SERVICE_HOST") or not os.environ.get("KUBERNETES_SERVICE_PORT"):
        raise ConfigException("Service host/port is not set.")
    if not os.path.isfile(os.path.join(ACCOUNT, "token")):
        raise ConfigException("Service token file does not exist.")
    if not os.path.isfile(os.path.join(ACCOUNT, "ca.crt")):
        raise ConfigException("Service certification file does not exist.")
""",
    "client/__init__.py": """from kubernetes.client import exceptions


class CoreV1Api:
    pass


class BatchV1Api:
    pass
""",
    "client/exceptions.py": "class ApiException(Exception):\n    pass\n",
}


def kubernetes_pod(tmp_path: pathlib.Path, *, token_mounted: bool, **env: str) -> dict[str, str]:
    """The environment of a Kubernetes pod whose Python has the `kubernetes` package."""
    package, account = tmp_path / "site" / "kubernetes", tmp_path / "serviceaccount"
    for name, text in KUBERNETES_STAND_IN.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    account.mkdir()
    if token_mounted:
        (account / "token").write_text("token")
        (account / "ca.crt").write_text("certificate")
    return {
        "PYTHONPATH": str(package.parent),
        "STAND_IN_SERVICE_ACCOUNT_DIR": str(account),
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
        "HOSTNAME": "notebook-0",
        **env,
    }


def test_a_lone_kubernetes_pod_is_one_process(tmp_path: pathlib.Path):
    """A pod outside an indexed Job (a notebook server) with the `kubernetes` package: JAX's class takes it for a
    cluster and then cannot join it; here it runs as one process and says why."""
    result = run(tmp_path / "run", "--config.mask_ratio=1.0", env=kubernetes_pod(tmp_path, token_mounted=True))
    assert "A Kubernetes pod outside an indexed Job (no JOB_COMPLETION_INDEX): not a cluster" in result.stderr
    assert "JAX process 0 of 1" in result.stderr
    assert_one_line_error(result, tmp_path / "run", "error: mask_ratio=1.0 must be in [0, 1)")


def test_a_cluster_check_that_raises_is_one_line_and_one_process_runs_as_it_says(tmp_path: pathlib.Path):
    """A pod of an indexed Job whose service account token is not mounted: JAX's check raises while detecting.
    That is one line that says how to run the process on its own, and doing so works there."""
    pod = kubernetes_pod(tmp_path, token_mounted=False, JOB_COMPLETION_INDEX="0")
    result = run(tmp_path / "run", *ONE_STEP, env=pod)
    message = (
        "error: cannot tell whether this process is part of a K8sCluster cluster: ConfigException: Service token "
        "file does not exist.; to run this process on its own, pass --coordinator_address=127.0.0.1:PORT "
        "--num_processes=1 --process_id=0"
    )
    assert_one_line_error(result, tmp_path / "run", message)

    alone = ("--coordinator_address=127.0.0.1:1", "--num_processes=1", "--process_id=0")
    result = run(tmp_path / "run", "--config.mask_ratio=1.0", *alone, env=pod)
    assert "--num_processes=1: single process" in result.stderr and "JAX process 0 of 1" in result.stderr
    assert_one_line_error(result, tmp_path / "run", "error: mask_ratio=1.0 must be in [0, 1)")
