"""Official PyTorch MAE checkpoints <-> mae_jax parameters: layout, round trips, error messages, CLI."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx

from mae_jax import checkpointing, convert, pretrained
from mae_jax.convert import __main__ as cli
from mae_jax.convert.official import CLASSIFIER_FILE
from mae_jax.models.classifier import LINPROBE, Classifier, ClassifierConfig
from mae_jax.models.mae import MAE, MAEConfig
from mae_jax.models.vit import patchify
from mae_jax.pretrained import PretrainedError
from tests.conftest import REPO, TINY
from tests.test_classifier import perturbed_classifier

CONFIG = TINY


def _block_keys(prefix: str) -> list[str]:
    names = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    return [f"{prefix}.{name}.{p}" for name in names for p in ("weight", "bias")]


# The official layout, written out from the reference (not derived from convert.official.KEY_TABLE).
ENCODER_KEYS = [
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    *_block_keys("blocks.0"),
    *_block_keys("blocks.1"),
    "norm.weight",
    "norm.bias",
]
DECODER_KEYS = [
    "mask_token",
    "decoder_pos_embed",
    "decoder_embed.weight",
    "decoder_embed.bias",
    *_block_keys("decoder_blocks.0"),
    "decoder_norm.weight",
    "decoder_norm.bias",
    "decoder_pred.weight",
    "decoder_pred.bias",
]


def perturbed_model(config: MAEConfig, seed: int) -> MAE:
    """A random model whose every trained array differs from its init (norm scales, biases, tokens too)."""
    model = MAE(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)  # not the fixed position tables
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), params))
    return model


@pytest.fixture(scope="module")
def model() -> MAE:
    return perturbed_model(CONFIG, seed=3)


@pytest.fixture(scope="module")
def official(model) -> dict[str, np.ndarray]:
    return convert.to_official(nnx.state(model))


def assert_states_equal(actual: nnx.State, expected: nnx.State) -> None:
    actual, expected = nnx.to_pure_dict(actual), nnx.to_pure_dict(expected)
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


@nnx.jit
def forward(model: MAE, images, noise):
    return model(images, 0.75, noise=noise)


def test_official_layout(model, official):
    assert sorted(official) == sorted(ENCODER_KEYS + DECODER_KEYS)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in official.values())
    assert official["patch_embed.proj.weight"].shape == (64, 3, 8, 8)
    assert official["blocks.1.attn.qkv.weight"].shape == (192, 64)
    assert official["decoder_pred.weight"].shape == (8 * 8 * 3, 32)
    encoder, decoder = model.encoder, model.decoder
    np.testing.assert_array_equal(official["blocks.1.mlp.fc1.weight"], np.asarray(encoder.blocks[1].mlp.fc1.kernel).T)
    np.testing.assert_array_equal(official["decoder_blocks.0.norm2.weight"], np.asarray(decoder.blocks[0].norm2.scale))
    np.testing.assert_array_equal(official["decoder_pos_embed"], np.asarray(model.decoder.pos_embed))
    # The converted conv weight computes the same patch tokens in PyTorch's NCHW convolution.
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    ours = model.encoder.patch_embed(patchify(jnp.asarray(images), 8))
    theirs = torch.nn.functional.conv2d(
        torch.from_numpy(images).permute(0, 3, 1, 2),
        torch.from_numpy(official["patch_embed.proj.weight"]),
        torch.from_numpy(official["patch_embed.proj.bias"]),
        stride=8,
    )
    np.testing.assert_allclose(np.asarray(ours), theirs.flatten(2).transpose(1, 2).numpy(), atol=1e-5)


def test_encoder_state_alone_and_encoder_only_export(model, official):
    encoder_only = {key: official[key] for key in ENCODER_KEYS}
    exports = convert.to_official(nnx.state(model.encoder)), convert.to_official(nnx.state(model), encoder_only=True)
    for exported in exports:
        assert sorted(exported) == sorted(ENCODER_KEYS)
        for key, value in exported.items():
            np.testing.assert_array_equal(value, encoder_only[key], err_msg=key)


def test_round_trip_through_pth_file(model, official, tmp_path):
    path = str(tmp_path / "mae.pth")
    convert.save_pth(path, official)
    loaded = convert.official.load_pth(path)
    assert list(loaded) == list(official)
    state = convert.from_official(loaded, CONFIG)
    assert_states_equal(state, nnx.state(model))


def test_official_dict_gives_same_forward(model, official):
    rebuilt = MAE(CONFIG, rngs=nnx.Rngs(99))
    nnx.update(rebuilt, convert.from_official(official, CONFIG))
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(3, 32, 32, 3)), jnp.float32)
    noise = jnp.asarray(rng.uniform(size=(3, 16)), jnp.float32)
    expected, actual = forward(model, images, noise), forward(rebuilt, images, noise)
    assert float(actual.loss) == float(expected.loss)
    np.testing.assert_array_equal(np.asarray(actual.pred), np.asarray(expected.pred))
    np.testing.assert_array_equal(np.asarray(actual.latent), np.asarray(expected.latent))


def test_load_pth_accepts_training_checkpoints_and_bare_state_dicts(official, tmp_path):
    tensors = {key: torch.from_numpy(value) for key, value in official.items()}
    torch.save({"model": tensors, "epoch": 3, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "train.pth")
    torch.save(tensors, tmp_path / "bare.pth")
    for name in ("train.pth", "bare.pth"):
        loaded = convert.official.load_pth(str(tmp_path / name))
        assert sorted(loaded) == sorted(official)
        np.testing.assert_array_equal(loaded["blocks.0.attn.qkv.weight"], official["blocks.0.attn.qkv.weight"])


def test_encoder_only_file_loads_with_fresh_decoder(model, official, caplog):
    encoder_only = {key: official[key] for key in ENCODER_KEYS}
    with caplog.at_level("WARNING"):
        state = convert.from_official(encoder_only, CONFIG, decoder_seed=7)
    assert "no decoder" in caplog.text and "Rngs(7)" in caplog.text
    assert_states_equal(state["encoder"], nnx.state(model)["encoder"])
    assert_states_equal(state["decoder"], nnx.state(MAE(CONFIG, rngs=nnx.Rngs(7)))["decoder"])

    with pytest.raises(ValueError, match="missing") as error:
        convert.from_official(encoder_only, CONFIG, encoder_only_ok=False)
    for key in DECODER_KEYS:
        assert repr(key) in str(error.value)


def test_partial_decoder_is_an_error(official):
    partial = {key: value for key, value in official.items() if key != "decoder_norm.weight"}
    with pytest.raises(ValueError, match=r"missing \['decoder_norm.weight'\]"):
        convert.from_official(partial, CONFIG)


def test_mismatches_are_reported_together(official):
    broken = dict(official)
    del broken["blocks.1.norm2.bias"]
    broken["blocks.0.mlp.fc1.weight"] = np.zeros((100, 64), np.float32)
    broken["head.weight"] = np.zeros((10, 64), np.float32)
    broken["fc_norm.bias"] = np.zeros((64,), np.float32)
    with pytest.raises(ValueError) as error:
        convert.from_official(broken, CONFIG)
    message = str(error.value)
    assert message.startswith("checkpoint does not match ViT mu/8 MAE")
    assert "missing ['blocks.1.norm2.bias']" in message
    assert "unexpected ['fc_norm.bias', 'head.weight']" in message
    assert "blocks.0.mlp.fc1.weight: file (100, 64) vs model (256, 64)" in message
    assert "fine-tuned classifier" in message


def test_wrong_variant_is_reported(official):
    expected = r"does not match ViT Ti/8 MAE.*cls_token: file \(1, 1, 64\) vs model \(1, 1, 192\)"
    with pytest.raises(ValueError, match=expected):
        convert.from_official(official, MAEConfig.from_variant("Ti/8", 32, decoder_width=32, decoder_depth=1))


def test_infer_config(official):
    assert convert.infer_config(official, decoder_heads=2) == CONFIG
    assert convert.infer_config(official, variant="mu/8", decoder_heads=2, norm_pix_loss=False) == MAEConfig(
        CONFIG.encoder, 32, 1, 2, norm_pix_loss=False
    )
    encoder_only = convert.infer_config({key: official[key] for key in ENCODER_KEYS})
    assert encoder_only == MAEConfig(CONFIG.encoder)  # the official 512 x 8 decoder with 16 heads
    unknown = {**official, "blocks.2.norm1.weight": np.zeros(64)}  # depth 3: no known variant
    with pytest.raises(ValueError, match="number of heads"):
        convert.infer_config(unknown)
    assert convert.infer_config(unknown, num_heads=2).encoder.depth == 3


def official_patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """The official `MaskedAutoencoderViT.patchify` (NCHW -> (N, L, p*p*C), 'nchpwq->nhwpqc') for any C, whose
    order `decoder_pred`'s outputs follow."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // patch) * (w // patch), patch * patch * c)


@pytest.mark.parametrize("channels", [1, 4])
def test_other_channel_counts_round_trip_and_compute_as_pytorch(channels):
    config = MAEConfig.from_variant("mu/8", 32, channels, decoder_width=32, decoder_depth=1, decoder_heads=2)
    model = perturbed_model(config, seed=5)
    official = convert.to_official(nnx.state(model))
    assert official["patch_embed.proj.weight"].shape == (64, channels, 8, 8)  # the official model's in_chans
    assert official["decoder_pred.weight"].shape == (8 * 8 * channels, 32)
    assert convert.infer_config(official, decoder_heads=2) == config
    assert convert.infer_config({key: official[key] for key in ENCODER_KEYS}).encoder.num_channels == channels
    assert_states_equal(convert.from_official(official, config), nnx.state(model))
    images = np.random.default_rng(0).normal(size=(2, 32, 32, channels)).astype(np.float32)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    theirs = torch.nn.functional.conv2d(
        pixels,
        torch.from_numpy(official["patch_embed.proj.weight"]),
        torch.from_numpy(official["patch_embed.proj.bias"]),
        stride=8,
    )
    ours = model.encoder.patch_embed(patchify(jnp.asarray(images), 8))
    np.testing.assert_allclose(np.asarray(ours), theirs.flatten(2).transpose(1, 2).numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(patchify(jnp.asarray(images), 8)), official_patchify(pixels, 8).numpy())
    three = MAEConfig.from_variant("mu/8", 32, decoder_width=32, decoder_depth=1, decoder_heads=2)
    with pytest.raises(
        ValueError, match=rf"patch_embed.proj.weight: file \(64, {channels}, 8, 8\) vs model \(64, 3, 8, 8\)"
    ):
        convert.from_official(official, three)
    wrong_pred = {**official, "decoder_pred.weight": np.zeros((8 * 8 * 3 + 1, 32), np.float32)}
    with pytest.raises(
        ValueError, match=rf"decoder_pred predicts 193 values per patch, not patch 8\^2 x in_chans {channels}"
    ):
        convert.infer_config(wrong_pred, decoder_heads=2)


def test_cli_import_export_round_trip(model, official, tmp_path):
    pth = str(tmp_path / "in.pth")
    convert.save_pth(pth, official)
    cli.main(["import", pth, str(tmp_path / "params"), "--decoder-heads", "2"])
    config, state = checkpointing.load_params(tmp_path / "params")
    assert config == CONFIG
    assert_states_equal(state, nnx.state(model))

    cli.main(["export", str(tmp_path / "params"), str(tmp_path / "out.pth")])
    cli.main(["export", str(tmp_path / "params"), str(tmp_path / "enc.pth"), "--encoder-only"])
    exported = torch.load(tmp_path / "out.pth", map_location="cpu", weights_only=True)["model"]
    assert list(exported) == list(official)
    for key, value in exported.items():
        assert value.dtype == torch.float32 and value.is_contiguous()
        np.testing.assert_array_equal(value.numpy(), official[key], err_msg=key)
    assert sorted(convert.official.load_pth(str(tmp_path / "enc.pth"))) == sorted(ENCODER_KEYS)

    # An encoder-only file imports too, with the official decoder and the seed it was asked for.
    cli.main(
        [
            "import",
            str(tmp_path / "enc.pth"),
            str(tmp_path / "enc_params"),
            "--variant",
            "mu/8",
            "--decoder-seed",
            "5",
            "--no-norm-pix-loss",
        ]
    )
    config, state = checkpointing.load_params(tmp_path / "enc_params")
    assert config == MAEConfig(CONFIG.encoder, norm_pix_loss=False)
    assert_states_equal(state["encoder"], nnx.state(model)["encoder"])


def run_convert(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mae_jax.convert", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def test_cli_import_errors_are_one_line(official, tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    partial = {key: value for key, value in official.items() if key != "blocks.1.norm2.bias"}
    convert.save_pth(tmp_path / "partial.pth", partial)
    cases = {
        "notes.pth": r"error: \S+notes.pth is not a PyTorch checkpoint that loads without running code \(\w+\)",
        "partial.pth": r"error: checkpoint does not match ViT mu/8 MAE .*: missing \['blocks.1.norm2.bias'\]",
        "absent.pth": r"error: \S+absent.pth does not exist",
    }
    for name, message in cases.items():
        result = run_convert("import", str(tmp_path / name), str(tmp_path / f"out_{name}"), "--decoder-heads", "2")
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert re.fullmatch(message, result.stderr.strip().splitlines()[-1]), result.stderr
        assert not (tmp_path / f"out_{name}").exists()


def test_safetensors_round_trip_needs_no_torch(model, official, tmp_path, monkeypatch):
    convert.save_pth(tmp_path / "in.pth", official)
    cli.main(["import", str(tmp_path / "in.pth"), str(tmp_path / "params"), "--decoder-heads", "2"])
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails, as without PyTorch
    cli.main(["export", str(tmp_path / "params"), str(tmp_path / "out.safetensors"), "--format=official"])
    exported = safetensors.numpy.load_file(tmp_path / "out.safetensors")
    assert sorted(exported) == sorted(official)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, official[key], err_msg=key)
    cli.main(["import", str(tmp_path / "out.safetensors"), str(tmp_path / "again"), "--decoder-heads", "2"])
    config, state = checkpointing.load_params(tmp_path / "again")
    assert config == CONFIG
    assert_states_equal(state, nnx.state(model))

    with pytest.raises(SystemExit, match=r"^error: \.pth files need PyTorch.*`pip install torch`"):
        cli.main(["export", str(tmp_path / "params"), str(tmp_path / "out.pth")])
    with pytest.raises(PretrainedError, match=r"\.pth files need PyTorch.*`pip install torch`"):
        pretrained.load(str(tmp_path / "in.pth"))
    _, state = pretrained.load(str(tmp_path / "out.safetensors"))  # fine-tuning's init= takes it too
    assert_states_equal(state["encoder"], nnx.state(model)["encoder"])


def test_classifier_file_imports_its_encoder(tmp_path, caplog):
    """An official or timm classifier with the cls token (its encoder's final norm kept) imports as an encoder."""
    probe = perturbed_classifier(ClassifierConfig(CONFIG.encoder, 10, protocol=LINPROBE), seed=2)
    state_dict = convert.classifier_to_official(nnx.state(probe))
    convert.save_safetensors(tmp_path / "probe.safetensors", state_dict)
    with caplog.at_level("INFO"):
        cli.main(["import", str(tmp_path / "probe.safetensors"), str(tmp_path / "params"), "--decoder-heads=2"])
    assert "Leaving out the classifier head (head.0.running_mean, head.0.running_var, head.1.bias" in caplog.text
    _, state = checkpointing.load_params(tmp_path / "params")
    encoder = convert.to_official({"encoder": state["encoder"]}, encoder_only=True)
    assert sorted(encoder) == sorted(ENCODER_KEYS)
    for key, value in encoder.items():
        np.testing.assert_array_equal(value, state_dict[key], err_msg=key)


def _classifier_file(tmp_path, global_pool: bool) -> str:
    model = Classifier(ClassifierConfig(CONFIG.encoder, 10, global_pool=global_pool), rngs=nnx.Rngs(0))
    path = tmp_path / ("pooled" if global_pool else "token") / CLASSIFIER_FILE
    path.parent.mkdir()
    convert.save_safetensors(path, convert.classifier_to_official(nnx.state(model)))
    return str(path)


CLI_REFUSALS = {
    "timm_suffix": (
        ["export", "{params}", "{tmp}/out.pth", "--format=timm"],
        r"--format=timm writes a \.safetensors file: name it \S+out\.pth\.safetensors",
    ),
    "hf_file_name": (
        ["export", "{params}", "{tmp}/out.safetensors", "--format=hf"],
        r"--format=hf writes a directory \(config.json \+ model.safetensors\), not \S+out.safetensors",
    ),
    "encoder_only_classifier": (
        ["export", "{token}", "{tmp}/out.safetensors", "--encoder-only"],
        r"--encoder-only applies to MAE parameter directories, not to classifiers",
    ),
    "mae_file_as_classifier": (
        ["export", "{tmp}/mae.safetensors", "{tmp}/out.safetensors", "--format=timm"],
        r"\S+mae.safetensors holds an MAE, not a classifier: import it first .*",
    ),
    "neither_directory": (
        ["export", "{tmp}/empty", "{tmp}/out.safetensors"],
        r"\S+empty is neither a parameter directory \(model.json \+ params/\) nor a fine-tuning workdir .*",
    ),
    "import_params_dir": (
        ["import", "{params}", "{tmp}/again"],
        r"\S+params is a mae_jax parameter directory already: export it, or use it as it is",
    ),
    "import_global_pool": (
        ["import", "{pooled}", "{tmp}/again"],
        r"a global-pool classifier \(fc_norm.\*, no norm.\*\) holds no complete MAE encoder: .*",
    ),
}


@pytest.mark.parametrize("case", CLI_REFUSALS)
def test_cli_convert_refusals_are_one_line(model, official, tmp_path, case):
    checkpointing.save_params(tmp_path / "params", CONFIG, nnx.state(model))
    convert.save_safetensors(tmp_path / "mae.safetensors", official)
    (tmp_path / "empty").mkdir()
    paths = {
        "params": tmp_path / "params",
        "tmp": tmp_path,
        "token": _classifier_file(tmp_path, global_pool=False),
        "pooled": _classifier_file(tmp_path, global_pool=True),
    }
    argv, message = CLI_REFUSALS[case]
    with pytest.raises(SystemExit) as error:
        cli.main([arg.format(**paths) for arg in argv])
    assert re.fullmatch(f"error: {message}", str(error.value)), error.value
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "again").exists()


def test_classifier_exports_to_official_files(tmp_path):
    source = _classifier_file(tmp_path, global_pool=True)
    cli.main(["export", source, str(tmp_path / "classifier.pth")])
    exported = torch.load(tmp_path / "classifier.pth", map_location="cpu", weights_only=True)["model"]
    expected = safetensors.numpy.load_file(source)
    assert sorted(exported) == sorted(expected)
    for key, value in exported.items():
        np.testing.assert_array_equal(value.numpy(), expected[key], err_msg=key)
