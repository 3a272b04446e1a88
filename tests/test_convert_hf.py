"""`convert.hf`: official state_dicts in transformers' `ViTMAEForPreTraining` names, and its config.

The parity tests (test_parity.py) check that the converted model computes what ours does; these check that
the names and shapes fit transformers' model exactly and that the official q|k|v rows land in q, k and v.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import transformers  # setup.cfg's test extra: without it these tests fail (ImportError), never skip
from flax import nnx

from mae_jax import convert
from mae_jax.models.mae import MAE
from tests.conftest import TINY


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


def test_official_to_hf_names_an_unknown_key(official):
    with pytest.raises(ValueError, match=r"^official module 'head' has no counterpart in transformers'"):
        convert.hf.official_to_hf({**official, "head.weight": np.zeros((10, TINY.encoder.width), np.float32)})


def test_transformers_config_without_transformers_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails, as when missing
    with pytest.raises(convert.ConvertError, match=r"needs the transformers package.*`pip install transformers`$"):
        convert.hf.transformers_config(TINY, mask_ratio=0.75)
