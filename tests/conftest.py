"""Shared tiny models and configs: CPU compiles are the slow part, so tests reuse them."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

# The suite runs on the CPU. Set before jax is imported: with libtpu installed (the test extra, to compile for TPU
# slices) every process would otherwise look for a TPU first and print libtpu's warnings into the output tests read.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest
from flax import nnx

from mae_jax.models.mae import MAE, MAEConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = MAEConfig.from_variant("mu/8", 32, decoder_width=32, decoder_depth=1, decoder_heads=2)


@pytest.fixture(scope="session")
def tiny_model() -> MAE:
    return MAE(TINY, rngs=nnx.Rngs(0))


def tiny_train_config(**overrides):
    """The demo config shrunk to a few seconds per compile; overrides are dotted keys."""
    from configs import demo

    config = demo.get_config()
    config.image_size = 32
    config.model.decoder_width = 32
    config.model.decoder_depth = 1
    config.model.decoder_heads = 2
    config.batch_size = 8
    config.total_steps = 2
    config.warmup_steps = 1
    config.evals.reconstruction.num_images = 2
    config.input.num_threads = 2
    config.input.resize_on_device = True  # the default for accelerators, unlike the demo's
    return with_overrides(config, overrides)


def tiny_downstream_config(task: str, **overrides):
    """A 2-step fine-tuning ("finetune") or linear probing ("linprobe") of `TINY`'s encoder on mocked ImageNet
    (run it under `tfds.testing.mock_data`); overrides are dotted keys, e.g. {"dataset.source": "folder"}."""
    from mae_jax import configuration

    config = configuration.downstream_config(task)
    config.dataset.name = "imagenet2012"
    config.image_size = TINY.encoder.image_size
    config.model.variant = f"mu/{TINY.encoder.patch_size}"
    config.batch_size = 8
    config.evals.classification.batch_size = 8
    config.total_steps = 2
    config.warmup_steps = 1
    config.input.num_threads = 2
    return with_overrides(config, overrides)


def with_overrides(config, overrides: dict):
    """`config` with dotted keys set, e.g. {"dataset.source": "tfds"}."""
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


# `python -m mae_jax.main` overrides that shrink the demo as `tiny_train_config` does.
TINY_MAIN_FLAGS = (
    "--config.image_size=32",
    "--config.model.decoder_width=32",
    "--config.model.decoder_depth=1",
    "--config.model.decoder_heads=2",
    "--config.batch_size=8",
    "--config.evals.reconstruction.num_images=2",
    "--config.input.num_threads=2",
)


def main_command(workdir: pathlib.Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "mae_jax.main", "--config=configs/demo.py", f"--workdir={workdir}", *overrides]


def run_main(workdir: pathlib.Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        main_command(workdir, *overrides), cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )


def run_on_eight_devices(script: str) -> dict:
    """The JSON that `script` (a test module run as a program) prints last, run on 8 forced host devices: the
    multi-device checks need the flag before JAX starts, so in a process of their own."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, script], env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
