"""Command line: `python -m mae_jax.main --config=configs/vit_base.py --workdir=DIR [--config.key=value ...]`.

`config.task` picks the loop from the task table (`tasks.py`): "pretrain" (`train.py`), "finetune" or
"linprobe" (`finetune.py`).
"""

from __future__ import annotations

import logging as std_logging
import os
import socket
import sys
import time

import jax
import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from mae_jax import configuration, tasks
from mae_jax.checkpointing import CheckpointError
from mae_jax.configuration import ConfigError
from mae_jax.input_pipeline import DatasetNotFoundError
from mae_jax.loop import NonFiniteError, Preempted
from mae_jax.pretrained import PretrainedError

FLAGS = flags.FLAGS
COMPILATION_CACHE_DIR = "compilation_cache"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect of a terminated job; rerun to resume
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints and summaries.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vit_base.py.", lock_config=True)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs outside TPU/SLURM.")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
flags.DEFINE_integer("initialization_timeout", 300, "Seconds to wait for the other processes to join (JAX's default).")
flags.mark_flags_as_required(["config", "workdir"])
RUN_ALONE = "to run this process on its own, pass --coordinator_address=127.0.0.1:PORT --num_processes=1 --process_id=0"
KUBERNETES_CLUSTER = "K8sCluster"  # JAX's cluster class for Kubernetes Jobs
KUBERNETES_HOST = "KUBERNETES_SERVICE_HOST"  # set in every Kubernetes pod: what JAX's class checks first
KUBERNETES_JOB_INDEX = "JOB_COMPLETION_INDEX"  # set in the pods of an indexed Job: the process id JAX reads


class DistributedError(RuntimeError):
    """This process cannot join the others; the message is one line saying why."""


def cluster_name(cluster: type) -> str:
    """What a message calls one of JAX's cluster classes: its name, or its class name (Kubernetes' has no name)."""
    return cluster.name or cluster.__name__


def detected_cluster() -> type | None:
    """The cluster JAX's `jax.distributed.initialize()` would join (SLURM, Cloud TPU, Open MPI...), or None.

    Asked of JAX's own cluster classes (no public API tells), so that a cluster whose join fails is an
    error, never mistaken for a machine on its own. A check that raises is a `DistributedError`. JAX takes
    any Kubernetes pod with the `kubernetes` package for a cluster, yet joins only the pods of an indexed Job
    (or a JobSet's): a pod without its index (a notebook, a Deployment's pod) is a machine on its own.
    """
    from jax._src import clusters

    candidates = [cluster for cluster in clusters.ClusterEnv._cluster_types if not cluster.opt_in_only_method]
    if KUBERNETES_JOB_INDEX not in os.environ:
        if KUBERNETES_HOST in os.environ:
            logging.info("A Kubernetes pod outside an indexed Job (no %s): not a cluster", KUBERNETES_JOB_INDEX)
        candidates = [cluster for cluster in candidates if cluster.__name__ != KUBERNETES_CLUSTER]
    for cluster in candidates:
        try:
            if cluster.is_env_present():
                return cluster
        except Exception as error:  # a broken cluster setup must not pass for "no cluster", nor be a traceback
            message = " ".join(str(error).split())  # one line
            raise DistributedError(
                f"cannot tell whether this process is part of a {cluster_name(cluster)} cluster: "
                f"{type(error).__name__}: {message}; {RUN_ALONE}"
            ) from error
    return None


def cluster_coordinates(cluster: type, timeout: int) -> tuple[int, int, str]:
    """(process id, process count, coordinator host:port) as `jax.distributed.initialize()` reads them."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS") or cluster.get_coordinator_address(
        timeout_secs=timeout, override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT")
    )
    return cluster.get_process_id(), cluster.get_process_count(), address


def wait_for_coordinator(address: str, timeout: int) -> None:
    """Return once `address` (host:port) accepts connections. JAX aborts the process, with a C++ stack
    trace, when its client cannot reach the coordinator; this fails first, with a `TimeoutError`."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
            return
        except OSError as error:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the coordinator {address} did not accept a connection within {timeout} s ({error}); "
                    "is process 0 running, and is the address right?"
                ) from error
            time.sleep(0.2)


def initialize_distributed() -> None:
    """Join the other hosts: explicit flags, or JAX's own detection on TPU VMs, under SLURM and Open MPI.

    Incomplete flags, and a cluster that is detected but cannot be joined, are a `DistributedError`: a run
    that silently trains as "process 0 of 1" on every host would waste the whole allocation. Only where no
    cluster is detected, or `--num_processes=1` is given (then without `jax.distributed`, whose start probes
    every cluster type again), does the run go on as a single process, and the log says so.
    """
    explicit = {
        "--coordinator_address": FLAGS.coordinator_address,
        "--num_processes": FLAGS.num_processes,
        "--process_id": FLAGS.process_id,
    }
    given = [name for name, value in explicit.items() if value is not None]
    if given and len(given) < len(explicit):
        missing = [name for name in explicit if name not in given]
        raise DistributedError(
            f"{' and '.join(given)} without {' and '.join(missing)}: give all three for a multi-process run "
            "(none on TPU VMs and under SLURM, where JAX finds them)"
        )
    if given and (FLAGS.num_processes, FLAGS.process_id) == (1, 0):  # JAX would still probe every cluster type
        logging.info("--num_processes=1: single process")
        return
    cluster = None if given else detected_cluster()
    if not given and cluster is None:
        logging.info("No cluster (TPU VM, SLURM, Open MPI) detected and no --coordinator_address: single process")
        return
    where = (
        f"the {cluster_name(cluster)} cluster JAX detected"
        if cluster
        else f"the processes at {FLAGS.coordinator_address}"
    )
    timeout = FLAGS.initialization_timeout
    try:
        process_id, count, address = (
            cluster_coordinates(cluster, timeout)
            if cluster
            else (FLAGS.process_id, FLAGS.num_processes, FLAGS.coordinator_address)
        )
        if not 0 <= process_id < count:
            raise ValueError(f"process id {process_id} is not one of the {count} processes' ids 0-{count - 1}")
        if process_id != 0:
            wait_for_coordinator(address, timeout)
        jax.distributed.initialize(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, initialization_timeout=timeout
        )
    except Exception as error:  # whatever the cause, this process must not train alone
        message = " ".join(str(error).split())  # one line
        alone = f"; {RUN_ALONE}" if cluster else ""
        raise DistributedError(f"cannot join {where}: {type(error).__name__}: {message}{alone}") from error


def use_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Cache compiled programs in the workdir: a run restarted after a preemption, also on a new VM, loads its
    step instead of compiling it again. Only process 0 writes (JAX's rule); an already set cache is kept."""
    if config.compilation_cache and jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(epath.Path(workdir) / COMPILATION_CACHE_DIR))


class QuietOrbax(std_logging.Filter):
    """Orbax logs every step of every save at INFO; keep its warnings and errors only."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(QuietOrbax())
    try:
        initialize_distributed()
    except DistributedError as error:
        sys.exit(f"error: {error}")
    use_compilation_cache(FLAGS.config, FLAGS.workdir)
    logging.info("JAX process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())  # fmt: skip
    try:
        tasks.of(FLAGS.config).train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Preempted as preempted:
        logging.warning("%s", preempted)
        sys.exit(PREEMPTED_EXIT_CODE)
    except (ConfigError, DatasetNotFoundError, CheckpointError, PretrainedError, NonFiniteError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main, flags_parser=configuration.parse_flags)
