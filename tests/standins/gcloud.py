"""A stand-in for `gcloud compute tpus tpu-vm` that answers as gcloud does, so that launch/tpu_vm.sh can be tested
without a cloud project. Run as `python gcloud.py compute tpus tpu-vm VERB NAME [FLAGS]`.

State is in $GCLOUD_STANDIN_DIR:
- `state`: the VM's state (READY, PREEMPTED, ...); no file, no VM.
- `faults`: lines `VERB KIND`; a call of VERB takes the first line of its verb and fails that way: UNAVAILABLE (the
  API's 503) or CAPACITY (a create refused for a stock-out), or OK (answered as usual: orders the faults of a
  verb between its calls). gcloud exits 1 on any error.
- `outcomes`: one line per run of `mae_jax.main`: its exit status, or `preempt` (the VM is PREEMPTED and the ssh
  session drops: ssh's 255).
- written here: `calls` (VERB and the last argument of each call), `runs`, `status` (worker 0's status file).

The error texts are gcloud's, as reported in public logs: `ERROR: (gcloud.compute.tpus.tpu-vm.VERB) STATUS:
message` with a ResourceInfo detail for NOT_FOUND and ALREADY_EXISTS, and for a stock-out the failed operation's
JSON (code 8) after the progress lines (PerfKitBenchmarker's gcp_tpu test, skypilot's TPU error handling). The
UNAVAILABLE text follows the same `STATUS: message` form.
"""

from __future__ import annotations

import os
import pathlib
import sys

STATE = pathlib.Path(os.environ["GCLOUD_STANDIN_DIR"])


def flag(args: list[str], name: str, default: str) -> str:
    return next((arg.split("=", 1)[1] for arg in args if arg.startswith(f"--{name}=")), default)


def take_fault(verb: str) -> str | None:
    faults = STATE / "faults"
    lines = faults.read_text().splitlines() if faults.exists() else []
    for index, line in enumerate(lines):
        fault_verb, kind = line.split()
        if fault_verb == verb:
            faults.write_text("".join(f"{kept}\n" for kept in lines[:index] + lines[index + 1 :]))
            return kind
    return None


def fail(verb: str, message: str) -> int:
    print(f"ERROR: (gcloud.compute.tpus.tpu-vm.{verb}) {message}", file=sys.stderr)
    return 1


def create(args: list[str], name: str, resource: str, exists: bool, fault: str | None) -> int:
    if exists:
        return fail("create", f"ALREADY_EXISTS: Resource '{resource}' already exists{resource_detail(resource)}")
    zone = flag(args, "zone", "")
    print(f"Create request issued for: [{name}]", file=sys.stderr)
    operation = f"projects/my-project/locations/{zone}/operations/operation-1"
    if fault == "CAPACITY":
        print(f"Waiting for operation [{operation}] to complete...failed.", file=sys.stderr)
        message = (
            f'There is no more capacity in the zone \\"{zone}\\"; you can try in another zone where Cloud TPU '
            "Nodes are offered (see https://cloud.google.com/tpu/docs/regions) [EID: 0x9f48947a7d57c8d]"
        )
        return fail("create", f'{{\n  "code": 8,\n  "message": "{message}"\n}}')
    print(f"Waiting for operation [{operation}] to complete...done.", file=sys.stderr)
    (STATE / "state").write_text("READY\n")
    return 0


def on_existing_vm(verb: str, args: list[str], state: str) -> int:
    if verb == "describe":
        print(state)
    elif verb == "start":
        (STATE / "state").write_text("READY\n")
    elif verb == "delete":
        (STATE / "state").unlink()
    elif verb == "ssh" and "--worker=0" in args:  # `cat ~/.mae_jax_status`: fails when the run wrote none
        status = STATE / "status"
        if not status.exists():
            return 1
        print(status.read_text().strip())
    elif verb == "ssh" and "mae_jax.main" in args[-1]:
        with open(STATE / "runs", "a") as runs:
            runs.write("x\n")
        run = len((STATE / "runs").read_text().splitlines())
        outcome = (STATE / "outcomes").read_text().splitlines()[run - 1]
        (STATE / "status").unlink(missing_ok=True)
        if outcome == "preempt":
            (STATE / "state").write_text("PREEMPTED\n")
            return 255
        (STATE / "status").write_text(f"{outcome}\n")
        return int(outcome)
    return 0


def resource_detail(resource: str) -> str:
    return f"\n- '@type': type.googleapis.com/google.rpc.ResourceInfo\n  resourceName: {resource}"


def main(argv: list[str]) -> int:
    assert argv[:3] == ["compute", "tpus", "tpu-vm"], argv
    verb, args = argv[3], argv[4:]
    with open(STATE / "calls", "a") as calls:
        calls.write(f"{verb} {args[-1]}\n")
    name = args[1].split(":")[0] if verb == "scp" else args[0]
    resource = f"projects/{flag(args, 'project', 'my-project')}/locations/{flag(args, 'zone', '')}/nodes/{name}"
    state_file = STATE / "state"
    state = state_file.read_text().strip() if state_file.exists() else None
    fault = take_fault(verb)
    if fault == "UNAVAILABLE":
        return fail(verb, "UNAVAILABLE: The service is currently unavailable.")
    if verb == "create":
        return create(args, name, resource, state is not None, fault)
    if state is None:
        return fail(verb, f"NOT_FOUND: Resource '{resource}' was not found{resource_detail(resource)}")
    return on_existing_vm(verb, args, state)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
