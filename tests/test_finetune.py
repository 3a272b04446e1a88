"""Fine-tuning and linear probing: initialisation, export, and runs on mocked tfds (the model: test_classifier.py)."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import tensorflow_datasets as tfds
import torch
from flax import nnx

from mae_jax import checkpointing, configuration, convert, finetune
from mae_jax.models.classifier import FINETUNE, LINPROBE, Classifier, ClassifierConfig
from mae_jax.models.mae import MAE
from mae_jax.models.vit import resize_position_table, sincos_2d
from tests.conftest import TINY, tiny_downstream_config

ENCODER = TINY.encoder  # mu/8 at 32 px, as the tiny MAE of conftest


@pytest.fixture(scope="module")
def exported_encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, nnx.State]:
    """The encoder of a (random) MAE, exported the way a pretraining run leaves it in WORKDIR/encoder, and its
    parameters and fixed sin-cos position table."""
    directory = tmp_path_factory.mktemp("pretrained") / "encoder"
    mae = MAE(TINY, rngs=nnx.Rngs(7))
    _, params, fixed = nnx.split(mae, nnx.Param, ...)
    checkpointing.export_encoder(directory, TINY, params, fixed, step=1)
    return directory, nnx.state(mae.encoder)


def pure(state) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


# ---------------------------------------------------------------------------------------------------
# Initialisation and export
# ---------------------------------------------------------------------------------------------------
def test_init_takes_the_pretrained_encoder_and_its_position_table(exported_encoder):
    directory, expected = exported_encoder
    model_config = finetune.classifier_config(tiny_downstream_config("finetune"))
    encoder = finetune.pretrained_encoder(str(directory), model_config)
    state = finetune.init_train_state(model_config, optax.sgd(0.1), 0, encoder)
    # The sin-cos table becomes a trained parameter, as in the official fine-tuning (timm's ViT).
    jax.tree.map(np.testing.assert_array_equal, pure(state.params["encoder"]), pure(expected))
    np.testing.assert_array_equal(state.params["encoder"]["pos_embed"][...], sincos_2d(ENCODER.width, 4)[None])
    probe_config = finetune.classifier_config(tiny_downstream_config("linprobe"))
    probe = finetune.init_train_state(probe_config, optax.sgd(0.1), 0, encoder)
    assert "encoder" not in probe.params  # the probe trains its head alone
    np.testing.assert_array_equal(probe.fixed["encoder"]["pos_embed"][...], sincos_2d(ENCODER.width, 4)[None])


def torch_interpolate_pos_embed(table: np.ndarray, grid: int) -> np.ndarray:
    """util/pos_embed.interpolate_pos_embed of the official code, on a (1, 1 + G*G, D) table."""
    checkpoint = torch.tensor(table)
    old_grid, width = round((table.shape[1] - 1) ** 0.5), table.shape[2]
    tokens = checkpoint[:, 1:].reshape(-1, old_grid, old_grid, width).permute(0, 3, 1, 2)
    tokens = torch.nn.functional.interpolate(tokens, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat((checkpoint[:, :1], tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1).numpy()


@pytest.mark.parametrize(("old_grid", "new_grid"), [(7, 11), (14, 9), (4, 6), (3, 2)])
def test_position_table_resampling_matches_torch_bicubic(old_grid: int, new_grid: int):
    table = np.random.default_rng(old_grid).normal(size=(1, 1 + old_grid**2, 8)).astype(np.float32)
    resized = resize_position_table(table, new_grid)
    expected = torch_interpolate_pos_embed(table, new_grid)
    assert resized.shape == expected.shape and resized.dtype == np.float32
    np.testing.assert_allclose(resized, expected, rtol=1e-5, atol=1e-5)
    # jax.image.resize's bicubic (a = -0.5) is another kernel: it would not do.
    grid = jnp.asarray(table[0, 1:].reshape(old_grid, old_grid, 8))
    jax_bicubic = jax.image.resize(grid, (new_grid, new_grid, 8), "bicubic", antialias=False)
    assert np.abs(np.asarray(jax_bicubic).reshape(-1, 8) - expected[0, 1:]).max() > 1e-3


def test_pretrained_position_table_is_resampled_for_another_image_size(exported_encoder):
    directory, expected = exported_encoder
    model_config = finetune.classifier_config(tiny_downstream_config("finetune", image_size=56))  # grid 4 -> 7
    encoder = finetune.pretrained_encoder(str(directory), model_config)
    table = np.asarray(expected["pos_embed"][...])
    np.testing.assert_allclose(encoder["pos_embed"][...], torch_interpolate_pos_embed(table, 7), atol=1e-5)
    np.testing.assert_array_equal(
        encoder["blocks"][1]["mlp"]["fc1"]["kernel"][...], expected["blocks"][1]["mlp"]["fc1"]["kernel"][...]
    )


def test_pretrained_encoder_of_another_shape_is_one_line_error(exported_encoder):
    directory, _ = exported_encoder
    model_config = finetune.classifier_config(tiny_downstream_config("finetune", **{"model.variant": "mu/4"}))
    with pytest.raises(configuration.ConfigError, match=r"patch 8; model.variant asks for .* patch 4$"):
        finetune.pretrained_encoder(str(directory), model_config)


def test_classifier_exports_to_the_official_layout():
    model = Classifier(ClassifierConfig(ENCODER, 10, protocol=FINETUNE, global_pool=True), rngs=nnx.Rngs(0))
    state_dict = convert.classifier_to_official(nnx.state(model))
    assert not any(key.startswith("norm.") for key in state_dict)  # fc_norm replaces norm, as in models_vit
    assert {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias", "blocks.1.attn.qkv.weight"} <= set(state_dict)
    np.testing.assert_array_equal(state_dict["head.weight"], np.asarray(model.head.kernel[...]).T)
    probe = Classifier(ClassifierConfig(ENCODER, 10, protocol=LINPROBE), rngs=nnx.Rngs(0))
    state_dict = convert.classifier_to_official(nnx.state(probe))
    assert {"norm.weight", "head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias"} <= set(
        state_dict
    )
    assert "head.weight" not in state_dict


# ---------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["finetune", "linprobe"])
def test_runs_a_few_steps_from_an_exported_encoder_on_mock_imagenet(tmp_path: pathlib.Path, exported_encoder, task):
    directory, expected = exported_encoder
    config = tiny_downstream_config(task, init=str(directory), **{"evals.classification.every_steps": 1})
    with tfds.testing.mock_data(num_examples=16):
        accuracy = finetune.train_and_evaluate(config, str(tmp_path))
    assert set(accuracy) == {"top1", "top5"} and 0 <= accuracy["top1"] <= accuracy["top5"] <= 100
    assert (tmp_path / "checkpoints" / "2").is_dir()
    state_dict = safetensors.numpy.load_file(tmp_path / finetune.CLASSIFIER_FILE)
    pth = torch.load(tmp_path / finetune.CLASSIFIER_PTH_FILE, weights_only=True)["model"]  # torch is installed
    assert sorted(pth) == sorted(state_dict)  # safetensors stores its keys sorted
    for key, value in pth.items():
        np.testing.assert_array_equal(value.numpy(), state_dict[key], err_msg=key)
    pretrained = convert.to_official({"encoder": pure(expected)}, encoder_only=True)
    for key in ("blocks.0.mlp.fc1.weight", "pos_embed"):  # the probe's encoder is frozen; fine-tuning trains it
        assert np.array_equal(state_dict[key], pretrained[key]) == (task == "linprobe"), key
    if task == "linprobe":
        assert np.abs(state_dict["head.0.running_var"] - 1).max() > 0  # statistics were collected


def test_downstream_config_errors_name_the_key():
    config = tiny_downstream_config("finetune", **{"dataset.source": "demo"})
    with pytest.raises(configuration.ConfigError, match="no labels"):
        configuration.validate(config)
    with pytest.raises(configuration.ConfigError, match="grad_accum_steps=2"):
        configuration.validate(tiny_downstream_config("finetune", grad_accum_steps=2))
    with pytest.raises(configuration.ConfigError, match="mask_ratio"):
        config = tiny_downstream_config("linprobe")
        config.mask_ratio = 0.75  # a pretraining key
        configuration.validate(config)


def test_an_unknown_training_crop_is_one_line_error():
    config = tiny_downstream_config("linprobe", **{"augment.crop": "centre"})
    with pytest.raises(
        configuration.ConfigError, match=r"^augment.crop='centre' must be one of \('random', 'center'\)$"
    ):
        configuration.validate(config)


@pytest.mark.parametrize("crop_scale", [(0.0, 1.0), (0.6, 0.5), (0.5, 1.5)])
def test_a_crop_scale_outside_the_image_is_one_line_error(crop_scale: tuple[float, float]):
    config = tiny_downstream_config("linprobe", **{"augment.crop_scale": crop_scale})
    message = rf"augment.crop_scale={re.escape(str(crop_scale))} must be \(low, high\) with 0 < low <= high <= 1$"
    with pytest.raises(configuration.ConfigError, match=message):
        configuration.validate(config)


def test_pretrained_encoder_of_another_channel_count_is_named(exported_encoder):
    directory, _ = exported_encoder
    model_config = finetune.classifier_config(tiny_downstream_config("finetune", num_channels=1))
    with pytest.raises(configuration.ConfigError, match=r"holds a ViT of 3 input channels; num_channels is 1$"):
        finetune.pretrained_encoder(str(directory), model_config)
