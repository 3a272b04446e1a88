"""timm's VisionTransformer layout (`convert.timm`, `export --format=timm`): MAE encoders and fine-tuned classifiers.

timm itself cannot be installed here (it pulls CUDA torch), so the expected keys are written out from timm's
timm/models/vision_transformer.py: `VisionTransformer` has cls_token, pos_embed, patch_embed.proj, blocks.{i}.
(norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), then `norm` unless fc_norm is used (global_pool='avg'),
`fc_norm` if so, and `head` (one nn.Linear) when num_classes > 0. Its `vit_*_patch*_224.mae` pretrained cfgs
point at the official mae_pretrain_vit_*.pth, loaded through `checkpoint_filter_fn` without renaming a key.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx

from mae_jax import checkpointing, convert
from mae_jax.convert import __main__ as cli
from mae_jax.convert.official import CLASSIFIER_FILE
from mae_jax.models.classifier import FINETUNE, LINPROBE, ClassifierConfig
from tests.conftest import TINY
from tests.test_classifier import perturbed_classifier
from tests.test_convert import ENCODER_KEYS, perturbed_model
from tests.test_optim import OfficialClassifier

TIMM_HEAD = {"head.weight": (10, 64), "head.bias": (10,)}
KINDS = {  # (protocol, global_pool) -> the timm keys beside the encoder blocks
    "global_pool": (FINETUNE, True),
    "cls_token": (FINETUNE, False),
    "linear_probe": (LINPROBE, False),
}


def test_mae_exports_to_timm_as_its_official_encoder(tmp_path, caplog):
    model = perturbed_model(TINY, seed=3)
    checkpointing.save_params(tmp_path / "params", TINY, nnx.state(model))
    with caplog.at_level("INFO"):
        cli.main(["export", str(tmp_path / "params"), str(tmp_path / "mae.safetensors"), "--format=timm"])
    assert "the decoder is left out" in caplog.text
    assert "VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4" in caplog.text
    exported = safetensors.numpy.load_file(tmp_path / "mae.safetensors")
    assert sorted(exported) == sorted(ENCODER_KEYS)
    expected = convert.to_official(nnx.state(model), encoder_only=True)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


@pytest.mark.parametrize("kind", KINDS)
def test_classifier_exports_to_timm_keys_and_logits(tmp_path, kind):
    protocol, global_pool = KINDS[kind]
    model = perturbed_classifier(ClassifierConfig(TINY.encoder, 10, protocol=protocol, global_pool=global_pool), 3)
    official = convert.classifier_to_official(nnx.state(model))
    convert.save_safetensors(tmp_path / CLASSIFIER_FILE, official)
    cli.main(["export", str(tmp_path), str(tmp_path / "timm.safetensors"), "--format=timm"])
    exported = safetensors.numpy.load_file(tmp_path / "timm.safetensors")

    final_norm = ["fc_norm.weight", "fc_norm.bias"] if global_pool else ["norm.weight", "norm.bias"]
    encoder = [key for key in ENCODER_KEYS if not key.startswith("norm.")]
    assert sorted(exported) == sorted(encoder + final_norm + list(TIMM_HEAD))
    assert {key: exported[key].shape for key in TIMM_HEAD} == TIMM_HEAD
    assert exported[final_norm[0]].shape == (64,)
    for key in encoder + final_norm:
        np.testing.assert_array_equal(exported[key], official[key], err_msg=key)
    if global_pool:  # the parameters of timm's VisionTransformer(global_pool='avg'), as models_vit.py has them
        torch_model = OfficialClassifier(TINY.encoder, num_classes=10)
        torch_model.load_state_dict({key: torch.from_numpy(value) for key, value in exported.items()}, strict=True)

    # timm's head reads the pooled features (fc_norm of the mean patch token, or the cls token after norm).
    images = np.random.default_rng(5).standard_normal((3, 32, 32, 3)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        features, logits = np.asarray(model.features(images)), np.asarray(model(images))
    timm_logits = features @ exported["head.weight"].T + exported["head.bias"]
    assert np.abs(logits).max() > 0.5
    np.testing.assert_allclose(timm_logits, logits, atol=1e-5, rtol=0)
    if kind != "linear_probe":
        np.testing.assert_array_equal(exported["head.weight"], official["head.weight"])


def test_folded_probe_head_equals_torch_batch_norm_then_linear():
    model = perturbed_classifier(ClassifierConfig(TINY.encoder, 10, protocol=LINPROBE), seed=4)
    official = convert.classifier_to_official(nnx.state(model))
    folded = convert.official.fold_probe_batch_norm(official)
    assert not any(key.startswith(("head.0.", "head.1.")) for key in folded)

    head = torch.nn.Sequential(torch.nn.BatchNorm1d(64, affine=False, eps=1e-6), torch.nn.Linear(64, 10))
    head_keys = {key.removeprefix("head."): torch.tensor(v) for key, v in official.items() if key.startswith("head.")}
    loaded = head.load_state_dict(head_keys, strict=False)
    assert set(loaded.missing_keys) <= {"0.num_batches_tracked"} and not loaded.unexpected_keys
    features = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = head.eval()(features).numpy()
    actual = features.numpy() @ folded["head.weight"].T + folded["head.bias"]
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
