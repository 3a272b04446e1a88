"""Every config file loads and validates; each bad value is one clear error before compiling."""

from __future__ import annotations

import importlib
import os
import pathlib
import subprocess

import jax
import pytest

from mae_jax import configuration
from mae_jax.configuration import ConfigError
from tests.conftest import REPO, main_command


@pytest.mark.parametrize(
    ("name", "variant", "params"),
    [("vit_base", "B/16", 111_907_840), ("vit_large", "L/16", 329_541_888), ("vit_huge", "H/14", 657_074_508)],
)
def test_paper_configs(name: str, variant: str, params: int):
    from mae_jax.models.mae import abstract_model_state

    config = importlib.import_module(f"configs.{name}").get_config()
    configuration.validate(config)
    assert config.model.variant == variant and config.batch_size == 4096 and config.base_lr == 1.5e-4
    assert (config.b1, config.b2, config.weight_decay, config.mask_ratio) == (0.9, 0.95, 0.05, 0.75)
    state = abstract_model_state(configuration.model_config(config))
    assert sum(x.size for x in jax.tree.leaves(state)) == params


def test_demo_config_is_valid():
    configuration.validate(importlib.import_module("configs.demo").get_config())


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("image_size", 100, "image_size=100 is not divisible by the patch size 16"),
        ("mask_ratio", 1.0, r"mask_ratio=1.0 must be in \[0, 1\)"),
        ("mask_ratio", -0.1, r"mask_ratio=-0.1 must be in \[0, 1\)"),
        ("seed", -1, "seed=-1 must be >= 0"),
        ("batch_size", 12, "batch_size=12 is not a positive multiple of the 8 devices"),
        ("model.variant", "Q/16", "model.variant='Q/16' is not NAME/PATCH"),
        ("model.decoder_heads", 5, "model.decoder_width=512 must be divisible by 4 and by model.decoder_heads=5"),
        ("total_steps", 0, "set num_epochs > 0 or total_steps > 0"),
        ("log_every_steps", 0, "log_every_steps=0 must be >= 1"),
    ],
)
def test_each_bad_value_is_one_clear_error(monkeypatch, key: str, value, message: str):
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    config = configuration.base_config()
    if key == "total_steps":
        config.num_epochs = 0
    *parents, leaf = key.split(".")
    target = config
    for parent in parents:
        target = target[parent]
    target[leaf] = value
    with pytest.raises(ConfigError, match=message) as error:
        configuration.validate(config)
    assert "\n" not in str(error.value)


def test_unknown_keys_are_named():
    config = configuration.base_config()
    config.mask_ration = 0.8
    config.model.widht = 10
    with pytest.raises(ConfigError, match=r"unknown config keys \['mask_ration', 'model.widht'\]"):
        configuration.validate(config)


def test_unknown_dataset_source_is_one_line_through_main_before_compiling(tmp_path: pathlib.Path):
    # input_pipeline.make_source checks the name (configuration cannot import its table); JAX names every compile
    result = subprocess.run(
        main_command(tmp_path, "--config.dataset.source=s3"),
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False, env={**os.environ, "JAX_LOG_COMPILES": "1"},
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "error: dataset.source='s3' must be 'tfds', 'folder', 'fashion_mnist' or 'demo'", lines[-3:]
    assert not [line for line in lines if "Compiling" in line or "compilation" in line], result.stderr[-3000:]
