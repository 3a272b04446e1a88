"""transformers' `ViTMAEForPreTraining` (Hugging Face ViTMAE): its config and parameter names for an MAE.

Weights reach it from the official layout (`official.to_official`): `KEY_TABLE` maps each official module to
transformers' module. The official attention has one `qkv` linear whose outputs are q|k|v; transformers has
three linears, so that row is split into equal thirds. The parity tests and `benchmark --torch` use this.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from mae_jax.convert.official import ConvertError
from mae_jax.models.mae import MAEConfig
from mae_jax.models.vit import LAYER_NORM_EPS

if TYPE_CHECKING:
    import transformers

# Submodules of a transformer block: official name -> transformers name(s).
_BLOCK: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    ("norm1", "layernorm_before"),
    ("attn.qkv", ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
    ("attn.proj", "attention.o_proj"),
    ("norm2", "layernorm_after"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
)


def _in_block(prefix: str, names: str | tuple[str, ...]) -> str | tuple[str, ...]:
    return f"{prefix}.{names}" if isinstance(names, str) else tuple(f"{prefix}.{name}" for name in names)


# (official module, transformers module, or several that split the official output rows evenly); `{i}` is a
# block index.
KEY_TABLE: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    ("cls_token", "vit.embeddings.cls_token"),
    ("pos_embed", "vit.embeddings.position_embeddings"),
    ("patch_embed.proj", "vit.embeddings.patch_embeddings.projection"),
    *((f"blocks.{{i}}.{name}", _in_block("vit.layers.{i}", hf)) for name, hf in _BLOCK),
    ("norm", "vit.layernorm"),
    ("decoder_embed", "decoder.decoder_embed"),
    ("mask_token", "decoder.mask_token"),
    ("decoder_pos_embed", "decoder.decoder_pos_embed"),
    *((f"decoder_blocks.{{i}}.{name}", _in_block("decoder.decoder_layers.{i}", hf)) for name, hf in _BLOCK),
    ("decoder_norm", "decoder.decoder_norm"),
    ("decoder_pred", "decoder.decoder_pred"),
)

_RULES = [
    (re.compile(re.escape(official).replace(re.escape("{i}"), r"(?P<i>\d+)")), (hf,) if isinstance(hf, str) else hf)
    for official, hf in KEY_TABLE
]


def _hf_modules(official_module: str) -> tuple[str, ...]:
    for pattern, modules in _RULES:
        if match := pattern.fullmatch(official_module):
            return tuple(module.format(**match.groupdict()) for module in modules)
    raise ValueError(f"official module {official_module!r} has no counterpart in transformers' ViTMAEForPreTraining")


def official_to_hf(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers' state_dict of an official one (as `official.to_official` gives it), as numpy arrays."""
    out = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".") if key.endswith((".weight", ".bias")) else (key, "", "")
        modules = _hf_modules(module)
        for hf_module, part in zip(modules, np.split(np.asarray(value), len(modules)), strict=True):
            out[".".join(filter(None, (hf_module, param)))] = np.array(part)
    return out


def transformers_config(config: MAEConfig, mask_ratio: float) -> transformers.ViTMAEConfig:
    """transformers' `ViTMAEConfig` of the same architecture and loss."""
    try:
        import transformers
    except ImportError:
        raise ConvertError(
            "transformers' ViTMAE needs the transformers package, which is not installed: `pip install transformers`"
        ) from None
    enc = config.encoder
    return transformers.ViTMAEConfig(
        hidden_size=enc.width,
        num_hidden_layers=enc.depth,
        num_attention_heads=enc.num_heads,
        intermediate_size=enc.mlp_ratio * enc.width,
        image_size=enc.image_size,
        patch_size=enc.patch_size,
        decoder_hidden_size=config.decoder_width,
        decoder_num_hidden_layers=config.decoder_depth,
        decoder_num_attention_heads=config.decoder_heads,
        decoder_intermediate_size=enc.mlp_ratio * config.decoder_width,
        mask_ratio=mask_ratio,
        norm_pix_loss=config.norm_pix_loss,
        layer_norm_eps=LAYER_NORM_EPS,
        hidden_act="gelu",  # exact erf GELU
        qkv_bias=True,
    )
