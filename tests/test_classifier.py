"""The classifier of fine-tuning and linear probing (`models/classifier.py`): its forward against the official
model built from transformers' ViTMAE encoder, the linear probe's BatchNorm head against PyTorch's, drop path and
the trained position table."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers  # setup.cfg's test extra: without it these tests fail (ImportError), never skip
from flax import nnx

from mae_jax import convert
from mae_jax.models.classifier import FINETUNE, LINPROBE, Classifier, ClassifierConfig
from mae_jax.models.mae import MAE, MAEConfig
from mae_jax.models.vit import drop_path
from tests.conftest import TINY, run_on_eight_devices

ENCODER = TINY.encoder  # mu/8 at 32 px, as the tiny MAE of conftest
HEADS = ("fc_norm.", "head.")  # the official names of what the classifier adds to the encoder


def pure(state) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


def perturbed_classifier(config: ClassifierConfig, seed: int) -> Classifier:
    """A classifier with norm scales, biases and the cls token moved off their init, a head whose logits are far
    above the tolerance, and a linear probe's running statistics away from 0 and 1."""
    rng = np.random.default_rng(seed)
    model = Classifier(config, rngs=nnx.Rngs(seed))

    def perturb(path, x):
        names = [key.key for key in path]
        if names[-1] == "scale":
            return x + 0.2 * rng.standard_normal(x.shape, np.float32)
        if names[-1] in ("bias", "cls_token"):
            return x + 0.1 * rng.standard_normal(x.shape, np.float32)
        if names == ["head", "kernel"]:  # logits of order 1, as the features
            return rng.standard_normal(x.shape, np.float32) / np.sqrt(x.shape[0], dtype=np.float32)
        return x

    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(perturb, nnx.to_pure_dict(params)))
    nnx.update(model, params)
    if config.protocol == LINPROBE:
        model.head_norm.mean[...] = 0.5 * rng.standard_normal(ENCODER.width, np.float32)
        model.head_norm.var[...] = rng.uniform(0.5, 2.0, ENCODER.width).astype(np.float32)
    return model


def official_forward(model: Classifier, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) of the official model holding `model`'s weights (`convert.classifier_to_official`):
    transformers' ViTMAE encoder keeping every patch, then `models_vit.VisionTransformer`'s pooling (global
    pool: mean of the patch tokens, `fc_norm`, the encoder's `norm` deleted; else the cls token after `norm`)
    and head, or `main_linprobe.py`'s BatchNorm1d(affine=False, eps=1e-6) + Linear head, in eval mode."""
    config = model.config
    state_dict = convert.classifier_to_official(nnx.state(model))
    encoder = {key: value for key, value in state_dict.items() if not key.startswith(HEADS)}
    hf = transformers.ViTMAEModel(convert.hf.transformers_config(MAEConfig(config.encoder), mask_ratio=0.0))
    if model.pools_tokens:
        hf.layernorm = torch.nn.Identity()
    hf_state = convert.hf.official_to_hf(encoder)
    hf.load_state_dict({key.removeprefix("vit."): torch.tensor(v) for key, v in hf_state.items()}, strict=True)

    official = torch.nn.Module()
    width = config.encoder.width
    if model.pools_tokens:
        official.fc_norm = torch.nn.LayerNorm(width, eps=1e-6)
    linear = torch.nn.Linear(width, config.num_classes)
    if config.protocol == LINPROBE:
        official.head = torch.nn.Sequential(torch.nn.BatchNorm1d(width, affine=False, eps=1e-6), linear)
    else:
        official.head = linear
    head = {key: torch.tensor(value) for key, value in state_dict.items() if key.startswith(HEADS)}
    loaded = official.load_state_dict(head, strict=False)
    assert not loaded.unexpected_keys and set(loaded.missing_keys) <= {"head.0.num_batches_tracked"}

    pixels = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2))
    in_order = torch.arange(config.encoder.num_patches, dtype=torch.float32).expand(len(images), -1)
    with torch.no_grad():
        tokens = hf.eval()(pixel_values=pixels, noise=in_order).last_hidden_state  # argsort(noise): every patch
        features = official.fc_norm(tokens[:, 1:].mean(dim=1)) if model.pools_tokens else tokens[:, 0]
        logits = official.eval().head(features)
    return features.numpy(), logits.numpy()


@pytest.mark.parametrize(
    ("protocol", "global_pool"),
    [(FINETUNE, True), (FINETUNE, False), (LINPROBE, False)],
    ids=["finetune_global_pool", "finetune_cls_token", "linprobe"],
)
def test_forward_matches_the_official_model(protocol: str, global_pool: bool):
    torch.manual_seed(0)
    model = perturbed_classifier(ClassifierConfig(ENCODER, 10, protocol=protocol, global_pool=global_pool), seed=3)
    images = np.random.default_rng(1).standard_normal((3, 32, 32, 3)).astype(np.float32)
    features, logits = official_forward(model, images)
    assert np.abs(logits).max() > 0.5  # far above the tolerance
    np.testing.assert_allclose(model.features(jnp.asarray(images)), features, atol=1e-5, rtol=0)
    np.testing.assert_allclose(model(jnp.asarray(images)), logits, atol=1e-5, rtol=0)


def test_linprobe_batch_norm_has_no_affine_parameters():
    model = Classifier(ClassifierConfig(ENCODER, 10, protocol=LINPROBE), rngs=nnx.Rngs(0))
    assert nnx.to_pure_dict(nnx.state(model.head_norm, nnx.Param)) == {}
    statistics = nnx.to_pure_dict(nnx.state(model.head_norm, nnx.BatchStat))  # checkpoints' layout: flax's
    assert {name: (x.shape, x.dtype) for name, x in statistics.items()} == {
        "mean": ((ENCODER.width,), jnp.float32),
        "var": ((ENCODER.width,), jnp.float32),
    }
    flax_batch_norm = nnx.BatchNorm(ENCODER.width, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))  # until 02822c5
    assert jax.tree.structure(nnx.state(model.head_norm)) == jax.tree.structure(nnx.state(flax_batch_norm))
    assert model.head_norm.epsilon == 1e-6
    assert not hasattr(model, "fc_norm")
    assert float(jnp.std(model.head.kernel[...])) == pytest.approx(0.01, rel=0.2)  # official head init


def test_linprobe_normalizes_with_batch_statistics_as_torch_batch_norm_and_freezes_the_encoder():
    model = Classifier(ClassifierConfig(ENCODER, 10, protocol=LINPROBE), rngs=nnx.Rngs(0))
    model.head.kernel[...] = jax.random.normal(jax.random.key(2), model.head.kernel.shape)  # logits ~ 8
    images = jax.random.normal(jax.random.key(1), (6, 32, 32, 3))
    features = torch.tensor(np.asarray(model.features(images)))
    official = torch.nn.BatchNorm1d(ENCODER.width, affine=False, eps=1e-6)  # main_linprobe.py's, momentum 0.1
    normalized = official.train()(features).detach().numpy()
    logits = model(images, train=True)
    np.testing.assert_allclose(logits, model.head(jnp.asarray(normalized)), atol=1e-4, rtol=0)
    # The running statistics moved 10 % of the way to the batch's, as PyTorch's do: the variance's unbiased.
    np.testing.assert_allclose(model.head_norm.mean[...], official.running_mean.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(model.head_norm.var[...], official.running_var.numpy(), atol=0, rtol=1e-5)

    def loss(model: Classifier) -> jax.Array:
        return model(images, train=True).sum()

    grads = nnx.grad(loss)(model)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(pure(grads)["encoder"]))
    assert float(jnp.abs(grads["head"]["kernel"][...]).max()) > 0


def test_linprobe_running_statistics_are_torch_batch_norms_over_several_updates():
    """main_linprobe.py's BatchNorm1d(affine=False, eps=1e-6): batches of different sizes and statistics move the
    running mean and the unbiased running variance; evaluation normalizes with them."""
    head_norm = Classifier(ClassifierConfig(ENCODER, 10, protocol=LINPROBE), rngs=nnx.Rngs(0)).head_norm
    official = torch.nn.BatchNorm1d(ENCODER.width, affine=False, eps=1e-6).train()  # momentum 0.1
    rng = np.random.default_rng(3)
    for rows, offset, scale in ((4, 2.0, 3.0), (7, -1.0, 0.5), (16, 0.5, 10.0), (2, 4.0, 1.0)):
        batch = (offset + scale * rng.standard_normal((rows, ENCODER.width))).astype(np.float32)
        expected = official(torch.from_numpy(batch)).numpy()
        np.testing.assert_allclose(head_norm(jnp.asarray(batch), use_running_average=False), expected, atol=2e-5)
        np.testing.assert_allclose(head_norm.mean[...], official.running_mean.numpy(), atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(head_norm.var[...], official.running_var.numpy(), atol=1e-6, rtol=1e-5)
    test = rng.standard_normal((5, ENCODER.width)).astype(np.float32)
    expected = official.eval()(torch.from_numpy(test)).numpy()
    np.testing.assert_allclose(head_norm(jnp.asarray(test), use_running_average=True), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"^BatchNorm needs more than 1 row per training batch, got 1 \(as torch's\)$"):
        head_norm(jnp.asarray(test[:1]), use_running_average=False)  # torch: "Expected more than 1 value per channel"


SHARDED_BATCH_NORM = """
import json
import jax
import numpy as np
from flax import nnx
from mae_jax.models.classifier import BATCH_NORM_MOMENTUM, TorchBatchNorm
from tests.conftest import TINY

head_norm = TorchBatchNorm(TINY.encoder.width, epsilon=1e-6, momentum=BATCH_NORM_MOMENTUM)  # a probe's head_norm
graphdef, state = nnx.split(head_norm)
mesh = jax.make_mesh((8,), ("data",))
rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
batch = np.random.default_rng(4).standard_normal((16, TINY.encoder.width)).astype(np.float32) * 3 + 1


@jax.jit
def update(state, x):
    model = nnx.merge(graphdef, state)
    model(x, use_running_average=False)
    return nnx.state(model)


sharded = jax.device_put(batch, rows)
assert len(sharded.addressable_shards) == 8 and sharded.addressable_shards[0].data.shape == (2, TINY.encoder.width)
state = update(state, sharded)
print(json.dumps({"batch": batch.tolist(), "var": np.asarray(state["var"][...]).tolist()}))
"""


def test_linprobe_running_variance_of_a_sharded_batch_is_the_global_batchs(tmp_path: pathlib.Path):
    """Rows split over 8 devices (2 each): the variance and its n / (n - 1) are the global batch's, n = 16."""
    script = tmp_path / "sharded_batch_norm.py"
    script.write_text(SHARDED_BATCH_NORM)
    result = run_on_eight_devices(str(script))
    official = torch.nn.BatchNorm1d(ENCODER.width, affine=False, eps=1e-6).train()
    official(torch.tensor(result["batch"]))
    np.testing.assert_allclose(result["var"], official.running_var.numpy(), atol=1e-6, rtol=1e-5)


def test_drop_path_rates_rise_with_depth_and_drop_whole_samples():
    encoder = Classifier(ClassifierConfig(ENCODER, 10, drop_path=0.5), rngs=nnx.Rngs(0)).encoder
    assert encoder.drop_path_rates == pytest.approx(np.linspace(0, 0.5, ENCODER.depth))
    plain = Classifier(ClassifierConfig(ENCODER, 10), rngs=nnx.Rngs(0)).encoder
    images = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
    np.testing.assert_array_equal(encoder(images), plain(images))  # no rngs: deterministic, as at evaluation
    block, x = encoder.blocks[-1], jax.random.normal(jax.random.key(2), (16, 5, ENCODER.width))
    out = block(x, nnx.Rngs(dropout=3), encoder.drop_path_rates[-1])
    # Rate 0.5: each sample drops each residual branch (x 0) or keeps it scaled by 1 / (1 - 0.5) (x 2).
    combinations = []
    for attn_scale in (0, 2):
        mid = x + attn_scale * block.attn(block.norm1(x))
        for mlp_scale in (0, 2):
            candidate = mid + mlp_scale * block.mlp(block.norm2(mid))
            combinations.append(np.all(np.isclose(out, candidate, atol=1e-4), axis=(1, 2)))
    matches = np.stack(combinations)  # (4 combinations, 16 samples)
    assert matches.any(axis=0).all()  # every sample is one of them
    assert (matches.sum(axis=1) > 0).sum() >= 2  # and samples differ
    assert not np.array_equal(out, block(x))


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5])
def test_drop_path_is_flax_dropout_on_whole_samples(rate):
    """`vit.drop_path` computes what `nnx.Dropout(rate, broadcast_dims=(1, 2))` does from the same stream; with
    the rate traced (scanned blocks) it drops the same samples, the others scaled by a float32 1 - rate."""
    x = jax.random.normal(jax.random.key(4), (32, 5, 8))
    expected = nnx.Dropout(rate, broadcast_dims=(1, 2))(x, rngs=nnx.Rngs(dropout=5))
    np.testing.assert_array_equal(drop_path(x, rate, nnx.Rngs(dropout=5)), expected)
    traced = jax.jit(lambda rate: drop_path(x, rate, nnx.Rngs(dropout=5)))(jnp.float32(rate))
    np.testing.assert_array_equal(traced == 0, expected == 0)
    np.testing.assert_allclose(traced, expected, rtol=1e-6, atol=0)
    if rate:
        assert 0 < (np.asarray(expected) == 0).all(axis=(1, 2)).sum() < len(x)  # some samples dropped, not all
    np.testing.assert_array_equal(drop_path(x, rate, None), x)


def test_classifier_position_table_is_a_parameter_with_timm_init_and_mae_keeps_it_fixed():
    model = Classifier(ClassifierConfig(ENCODER, 10, protocol=FINETUNE), rngs=nnx.Rngs(0))
    table = np.asarray(model.encoder.pos_embed[...])
    assert isinstance(model.encoder.pos_embed, nnx.Param) and table.shape == (1, 17, ENCODER.width)
    assert abs(table.std() - 0.02) < 0.003 and np.abs(table).max() < 4 * 0.02  # timm: trunc_normal(std .02)
    assert not isinstance(MAE(TINY, rngs=nnx.Rngs(0)).encoder.pos_embed, nnx.Param)  # pretraining: fixed


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="protocol 'probe' must be 'finetune' or 'linprobe'"):
        ClassifierConfig(ENCODER, 10, protocol="probe")
