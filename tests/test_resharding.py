"""An FSDP checkpoint resumes on another mesh: written with kernels split 4 ways on 8 devices, continued on
4 devices (fsdp=2) and on 1, it trains on exactly as the uninterrupted 8-device run does.

Each run is the real train loop (`train.train_and_evaluate`, demo photographs) in its own process, since the
device count is fixed when JAX starts. The uninterrupted run saves step 2 of 4 on the way; a copy of its
workdir with the later checkpoints removed is what a run stopped after step 2 leaves, and it is resumed there.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp

from tests.conftest import REPO
from tests.test_sharding import assert_same_params

TOTAL_STEPS = 4
INTERRUPTED_AT = 2

# Runs `train_and_evaluate` on this process's devices with the given fsdp size, then writes the final
# parameters (npz) and, per parameter, the global and the first device's shard shape of the live state.
RUN_SCRIPT = """
import json, sys
import jax, numpy as np
from absl import logging
from mae_jax import train
from tests.conftest import tiny_train_config
workdir, fsdp, total_steps, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = tiny_train_config(
    total_steps=total_steps, checkpoint_every_steps=every, keep_checkpoints=10, **{"mesh.fsdp": fsdp}
)
logging.set_verbosity(logging.INFO)  # "Restored step ..."
state = train.train_and_evaluate(config, workdir)
leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
np.savez(f"{workdir}/final_params.npz", **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
print(json.dumps({
    "devices": jax.device_count(), "step": int(state.step),
    "shards": {jax.tree_util.keystr(p): [x.shape, x.addressable_shards[0].data.shape] for p, x in leaves},
}))
"""


def run(workdir: pathlib.Path, devices: int, fsdp: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    args = [str(workdir), str(fsdp), str(TOTAL_STEPS), str(INTERRUPTED_AT)]
    result = subprocess.run(
        [sys.executable, "-c", RUN_SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == devices and report["step"] == TOTAL_STEPS
    with np.load(workdir / "final_params.npz") as params:
        report["params"] = dict(params)
    report["log"] = result.stderr
    return report


def interrupted_copy(workdir: pathlib.Path, destination: pathlib.Path) -> pathlib.Path:
    """`workdir` as a run stopped right after saving step INTERRUPTED_AT would have left it."""
    shutil.copytree(workdir, destination)
    for checkpoint in (destination / "checkpoints").iterdir():
        if int(checkpoint.name) > INTERRUPTED_AT:
            shutil.rmtree(checkpoint)
    (destination / "final_params.npz").unlink()
    return destination


def saved_shard_shapes(workdir: pathlib.Path, step: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per saved parameter: (global shape, shape of one device's shard) from the checkpoint's own metadata."""
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(workdir / "checkpoints" / str(step) / "state").item_metadata
    shapes = {}
    for path, leaf in ocp.tree.to_flat_dict(dict(metadata["params"]), sep="/").items():
        spec = leaf.sharding  # the NamedSharding the array was written with
        sizes = dict(zip(spec.axis_names, spec.shape, strict=True))
        split = [
            np.prod([sizes[axis] for axis in ((part,) if isinstance(part, str) else part or ())])
            for part in (*spec.partition_spec, *[None] * (len(leaf.shape) - len(spec.partition_spec)))
        ]
        shapes[path] = (tuple(leaf.shape), tuple(int(n // s) for n, s in zip(leaf.shape, split, strict=True)))
    return shapes


def assert_kernels_split(shards: dict, ways: int) -> None:
    """Every kernel is split `ways` ways along one dimension; every other parameter is whole on each device."""
    kernels = [name for name in shards if "kernel" in name]
    assert len(kernels) == 15, kernels  # the tiny MAE's kernels
    for name, (shape, shard) in shards.items():
        expected = np.prod(shape) // ways if "kernel" in name else np.prod(shape)
        assert np.prod(shard) == expected, (name, shape, shard)


def test_fsdp_checkpoint_resumes_on_other_meshes_as_if_uninterrupted(tmp_path: pathlib.Path):
    uninterrupted = run(tmp_path / "fsdp4_8dev", devices=8, fsdp=4)
    assert_kernels_split(uninterrupted["shards"], ways=4)
    assert_kernels_split(saved_shard_shapes(tmp_path / "fsdp4_8dev", INTERRUPTED_AT), ways=4)

    for devices, fsdp in [(4, 2), (1, 1)]:
        workdir = interrupted_copy(tmp_path / "fsdp4_8dev", tmp_path / f"fsdp{fsdp}_{devices}dev")
        resumed = run(workdir, devices=devices, fsdp=fsdp)
        assert f"Restored step {INTERRUPTED_AT}" in resumed["log"]
        assert_kernels_split(resumed["shards"], ways=fsdp)
        # Other meshes only reduce in another order (measured: 1.5e-8 apart); one Adam step here moves a
        # parameter by up to the lr, ~5e-5.
        assert_same_params(resumed["params"], uninterrupted["params"], rtol=1e-5, atol=1e-6)
        print(f"{devices} devices, fsdp={fsdp}: resumed at step {INTERRUPTED_AT}, final params as uninterrupted")
