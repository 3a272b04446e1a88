"""Scanned blocks (`model.scan_blocks`): the same model as the unrolled blocks, in every place a model goes.

A seed gives the same values in both layouts (`vit.make_blocks` stacks the unrolled blocks), so every check
compares the scanned model with the unrolled one it stacks: loss and gradients (also with remat), the
classifier's logits and its per-layer drop-path rates, the optimizers' updates (layer-wise lr decay, decay
masks), training steps, checkpoints and their resume guard, exported encoders, the converter and FSDP on 8
fake devices (this file run as a script in a subprocess, as tests/test_sharding.py does). Parity with
transformers in the scanned layout: tests/test_parity.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from ml_collections import ConfigDict

from mae_jax import checkpointing, convert, finetune, optim, pretrained, sharding, train
from mae_jax.models.classifier import Classifier, ClassifierConfig
from mae_jax.models.mae import MAE
from mae_jax.models.vit import Compute, scanned_layout, unrolled_layout
from tests.conftest import TINY, run_on_eight_devices, tiny_downstream_config, tiny_train_config

SCANNED = dataclasses.replace(TINY, compute=Compute(scan_blocks=True))
TOLERANCE = 1e-6


def pure(state: nnx.State | dict) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state)


def assert_trees_close(actual, expected, atol: float = TOLERANCE) -> None:
    """Two trees (nnx.State or nested dicts) with the same paths and arrays within `atol`."""
    actual, expected = pure(actual), pure(expected)
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def with_compute(config, **compute):
    return dataclasses.replace(config, compute=dataclasses.replace(config.compute, **compute))


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------
def test_a_seed_gives_the_same_values_in_both_layouts():
    unrolled, scanned = nnx.state(MAE(TINY, rngs=nnx.Rngs(3))), nnx.state(MAE(SCANNED, rngs=nnx.Rngs(3)))
    stacked = scanned["encoder"]["blocks"]["attn"]["qkv"]["kernel"]
    assert stacked.shape == (TINY.encoder.depth, 64, 192) and isinstance(stacked, nnx.Param)
    assert scanned["decoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape == (TINY.decoder_depth, 32, 128)
    np.testing.assert_array_equal(stacked[1], unrolled["encoder"]["blocks"][1]["attn"]["qkv"]["kernel"][...])
    assert_trees_close(unrolled_layout(scanned), unrolled, atol=0)
    assert_trees_close(scanned_layout(unrolled), scanned, atol=0)
    assert_trees_close(unrolled_layout(unrolled), unrolled, atol=0)  # each leaves its own layout as it is


def loss_and_grads(config, images: np.ndarray, noise: np.ndarray) -> tuple[jax.Array, nnx.State]:
    graphdef, params, fixed = nnx.split(MAE(config, rngs=nnx.Rngs(5)), nnx.Param, ...)
    loss = lambda params: nnx.merge(graphdef, params, fixed)(images, noise=noise).loss  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_scanned_mae_has_the_unrolled_loss_and_gradients(remat):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, 32, 32, 3), np.float32)
    noise = rng.uniform(size=(4, TINY.encoder.num_patches)).astype(np.float32)
    loss, grads = loss_and_grads(TINY, images, noise)
    scanned_loss, scanned_grads = loss_and_grads(with_compute(SCANNED, remat=remat), images, noise)
    np.testing.assert_allclose(scanned_loss, loss, atol=TOLERANCE, rtol=0)
    assert_trees_close(unrolled_layout(scanned_grads), grads)


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_scanned_remat_recomputes_inside_the_scan(remat):
    """One scan per stack (encoder, decoder) each way; with remat the backward scans recompute their block
    (jax.checkpoint inside the scanned body), and the blocks stay one scan: compiled once, not per block."""
    config = with_compute(SCANNED, remat=remat)
    graphdef, params, fixed = nnx.split(MAE(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
    images, noise = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2, TINY.encoder.num_patches))
    loss = lambda params: nnx.merge(graphdef, params, fixed)(images, noise=noise).loss  # noqa: E731
    top = jax.make_jaxpr(jax.grad(loss))(params).jaxpr.eqns
    bodies = [{e.primitive.name for e in eqn.params["jaxpr"].eqns} for eqn in top if eqn.primitive.name == "scan"]
    assert len(bodies) == 4  # encoder and decoder, forward and backward
    assert sum("remat2" in body for body in bodies) == (2 if remat else 0)
    assert "remat2" not in {eqn.primitive.name for eqn in top}


def classifier_pair(drop_path: float) -> tuple[Classifier, Classifier]:
    config = ClassifierConfig(TINY.encoder, 10, drop_path=drop_path)
    return Classifier(config, rngs=nnx.Rngs(2)), Classifier(with_compute(config, scan_blocks=True), rngs=nnx.Rngs(2))


def test_scanned_classifier_has_the_unrolled_logits_and_gradients():
    """Drop path configured but off (no rngs), as at evaluation."""
    images = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32, 32, 3), np.float32))
    grads = []
    for model in classifier_pair(drop_path=0.2):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        logits = lambda params: nnx.merge(graphdef, params, rest)(images)  # noqa: E731,B023
        grads.append((logits(params), jax.grad(lambda params: jnp.sum(logits(params) ** 2))(params)))  # noqa: B023
    (logits, grad), (scanned_logits, scanned_grad) = grads
    np.testing.assert_allclose(scanned_logits, logits, atol=TOLERANCE, rtol=0)
    assert_trees_close(unrolled_layout(scanned_grad), grad)


def test_scanned_drop_path_has_each_layers_rate():
    """At drop_path 0.5 over 2 blocks the rates are (0, 0.5): the first block never drops, the second drops each
    residual branch of each sample (x 0) or keeps it scaled by 1 / (1 - 0.5) (x 2), as the unrolled blocks do."""
    unrolled, scanned = classifier_pair(drop_path=0.5)
    encoder = unrolled.encoder
    tokens = jax.random.normal(jax.random.key(0), (32, 4, TINY.encoder.width))
    encode = jax.jit(lambda tokens: scanned.encoder.encode(tokens, final_norm=False, rngs=nnx.Rngs(dropout=1)))
    dropped = np.asarray(encode(tokens))
    cls = jnp.broadcast_to(encoder.cls_token + encoder.pos_embed[:, :1], (32, 1, TINY.encoder.width))
    first = encoder.blocks[0](jnp.concatenate([cls, tokens], axis=1))  # rate 0: deterministic
    block = encoder.blocks[1]
    combinations = []
    for attn_scale in (0, 2):
        mid = first + attn_scale * block.attn(block.norm1(first))
        for mlp_scale in (0, 2):
            candidate = mid + mlp_scale * block.mlp(block.norm2(mid))
            combinations.append(np.all(np.isclose(dropped, candidate, atol=1e-5), axis=(1, 2)))
    matches = np.stack(combinations)  # (4 combinations, 32 samples)
    assert matches.any(axis=0).all()  # every sample is one of them
    assert (matches.sum(axis=1) > 0).sum() >= 3  # and they differ, branch by branch


# ---------------------------------------------------------------------------------------------------
# Optimizers: per-parameter rules see one layer's parameter in each slice of a stacked one
# ---------------------------------------------------------------------------------------------------
def test_layer_decay_scales_are_the_unrolled_ones_along_the_layer_axis():
    unrolled, scanned = (nnx.state(model, nnx.Param) for model in classifier_pair(drop_path=0.0))
    depth = TINY.encoder.depth
    scales = pure(optim.layer_scales(scanned, depth, 0.75))
    expected = pure(optim.layer_scales(unrolled, depth, 0.75))
    stacked = scales["encoder"]["blocks"]["attn"]["qkv"]["kernel"]
    assert stacked.shape == (depth, 1, 1) and stacked.dtype == np.float32
    for block in range(depth):
        for name, value in jax.tree_util.tree_leaves_with_path(expected["encoder"]["blocks"][block]):
            layer = jax.tree_util.tree_map(lambda x, block=block: x[block], scales["encoder"]["blocks"])
            np.testing.assert_array_equal(jax.tree.leaves(layer)[0].reshape(()), np.float32(value), err_msg=str(name))
    assert scales["head"]["kernel"] == expected["head"]["kernel"] == 1.0


@pytest.mark.parametrize("recipe", ["pretrain", "finetune"])
def test_optimizer_updates_scanned_params_as_unrolled_ones(recipe):
    """AdamW with weight decay on matrices only (stacked biases and norms are vectors per layer), and fine-tuning's
    layer-wise lr decay: two steps on stacked parameters are the stacked steps of the unrolled ones."""
    config = ConfigDict({"b1": 0.9, "b2": 0.999, "weight_decay": 0.05, "layer_decay": 0.75, "skip_nonfinite_steps": 0})
    schedule = lambda step: 1e-3  # noqa: E731
    if recipe == "pretrain":
        tx = optim.make_optimizer(config, schedule)
        unrolled, scanned = (nnx.state(MAE(c, rngs=nnx.Rngs(0)), nnx.Param) for c in (TINY, SCANNED))
    else:
        tx = optim.make_finetune_optimizer(config, schedule, TINY.encoder.depth)
        unrolled, scanned = (nnx.state(model, nnx.Param) for model in classifier_pair(drop_path=0.0))
    grads = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape), unrolled)

    def two_steps(params: nnx.State, grads: nnx.State) -> nnx.State:
        opt_state = tx.init(params)
        for _ in range(2):
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return params

    results = [two_steps(unrolled, grads), two_steps(scanned, scanned_layout(grads))]
    assert_trees_close(unrolled_layout(results[1]), results[0], atol=0)


# ---------------------------------------------------------------------------------------------------
# Stored parameters: always unrolled, loaded into either layout
# ---------------------------------------------------------------------------------------------------
def test_converter_round_trip_official_and_scanned():
    scanned, unrolled = nnx.state(MAE(SCANNED, rngs=nnx.Rngs(4))), nnx.state(MAE(TINY, rngs=nnx.Rngs(4)))
    official = convert.to_official(scanned)
    expected = convert.to_official(unrolled)
    assert list(official) == list(expected)  # the official keys, block by block, in the official order
    for key, value in expected.items():
        np.testing.assert_array_equal(official[key], value, err_msg=key)
    assert_trees_close(convert.from_official(official, SCANNED), scanned, atol=0)
    encoder_only = convert.to_official(scanned, encoder_only=True)
    back = convert.from_official(encoder_only, SCANNED, fresh_decoder=False)
    assert_trees_close(back, nnx.State({"encoder": scanned["encoder"]}), atol=0)
    hf = convert.hf.official_to_hf(official)  # transformers' names (and timm's, the official ones) follow
    np.testing.assert_array_equal(hf["vit.layers.1.attention.q_proj.weight"], expected["blocks.1.attn.qkv.weight"][:64])


def test_parameter_directory_of_a_scanned_model_is_unrolled(tmp_path: pathlib.Path):
    scanned = nnx.state(MAE(SCANNED, rngs=nnx.Rngs(6)))
    checkpointing.save_params(tmp_path / "params", SCANNED, scanned)
    assert not json.loads((tmp_path / "params" / checkpointing.MODEL_CONFIG_FILE).read_text())["compute"]["scan_blocks"]
    config, state = checkpointing.load_params(tmp_path / "params")
    assert config == TINY
    assert_trees_close(state, unrolled_layout(scanned), atol=0)
    encoder = checkpointing.load_encoder(tmp_path / "params")
    assert_trees_close(nnx.state(encoder), unrolled_layout(scanned["encoder"]), atol=0)


# ---------------------------------------------------------------------------------------------------
# Runs: training, resuming, exporting, fine-tuning from the export
# ---------------------------------------------------------------------------------------------------
RUN = {"total_steps": 4, "checkpoint_every_steps": 2, "log_every_steps": 100}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Workdirs and final states of the same tiny run (4 steps, checkpoints at 2 and 4), scanned and unrolled."""
    out = {}
    for layout, scan in (("scanned", True), ("unrolled", False)):
        workdir = tmp_path_factory.mktemp(layout)
        out[layout] = (
            workdir,
            train.train_and_evaluate(tiny_train_config(**RUN, **{"model.scan_blocks": scan}), workdir),
        )
    return out


def test_scanned_training_follows_the_unrolled_run(runs):
    (_, scanned), (_, unrolled) = runs["scanned"], runs["unrolled"]
    assert scanned.params["encoder"]["blocks"]["attn"]["qkv"]["kernel"].shape[0] == TINY.encoder.depth
    # 4 AdamW steps of lr ~2e-3 from the same init on the same batches; Adam's division by the gradient's size
    # carries reduction-order noise of nearly cancelling gradients into whole updates (see test_sharding.py)
    assert_trees_close(unrolled_layout(scanned.params), unrolled.params, atol=1e-4)


def test_scanned_run_resumes_from_its_checkpoint(runs, tmp_path: pathlib.Path):
    workdir, uninterrupted = runs["scanned"]
    shutil.copytree(workdir, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")  # as if the run died after step 2's save
    resumed = train.train_and_evaluate(tiny_train_config(**RUN, **{"model.scan_blocks": True}), tmp_path / "run")
    assert int(resumed.step) == 4
    assert_trees_close(resumed.params, uninterrupted.params, atol=0)


@pytest.mark.parametrize(("layout", "now"), [("scanned", False), ("unrolled", True)])
def test_resuming_in_the_other_layout_is_refused_in_one_line(runs, layout: str, now: bool):
    workdir, _ = runs[layout]
    before = sorted(str(p) for p in workdir.rglob("*"))
    with pytest.raises(checkpointing.CheckpointError) as error:
        train.train_and_evaluate(tiny_train_config(**RUN, **{"model.scan_blocks": now}), workdir)
    message = str(error.value)
    assert "\n" not in message and f"(model.scan_blocks: {not now!r} in the checkpoint, {now!r} now)" in message
    assert sorted(str(p) for p in workdir.rglob("*")) == before


@pytest.mark.parametrize("scan", [False, True], ids=["into_unrolled", "into_scanned"])
def test_encoder_exported_by_a_scanned_run_initialises_fine_tuning(runs, scan: bool):
    workdir, state = runs["scanned"]
    exported = unrolled_layout(nnx.merge_state(state.params, state.fixed)["encoder"])
    _, saved = checkpointing.load_params(workdir / train.ENCODER_DIR)
    assert_trees_close(saved["encoder"], exported, atol=0)
    config = finetune.classifier_config(tiny_downstream_config("finetune", **{"model.scan_blocks": scan}))
    encoder = finetune.pretrained_encoder(str(workdir / train.ENCODER_DIR), config)
    expected = nnx.to_pure_dict(nnx.filter_state(nnx.State(exported), nnx.Param))
    expected["pos_embed"] = exported["pos_embed"][...]  # fixed in pretraining, trained from there on
    assert_trees_close(encoder, scanned_layout(expected) if scan else expected, atol=0)
    _, from_workdir = pretrained.load(str(workdir))  # the newest checkpoint of a scanned run, unrolled
    assert_trees_close(from_workdir["encoder"], exported, atol=0)


# ---------------------------------------------------------------------------------------------------
# FSDP on 8 fake devices
# ---------------------------------------------------------------------------------------------------
def worker() -> None:
    from tests.test_sharding import run_steps

    assert jax.device_count() == 8
    scan = {"model.scan_blocks": True}
    results = {
        "single": run_steps(sharding.make_mesh(ConfigDict({"data": 1, "fsdp": 1}), jax.devices()[:1]), **scan),
        "fsdp": run_steps(sharding.make_mesh(ConfigDict({"data": 2, "fsdp": 4})), **scan),
    }
    print(json.dumps(results))


@functools.cache
def eight_device_results() -> dict:
    return run_on_eight_devices(__file__)


def test_fsdp_shards_stacked_kernels_within_each_layer_and_trains_as_one_device():
    from tests.test_sharding import assert_same_training, collectives

    results = eight_device_results()
    assert_same_training(results["fsdp"], results["single"])
    shard_shapes = results["fsdp"]["shard_shapes"]
    stacked = [name for name in shard_shapes if "['blocks']['" in name and "['kernel']" in name]
    assert len(stacked) == 3 * 8  # 4 kernels per stack (encoder, decoder): params, Adam mu and nu
    for name in stacked:
        (layers, rows, cols), (shard_layers, shard_rows, shard_cols) = shard_shapes[name]
        assert shard_layers == layers and shard_rows * shard_cols * 4 == rows * cols, name  # a quarter of each layer
    for name, (shape, shard) in shard_shapes.items():
        if "['kernel']" not in name:
            assert shape == shard, name  # stacked biases and norms too: replicated
    # The scan gathers one layer's kernel per step, never the stack, nor activations (see test_sharding.py).
    found = collectives(results["fsdp"]["hlo"])
    kernels = {tuple(shape) for name, (shape, _) in shard_shapes.items() if "['kernel']" in name}
    one_layer = {shape[1:] if len(shape) == 3 else shape for shape in kernels}
    one_layer |= {(int(np.prod(shape[:-1])), shape[-1]) for shape in kernels if len(shape) == 4}  # patch embedding
    assert found["all-gather"] and set(found["all-gather"]) <= one_layer, set(found["all-gather"]) - one_layer
    assert not found["all-to-all"] and not found["collective-permute"]


if __name__ == "__main__":
    worker()
