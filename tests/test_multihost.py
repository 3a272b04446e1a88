"""Two processes joined by `jax.distributed` on 127.0.0.1 train like one process with the same global batch.

Each process has 2 fake CPU devices; the 4 form a data x fsdp = 2 x 2 mesh, so parameters and Adam
moments are split across processes too, and each process feeds only its rows of the global batch. Then
both run the real training loop on an image folder (JPEGs of varied sizes, two corrupt files), next to
one process with 4 devices running the same config: the global data stream, and so every step's loss and
gradient norm and the final parameters, must not depend on the number of processes; and the two
processes' checkpoint resumes in one process (another host count) as the uninterrupted run continues.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from tests.conftest import REPO, tiny_train_config
from tests.test_sharding import assert_same_params, assert_same_training, eight_device_results, run_steps

STEPS = 4
RESUME_FROM = 2  # a checkpoint of the two processes, resumed by one
FINETUNE_MARKER = "--- fine-tuning ---"  # in the two processes' log, after the pretraining run


def folder_config(data_dir: pathlib.Path, **overrides) -> ConfigDict:
    """The tiny config on the image folder: 4 steps of 8 images cross the first epoch (18 readable images)."""
    return tiny_train_config(
        total_steps=STEPS, log_every_steps=1, checkpoint_every_steps=RESUME_FROM,
        **{"dataset.source": "folder", "dataset.data_dir": str(data_dir), "mesh.fsdp": 2, **overrides},
    )  # fmt: skip


def write_image_folder(root: pathlib.Path) -> None:
    """train/<class>/ with 18 JPEGs of varied sizes and two files that do not decode."""
    rng = np.random.default_rng(0)
    for i in range(18):
        folder = root / "train" / f"n0{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        height, width = rng.integers(24, 100, 2)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
        (folder / f"{i}.JPEG").write_bytes(buffer.getvalue())
    (root / "train" / "n00" / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "train" / "n01" / "truncated.JPEG").write_bytes((root / "train" / "n01" / "1.JPEG").read_bytes()[:80])


def final_params(state) -> dict[str, np.ndarray]:
    """The trained parameters by path, gathered from every process."""
    import jax
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(state.params, tiled=True)
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(gathered)}


def worker(process_id: int | None, port: int, out: pathlib.Path) -> None:
    """Process `process_id` of two (the mesh test, then the folder run), or with None one process of 4 devices."""
    import jax
    from absl import logging

    logging.set_verbosity(logging.INFO)  # the loop's summaries, which the tests read from the log
    if process_id is not None:
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 4 and jax.local_device_count() == (2 if process_id is not None else 4)

    from mae_jax import sharding, train

    if process_id is not None:
        trained = run_steps(sharding.make_mesh(ConfigDict({"data": 2, "fsdp": 2})))
        if process_id == 0:
            (out / "two_processes.json").write_text(json.dumps({k: trained[k] for k in ("losses", "params")}))
    name = "two_processes" if process_id is not None else "one_process"
    state = train.train_and_evaluate(folder_config(out), str(out / name))
    assert int(state.step) == STEPS
    params = final_params(state)
    if jax.process_index() == 0:
        np.savez(out / f"{name}.npz", **params)
    if process_id is not None:  # fine-tuning with every kernel split over both processes, to its export
        from mae_jax import finetune

        print(FINETUNE_MARKER, flush=True)
        finetune.train_and_evaluate(finetune_config(out), str(out / "finetune"))


def finetune_config(data_dir: pathlib.Path) -> ConfigDict:
    """A 2-step fine-tuning on the folder's 2 classes; mesh.fsdp=4 splits its kernels over both processes."""
    from tests.conftest import tiny_downstream_config

    overrides = {
        "dataset.source": "folder", "dataset.data_dir": str(data_dir), "evals.classification.split": "train",
        "num_classes": 2, "mesh.fsdp": 4, "mesh.data": 1,
    }  # fmt: skip
    return tiny_downstream_config("finetune", **overrides)


def logged_metrics(log: str) -> dict[int, dict[str, float]]:
    """Step -> {"loss", "grad_norm"} from the summaries the loop logs (clu's LoggingWriter, 6 digits)."""
    metrics = {}
    for step, values in re.findall(r"\[(\d+)\] (.*\bgrad_norm=.*)", log):
        pairs = dict(pair.split("=", 1) for pair in values.split(", "))
        metrics[int(step)] = {key: float(pairs[key]) for key in ("loss", "grad_norm")}
    return metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two processes of 2 devices and, at the same time, one process of 4 devices, on the same image folder."""
    out = tmp_path_factory.mktemp("multihost")
    write_image_folder(out)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, __file__, str(free_port()), str(out)]
    two = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    four = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [
        subprocess.Popen([*command, arg], env=devices, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for arg, devices in (("0", two), ("1", two), ("single", four))
    ]
    try:  # a peer that never shows up makes the other abort, or hang: the timeout bounds the test
        logs = [proc.communicate(timeout=300)[0].decode() for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for name, proc, log in zip(("process 0", "process 1", "one process"), procs, logs, strict=True):
        assert proc.returncode == 0, f"{name}:\n{log[-4000:]}"
    pretraining_log = logs[0].partition(FINETUNE_MARKER)[0]  # its summaries, not the fine-tuning's after them
    return {"out": out, "two_processes_log": pretraining_log, "one_process_log": logs[2]}


def test_two_processes_train_like_one(runs: dict):
    out = runs["out"]
    one_device = eight_device_results()["single"]  # the same steps on one device, computed for test_sharding
    assert_same_training(json.loads((out / "two_processes.json").read_text()), one_device)

    workdir = out / "two_processes"
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 1  # process 1 only logs
    assert (workdir / "reconstruction.png").is_file()
    assert (workdir / "checkpoints" / str(STEPS)).is_dir()


def test_fine_tuning_split_over_two_processes_exports_its_classifier(runs: dict):
    """The export gathers the kernels from both processes: process 0 alone holds half of each."""
    from flax import nnx
    from safetensors.numpy import load_file

    from mae_jax import convert, finetune
    from mae_jax.models.classifier import Classifier

    exported = load_file(runs["out"] / "finetune" / finetune.CLASSIFIER_FILE)
    model_config = finetune.classifier_config(finetune_config(runs["out"]))
    expected = convert.classifier_to_official(nnx.state(Classifier(model_config, rngs=nnx.Rngs(0))))
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in expected.items()}


def test_two_processes_read_the_data_stream_of_one(runs: dict):
    """Every step's loss and gradient norm (a gradient scaled by the host count hides behind Adam's
    parameters, not behind its norm), and the final parameters, equal those of one process."""
    two, one = logged_metrics(runs["two_processes_log"]), logged_metrics(runs["one_process_log"])
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        for key in ("loss", "grad_norm"):
            assert two[step][key] == pytest.approx(one[step][key], rel=2e-5), (step, key, two[step], one[step])
    assert "Skipping unreadable image" in runs["one_process_log"]  # the stream crossed the corrupt files
    two_params, one_params = np.load(runs["out"] / "two_processes.npz"), np.load(runs["out"] / "one_process.npz")
    assert_same_params(dict(two_params), dict(one_params), rtol=1e-4, atol=1e-5)


def test_checkpoint_of_two_processes_resumes_on_one(runs: dict, tmp_path: pathlib.Path):
    """The two processes' step-2 checkpoint, resumed by this process (one device), ends where the
    uninterrupted run of one process ends."""
    from mae_jax import train

    workdir = tmp_path / "resumed"
    shutil.copytree(runs["out"] / "two_processes" / "checkpoints", workdir / "checkpoints")
    for step in range(RESUME_FROM + 1, STEPS + 1):
        shutil.rmtree(workdir / "checkpoints" / str(step), ignore_errors=True)
    state = train.train_and_evaluate(folder_config(runs["out"], **{"mesh.fsdp": 1}), str(workdir))
    assert int(state.step) == STEPS
    uninterrupted = dict(np.load(runs["out"] / "one_process.npz"))
    assert_same_params(final_params(state), uninterrupted, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    worker(None if sys.argv[3] == "single" else int(sys.argv[3]), int(sys.argv[1]), pathlib.Path(sys.argv[2]))
