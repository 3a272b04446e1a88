"""Hugging Face directories: `convert.hf` names and config, and `python -m mae_jax.convert` both ways.

What we export, transformers' `from_pretrained` loads strictly and computes what we do (same noise: loss, pred,
mask, latent within 1e-5); what transformers' own `save_pretrained` writes (and the Hub's transformers 4 names)
imports and computes what transformers does. Models mae_jax cannot compute exactly are refused in one line.
The parity tests (test_parity.py) check the model itself against transformers.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers  # setup.cfg's test extra: without it these tests fail (ImportError), never skip
from flax import nnx

from mae_jax import checkpointing, convert, pretrained
from mae_jax.convert import __main__ as cli
from mae_jax.convert.official import CLASSIFIER_FILE
from mae_jax.models.classifier import FINETUNE, LINPROBE, ClassifierConfig
from mae_jax.models.mae import MAE, MAEConfig
from tests.conftest import REPO, TINY
from tests.test_classifier import perturbed_classifier
from tests.test_convert import assert_states_equal
from tests.test_parity import TOLERANCE, our_forward, perturbed_state

BATCH = 3


@pytest.fixture(scope="module")
def official() -> dict[str, np.ndarray]:
    return convert.to_official(nnx.state(MAE(TINY, rngs=nnx.Rngs(3))))


def test_official_to_hf_fits_transformers_model_strictly(official):
    hf_model = transformers.ViTMAEForPreTraining(convert.hf.transformers_config(TINY, mask_ratio=0.75))
    converted = convert.hf.official_to_hf(official)
    assert all(isinstance(value, np.ndarray) for value in converted.values())

    result = hf_model.load_state_dict({key: torch.from_numpy(value) for key, value in converted.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys  # strict also refuses any shape mismatch
    loaded = hf_model.state_dict()
    for key, value in converted.items():
        np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)


def test_official_qkv_rows_split_into_q_k_v(official):
    """Official attention reshapes the qkv output to (3, heads, head_dim): rows [0, D) are q, then k, then v."""
    converted = convert.hf.official_to_hf(official)
    blocks = (("blocks.1", "vit.layers.1", TINY.encoder.width), ("decoder_blocks.0", "decoder.decoder_layers.0", 32))
    for official_prefix, hf_prefix, width in blocks:
        for param in ("weight", "bias"):
            qkv = official[f"{official_prefix}.attn.qkv.{param}"]
            assert qkv.shape[0] == 3 * width
            for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
                expected = qkv[part * width : (part + 1) * width]
                np.testing.assert_array_equal(converted[f"{hf_prefix}.attention.{name}.{param}"], expected)


def test_hf_to_official_inverts_official_to_hf_in_either_spelling(official):
    module_names = convert.hf.official_to_hf(official)
    hub_names = convert.hf.to_hub_names(module_names)
    assert "vit.encoder.layer.1.attention.attention.query.weight" in hub_names  # the Hub's (transformers 4) names
    assert "decoder.decoder_layers.0.intermediate.dense.bias" in hub_names
    for names in (module_names, hub_names):
        back = convert.hf.hf_to_official(convert.hf.to_module_names(names))
        assert sorted(back) == sorted(official)
        for key, value in official.items():
            np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_hf_to_official_names_what_it_cannot_place(official):
    module_names = convert.hf.official_to_hf(official)
    with pytest.raises(ValueError, match=r"^no counterpart in the official MAE for \['vit.extra.weight'\]$"):
        convert.hf.hf_to_official({**module_names, "vit.extra.weight": np.zeros(3, np.float32)})
    del module_names["vit.layers.1.attention.k_proj.bias"]
    with pytest.raises(ValueError, match=r"^q, k and v are not all there for \['blocks.1.attn.qkv.bias'\]$"):
        convert.hf.hf_to_official(module_names)


def test_official_to_hf_names_an_unknown_key(official):
    with pytest.raises(ValueError, match=r"^official module 'head' has no counterpart in transformers'"):
        convert.hf.official_to_hf({**official, "head.weight": np.zeros((10, TINY.encoder.width), np.float32)})


def test_transformers_config_without_transformers_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails, as when missing
    with pytest.raises(convert.ConvertError, match=r"needs the transformers package.*`pip install transformers`$"):
        convert.hf.transformers_config(TINY, mask_ratio=0.75)


# ---------------------------------------------------------------------------------------------------
# Forward passes on both sides
# ---------------------------------------------------------------------------------------------------
def inputs(config: MAEConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    size = config.encoder.image_size
    images = rng.standard_normal((BATCH, size, size, config.encoder.num_channels), np.float32)
    return images, rng.uniform(size=(BATCH, config.encoder.num_patches)).astype(np.float32)


def ours(config: MAEConfig, state: nnx.State, images: np.ndarray, noise: np.ndarray, mask_ratio: float):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MAE(config, rngs=nnx.Rngs(0))))
    with jax.default_matmul_precision("highest"):
        return jax.device_get(our_forward(graphdef, state, images, noise, mask_ratio))


def theirs(model: transformers.PreTrainedModel, images: np.ndarray, noise: np.ndarray) -> dict[str, np.ndarray]:
    """loss, pred, mask and latent (the encoder's output) of transformers' ViTMAEForPreTraining, or the latent of
    its ViTMAEModel, ViTModel or ViTForImageClassification encoder, as in test_parity.py."""
    encoder = model if isinstance(model, transformers.ViTMAEModel | transformers.ViTModel) else model.vit
    latents = []
    hook = encoder.register_forward_hook(lambda module, args, output: latents.append(output.last_hidden_state))
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    kwargs = {} if isinstance(encoder, transformers.ViTModel) else {"noise": torch.from_numpy(noise)}
    try:
        with torch.no_grad():
            output = model.eval()(pixel_values=pixels, **kwargs)
    finally:
        hook.remove()
    out = {"latent": latents[0].numpy()}
    if isinstance(model, transformers.ViTMAEForPreTraining):
        out |= {"loss": float(output.loss), "pred": output.logits.numpy(), "mask": output.mask.numpy()}
    return out


def max_abs_differences(mine, transformers_out: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(np.max(np.abs(getattr(mine, name) - value))) for name, value in transformers_out.items()}


def assert_same_outputs(mine, transformers_out: dict[str, np.ndarray], label: str) -> None:
    diffs = max_abs_differences(mine, transformers_out)
    print(f"\n{label}: max abs diff " + ", ".join(f"{name} {value:.2e}" for name, value in diffs.items()))
    if "mask" in transformers_out:
        np.testing.assert_array_equal(mine.mask, transformers_out["mask"])
    assert all(value <= TOLERANCE for value in diffs.values()), diffs


def save_params(tmp_path, config: MAEConfig, seed: int = 7) -> tuple[str, nnx.State]:
    state = perturbed_state(config, seed)
    checkpointing.save_params(tmp_path / "params", config, state)
    return str(tmp_path / "params"), state


# ---------------------------------------------------------------------------------------------------
# Export: transformers loads it and computes what we do
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "pixels"])
def test_hf_export_loads_in_transformers_and_computes_the_same(tmp_path, norm_pix):
    config = MAEConfig(TINY.encoder, TINY.decoder_width, TINY.decoder_depth, TINY.decoder_heads, norm_pix)
    params, state = save_params(tmp_path, config)
    cli.main(["export", params, str(tmp_path / "hf"), "--format=hf", "--mask-ratio=0.6"])

    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    expected = {
        "architectures": ["ViTMAEForPreTraining"],
        "model_type": "vit_mae",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "qkv_bias": True,
        "norm_pix_loss": norm_pix,
        "mask_ratio": 0.6,
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "decoder_num_attention_heads": 2,
    }
    assert {key: written[key] for key in expected} == expected
    model, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mis-shaped key
    assert model.dtype == torch.float32 and model.config.layer_norm_eps == 1e-6

    images, noise = inputs(config, seed=1)
    assert_same_outputs(
        ours(config, state, images, noise, 0.6), theirs(model, images, noise), f"hf export, norm_pix={norm_pix}"
    )


def test_hf_encoder_only_export_loads_as_vit_mae_model(tmp_path):
    params, state = save_params(tmp_path, TINY)
    cli.main(["export", params, str(tmp_path / "hf"), "--format=hf", "--encoder-only"])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["ViTMAEModel"]
    model, info = transformers.ViTMAEModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    images, noise = inputs(TINY, seed=2)
    mine = ours(TINY, state, images, noise, 0.75)
    assert_same_outputs(mine, theirs(model, images, noise), "hf encoder-only export")


@pytest.mark.parametrize("channels", [1, 4])
def test_other_channel_counts_export_to_transformers_compute_the_same_and_import_back(tmp_path, channels):
    config = MAEConfig.from_variant("mu/8", 32, channels, decoder_width=32, decoder_depth=1, decoder_heads=2)
    params, state = save_params(tmp_path, config)
    cli.main(["export", params, str(tmp_path / "hf"), "--format=hf"])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_channels"] == channels
    model, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.num_channels == channels and model.config.layer_norm_eps == 1e-6
    images, noise = inputs(config, seed=5)
    assert_same_outputs(ours(config, state, images, noise, 0.75), theirs(model, images, noise), f"{channels} channels")
    cli.main(["import", str(tmp_path / "hf"), str(tmp_path / "back")])
    back_config, back = checkpointing.load_params(tmp_path / "back")
    assert back_config == config
    assert_states_equal(back, state)


def test_hf_round_trip_is_exact_and_needs_neither_torch_nor_transformers(tmp_path, monkeypatch):
    params, state = save_params(tmp_path, TINY)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails, as without PyTorch
    monkeypatch.setitem(sys.modules, "transformers", None)
    cli.main(["export", params, str(tmp_path / "hf"), "--format=hf"])
    cli.main(["import", str(tmp_path / "hf"), str(tmp_path / "back")])
    config, back = checkpointing.load_params(tmp_path / "back")
    assert config == TINY
    assert_states_equal(back, state)
    config, loaded = pretrained.load(str(tmp_path / "hf"))  # visualize's --params and fine-tuning's init take it
    assert config.encoder == TINY.encoder
    assert_states_equal(loaded, state)


# ---------------------------------------------------------------------------------------------------
# Import: what transformers writes computes the same in mae_jax
# ---------------------------------------------------------------------------------------------------
def perturb_torch(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every trained parameter of a fresh transformers model moved off its init (norms, biases, tokens too);
    the fixed sin-cos position tables are left as they are."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def rewrite_keys(directory, rename) -> None:
    """The directory's weights under other names, as another transformers version would write them."""
    weights = safetensors.numpy.load_file(directory / "model.safetensors")
    renamed = {rename(key): value for key, value in weights.items()}
    safetensors.numpy.save_file(renamed, directory / "model.safetensors", metadata={"format": "pt"})


SPELLINGS = {
    "save_pretrained": None,  # transformers 5.23's own: Hub names, the decoder's blocks as decoder_encoder.layer
    "transformers_4": lambda key: key.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."),
    "module_names": "state_dict",  # transformers 5's module names, as model.state_dict() has them
}


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_save_pretrained_directory_imports_and_computes_the_same(tmp_path, spelling):
    torch.manual_seed(0)
    config = MAEConfig(TINY.encoder, TINY.decoder_width, TINY.decoder_depth, TINY.decoder_heads, norm_pix_loss=False)
    model = perturb_torch(transformers.ViTMAEForPreTraining(convert.hf.transformers_config(config, 0.75)), seed=1)
    model.save_pretrained(tmp_path / "hf")
    if spelling == "module_names":
        weights = {key: value.numpy() for key, value in model.state_dict().items()}
        safetensors.numpy.save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    elif SPELLINGS[spelling] is not None:
        rewrite_keys(tmp_path / "hf", SPELLINGS[spelling])
    reloaded, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info  # a spelling transformers itself loads
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key

    cli.main(["import", str(tmp_path / "hf"), str(tmp_path / "params")])
    imported, state = checkpointing.load_params(tmp_path / "params")
    assert imported == config  # heads, decoder shape and loss from config.json
    images, noise = inputs(config, seed=3)
    mine = ours(config, state, images, noise, 0.75)
    assert_same_outputs(mine, theirs(model, images, noise), f"save_pretrained import ({spelling})")


ENCODERS = {
    "ViTMAEModel": lambda: transformers.ViTMAEModel(convert.hf.transformers_config(TINY, mask_ratio=0.0)),
    "ViTForImageClassification": lambda: transformers.ViTForImageClassification(
        transformers.ViTConfig(**VIT_SHAPE, num_labels=10)
    ),
}
VIT_SHAPE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "image_size": 32,
    "patch_size": 8,
    "layer_norm_eps": 1e-6,
}


@pytest.mark.parametrize("architecture", ENCODERS)
def test_save_pretrained_encoder_imports_with_the_official_decoder(tmp_path, architecture, caplog):
    torch.manual_seed(0)
    model = perturb_torch(ENCODERS[architecture](), seed=2)
    model.save_pretrained(tmp_path / "hf")
    with caplog.at_level("INFO"):
        cli.main(["import", str(tmp_path / "hf"), str(tmp_path / "params")])
    if architecture == "ViTForImageClassification":
        assert "Leaving out the ViTForImageClassification's classifier.bias, classifier.weight" in caplog.text
    assert "no decoder" in caplog.text
    config, state = checkpointing.load_params(tmp_path / "params")
    assert config.encoder == TINY.encoder
    assert (config.decoder_width, config.decoder_depth, config.decoder_heads) == (
        (32, 1, 2) if architecture == "ViTMAEModel" else (512, 8, 16)  # ViTMAE's config.json has its decoder
    )
    images = np.random.default_rng(4).standard_normal((BATCH, 32, 32, 3)).astype(np.float32)
    in_order = np.tile(np.arange(config.encoder.num_patches, dtype=np.float32), (BATCH, 1))  # every patch, in order
    mine = ours(config, state, images, in_order, 0.0)
    assert_same_outputs(mine, theirs(model, images, in_order), f"{architecture} import")


# ---------------------------------------------------------------------------------------------------
# Classifiers: ViTForImageClassification where it computes the same logits, a one-line refusal elsewhere
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("protocol", "as_workdir"), [(FINETUNE, True), (LINPROBE, False)])
def test_cls_token_classifiers_export_to_vit_for_image_classification(tmp_path, protocol, as_workdir):
    model = perturbed_classifier(ClassifierConfig(TINY.encoder, 10, protocol=protocol, global_pool=False), seed=3)
    convert.save_safetensors(tmp_path / CLASSIFIER_FILE, convert.classifier_to_official(nnx.state(model)))
    source = tmp_path if as_workdir else tmp_path / CLASSIFIER_FILE
    cli.main(["export", str(source), str(tmp_path / "hf"), "--format=hf"])

    weights = safetensors.numpy.load_file(tmp_path / "hf" / "model.safetensors")
    assert weights["classifier.weight"].shape == (10, 64) and weights["classifier.bias"].shape == (10,)
    assert weights["vit.layernorm.weight"].shape == (64,)
    assert "vit.encoder.layer.1.attention.attention.query.weight" in weights
    hf_model, info = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    assert hf_model.config.num_labels == 10 and hf_model.config.layer_norm_eps == 1e-6

    images = np.random.default_rng(5).standard_normal((BATCH, 32, 32, 3)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(model(images))
    with torch.no_grad():
        hf_logits = hf_model.eval()(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)).logits.numpy()
    difference = float(np.max(np.abs(logits - hf_logits)))
    print(f"\n{protocol} classifier, hf export: max abs logit diff {difference:.2e}")
    assert np.abs(logits).max() > 0.5 and difference <= TOLERANCE


def test_global_pool_classifier_to_hf_is_refused(tmp_path):
    model = perturbed_classifier(ClassifierConfig(TINY.encoder, 10, protocol=FINETUNE, global_pool=True), seed=3)
    convert.save_safetensors(tmp_path / CLASSIFIER_FILE, convert.classifier_to_official(nnx.state(model)))
    with pytest.raises(SystemExit, match=r"^error: transformers' ViTForImageClassification classifies the cls token"):
        cli.main(["export", str(tmp_path), str(tmp_path / "hf"), "--format=hf"])
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------------------------------
# Refusals: one line each
# ---------------------------------------------------------------------------------------------------
CONFIG_CHANGES = {
    "layer_norm_eps": ({"layer_norm_eps": 1e-12}, r"layer_norm_eps is 1e-12, but mae_jax's LayerNorm uses .*1e-06"),
    "hidden_act": ({"hidden_act": "gelu_new"}, r"hidden_act is 'gelu_new': mae_jax's MLP computes the exact"),
    "qkv_bias": ({"qkv_bias": False}, r"qkv_bias is not true: mae_jax's attention has q, k and v biases"),
    "image_size": ({"image_size": [32, 48]}, r"image_size is \[32, 48\]: mae_jax's ViT has square images"),
    "num_channels": ({"num_channels": 0}, r"num_channels is 0: an image has at least 1 channel"),
    "model_type": ({"model_type": "bert"}, r"model_type is 'bert': mae_jax imports 'vit_mae': ViTMAEForPreTraining"),
    "architectures": ({"architectures": ["ViTMAEForX"]}, r"architectures are \['ViTMAEForX'\]: mae_jax imports one"),
    "decoder_mlp": ({"decoder_intermediate_size": 100}, r"decoder_intermediate_size 100 is not 4 x decoder_hidden"),
    "missing": ({"hidden_size": None}, r"hidden_size$"),
}


@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory) -> pathlib.Path:
    tmp_path = tmp_path_factory.mktemp("exported")
    checkpointing.save_params(tmp_path / "params", TINY, nnx.state(MAE(TINY, rngs=nnx.Rngs(0))))
    cli.main(["export", str(tmp_path / "params"), str(tmp_path / "hf"), "--format=hf"])
    return tmp_path / "hf"


def edited_copy(exported_dir: pathlib.Path, directory: pathlib.Path, edits: dict) -> pathlib.Path:
    """A copy of the exported directory whose config.json has `edits` (None: the key removed)."""
    directory.mkdir()
    original = json.loads((exported_dir / "config.json").read_text())
    edited = {key: value for key, value in {**original, **edits}.items() if value is not None}
    (directory / "config.json").write_text(json.dumps(edited))
    (directory / "model.safetensors").write_bytes((exported_dir / "model.safetensors").read_bytes())
    return directory


@pytest.mark.parametrize("change", CONFIG_CHANGES)
def test_config_mae_jax_cannot_compute_exactly_is_refused(exported_dir, tmp_path, change):
    edits, message = CONFIG_CHANGES[change]
    directory = edited_copy(exported_dir, tmp_path / "hf", edits)
    with pytest.raises(SystemExit) as error:
        cli.main(["import", str(directory), str(tmp_path / "out")])
    assert re.match(rf"error: config.json('s| has no) {message}", str(error.value)), error.value
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_transformers_default_layer_norm_eps_imports_when_asked(exported_dir, tmp_path, caplog):
    """facebook/vit-mae-* configs say 1e-12 (transformers' default) for weights trained with the official 1e-6."""
    directory = edited_copy(exported_dir, tmp_path / "hf", {"layer_norm_eps": 1e-12})
    with caplog.at_level("WARNING"):
        cli.main(["import", str(directory), str(tmp_path / "params"), "--official-layer-norm-eps"])
    assert "layer_norm_eps is 1e-12; mae_jax computes with the official 1e-06" in caplog.text
    _, state = checkpointing.load_params(tmp_path / "params")
    assert_states_equal(state, nnx.state(MAE(TINY, rngs=nnx.Rngs(0))))


def test_cli_refusals_are_one_line_with_exit_status_1(exported_dir, tmp_path):
    directory = edited_copy(exported_dir, tmp_path / "hf", {"hidden_act": "relu"})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((exported_dir / "config.json").read_text())
    cases = {
        (str(directory), "out1"): r"error: config.json's hidden_act is 'relu': mae_jax's MLP computes .*",
        (str(tmp_path / "empty"), "out2"): r"error: \S+empty holds config.json but no model.safetensors, .*",
        (str(exported_dir), "out3", "--variant=B/16"): r"error: --variant: config.json gives the model's shape; .*",
    }
    for args, message in cases.items():
        command = [sys.executable, "-m", "mae_jax.convert", "import", args[0], str(tmp_path / args[1]), *args[2:]]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert re.fullmatch(message, result.stderr.strip().splitlines()[-1]), result.stderr
        assert not (tmp_path / args[1]).exists()
