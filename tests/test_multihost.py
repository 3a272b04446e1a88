"""Two processes joined by `jax.distributed` on 127.0.0.1 train like one process with the same global batch.

Each process has 2 fake CPU devices; the 4 form a data x fsdp = 2 x 2 mesh, so parameters and Adam
moments are split across processes too, and each process feeds only its rows of the global batch. Then
both run the real training loop on the demo photographs: only process 0 writes summaries and images.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

from ml_collections import ConfigDict

from tests.conftest import REPO, tiny_train_config
from tests.test_sharding import assert_same_training, eight_device_results, run_steps

STEPS = 3


def worker(process_id: int, port: int, out: pathlib.Path) -> None:
    import jax

    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 4 and jax.local_device_count() == 2

    from mae_jax import sharding, train

    trained = run_steps(sharding.make_mesh(ConfigDict({"data": 2, "fsdp": 2})))
    if process_id == 0:
        (out / "two_processes.json").write_text(json.dumps({k: trained[k] for k in ("losses", "params")}))

    config = tiny_train_config(total_steps=STEPS, **{"mesh.fsdp": 2})  # the demo photographs
    assert int(train.train_and_evaluate(config, str(out / "workdir")).step) == STEPS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path: pathlib.Path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, __file__, str(free_port()), str(tmp_path)]
    procs = [
        subprocess.Popen([*command, str(i)], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)
    ]
    try:  # a peer that never shows up makes the other abort, or hang: the timeout bounds the test
        outputs = [proc.communicate(timeout=300)[0].decode() for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for i, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {i}:\n{output[-4000:]}"

    one_device = eight_device_results()["single"]  # the same steps on one device, computed for test_sharding
    assert_same_training(json.loads((tmp_path / "two_processes.json").read_text()), one_device)

    workdir = tmp_path / "workdir"
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 1  # process 1 only logs
    assert (workdir / "reconstruction.png").is_file()
    assert (workdir / "checkpoints" / str(STEPS)).is_dir()


if __name__ == "__main__":
    worker(int(sys.argv[3]), int(sys.argv[1]), pathlib.Path(sys.argv[2]))
