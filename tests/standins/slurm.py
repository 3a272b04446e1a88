"""Stand-ins for Slurm's `srun`, `scancel` and `scontrol` that deliver signals where Slurm 25.11 does, so that
launch/slurm.sbatch can be tested without a cluster. Run as `python slurm.py srun|scancel|scontrol ARGS`.

What each does, and where Slurm's source (tag slurm-25-11-0-1) says so:
- srun runs NODES x NTASKS_PER_NODE tasks, each in its own process group, like the step container that
  slurmstepd signals. A SIGTERM, SIGHUP or SIGQUIT that srun receives becomes SIGKILL for every task
  (src/srun/srun_job.c `_srun_signal_mgr`; src/srun/signals.c `_forward_signal` since); SIGUSR1/SIGUSR2 pass on
  unchanged. With --kill-on-bad-exit, the first task that ends other than with 0 makes srun signal the step with
  SIG_TERM_KILL: SIGCONT and SIGTERM, KillWait seconds, then SIGKILL (src/srun/launch.c `_task_finish`,
  src/slurmd/slurmstepd/req.c). srun exits with 128 + the highest signal that ended a task, else with the highest
  exit code (launch.c `_task_finish`, srun_job.c `fini_srun`).
- scancel --signal=SIG JOB (src/scancel/scancel.c `_init_flags`, src/slurmctld/job_mgr.c `_signal_job`,
  src/slurmd/slurmd/req.c `_kill_all_active_steps`): without --batch or --full it signals every task of the job's
  steps (KILL_STEPS_ONLY), never the batch script or srun. --batch signals the batch script's process alone,
  --full the batch script's whole process group, which holds srun (slurmstepd/req.c: `kill` or `killpg` of the
  batch step's pgid). A time-limit warning (`--signal`) is the same request: with `B:` it is --batch, without it
  steps only (job_mgr.c `send_job_warn_signal`); so is a preemption's SIGTERM, steps only (interfaces/preempt.c).
- scontrol requeue JOB is recorded in scontrol.log; the job's end that follows it in Slurm is not emulated.

State is in $SLURM_STANDIN_DIR: `batch.pid`, written by the test (the batch script runs as the leader of its own
process group, as slurmstepd starts it), and `tasks`, the process groups of the running tasks. KillWait is
$SLURM_STANDIN_KILL_WAIT seconds (Slurm's default: 30).
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import threading

STATE = pathlib.Path(os.environ["SLURM_STANDIN_DIR"])
KILLED_BY_SRUN_SIGNAL = {signal.SIGTERM: signal.SIGKILL, signal.SIGHUP: signal.SIGKILL, signal.SIGQUIT: signal.SIGKILL}
PASSED_ON = (signal.SIGUSR1, signal.SIGUSR2)


def record_tasks(pids: set[int]) -> None:
    """Publish the running tasks' process groups for scancel (replaced whole, never half written)."""
    staging = STATE / "tasks.tmp"
    staging.write_text("".join(f"{pid}\n" for pid in sorted(pids)))
    staging.replace(STATE / "tasks")


def signal_groups(pids: set[int] | list[int], signum: int) -> None:
    for pid in list(pids):
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            pass


def spawn(command: list[str], env: dict[str, str], go: int) -> int:
    """Fork a task in its own process group (a step's container); it starts once `go` has a byte for it."""
    pid = os.fork()
    if pid == 0:
        os.setsid()
        try:
            os.read(go, 1)  # scancel must find every running task: wait until srun has published them
            os.execvpe(command[0], command, env)
        finally:
            os._exit(127)
    return pid


def srun(args: list[str]) -> int:
    nodes, tasks_per_node, kill_on_bad_exit = 1, 1, False
    while args and args[0].startswith("-"):
        option = args.pop(0)
        name, _, value = option.partition("=")
        if name in ("--nodes", "-N"):
            nodes = int(value)
        elif name == "--ntasks-per-node":
            tasks_per_node = int(value)
        elif name in ("--kill-on-bad-exit", "-K"):
            kill_on_bad_exit = value != "0"
        else:
            print(f"srun stand-in: option {option} is not emulated", file=sys.stderr)
            return 1
    num_tasks = nodes * tasks_per_node
    running: set[int] = set()
    go, start = os.pipe()
    for rank in range(num_tasks):
        env = os.environ | {
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank % tasks_per_node),
            "SLURM_NODEID": str(rank // tasks_per_node),
            "SLURM_NTASKS": str(num_tasks),
        }
        running.add(spawn(args, env, go))
    record_tasks(running)
    os.write(start, b"x" * num_tasks)
    os.close(go)
    os.close(start)
    for signum, sent in KILLED_BY_SRUN_SIGNAL.items():
        signal.signal(signum, lambda *_, sent=sent: signal_groups(running, sent))
    for signum in PASSED_ON:
        signal.signal(signum, lambda signum, _: signal_groups(running, signum))

    exit_codes, end_signals, terminating = [0], [], False
    while running:
        pid, status = os.waitpid(-1, 0)
        running.discard(pid)
        record_tasks(running)
        if os.WIFSIGNALED(status):
            end_signals.append(os.WTERMSIG(status))
        else:
            exit_codes.append(os.WEXITSTATUS(status))
        if kill_on_bad_exit and status != 0 and not terminating and running:
            terminating = True  # SIG_TERM_KILL to the step
            signal_groups(running, signal.SIGCONT)
            signal_groups(running, signal.SIGTERM)
            kill_wait = float(os.environ.get("SLURM_STANDIN_KILL_WAIT", "30"))
            killer = threading.Timer(kill_wait, signal_groups, (running, signal.SIGKILL))
            killer.daemon = True  # srun does not wait for it once every task has ended
            killer.start()
    return 128 + max(end_signals) if end_signals else max(exit_codes)


def check_job(job: str) -> None:
    if job != os.environ["SLURM_JOB_ID"]:
        sys.exit(f"stand-in: no job {job} (this job is {os.environ['SLURM_JOB_ID']})")


def scancel(args: list[str]) -> int:
    signame, scope, jobs = None, "steps", []
    while args:
        arg = args.pop(0)
        if arg.startswith("--signal="):
            signame = arg.split("=", 1)[1]
        elif arg == "-s":
            signame = args.pop(0)
        elif arg in ("--batch", "-b"):
            scope = "batch"
        elif arg in ("--full", "-f"):
            scope = "full"
        elif arg.startswith("-"):
            sys.exit(f"scancel stand-in: option {arg} is not emulated")
        else:
            jobs.append(arg)
    if signame is None:
        sys.exit("scancel stand-in: cancelling a job (no --signal) is not emulated")
    for job in jobs:
        check_job(job)
    signum = int(signame) if signame.isdigit() else signal.Signals["SIG" + signame.removeprefix("SIG")]
    batch = int((STATE / "batch.pid").read_text())
    if scope == "full":
        os.killpg(batch, signum)
    elif scope == "batch":
        os.kill(batch, signum)
    else:
        tasks = STATE / "tasks"
        signal_groups([int(pid) for pid in tasks.read_text().split()] if tasks.exists() else [], signum)
    return 0


def scontrol(args: list[str]) -> int:
    if len(args) != 2 or args[0] != "requeue":
        sys.exit(f"scontrol stand-in: {' '.join(args)} is not emulated")
    check_job(args[1])
    with open(STATE / "scontrol.log", "a") as log:
        log.write(" ".join(args) + "\n")
    return 0


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    sys.exit({"srun": srun, "scancel": scancel, "scontrol": scontrol}[command](arguments))
