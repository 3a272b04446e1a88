"""timm's `VisionTransformer` (timm/models/vision_transformer.py): its state_dict of an MAE encoder or classifier.

timm's ViT names its modules as the official MAE does (`cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.{i}.norm1|attn.qkv|attn.proj|norm2|mlp.fc1|mlp.fc2`, `norm`, `fc_norm`, `head`; LayerNorm eps 1e-6):
timm's `vit_*_patch*_224.mae` models load the official `mae_pretrain_vit_*.pth` files as they are (their
pretrained cfg points at those files, and `checkpoint_filter_fn` renames none of their keys). So an encoder's
timm state_dict is its official one without the decoder. A classifier's is its official one too: global pool
(`global_pool='avg'`) has `fc_norm` and no `norm`, the cls token (`global_pool='token'`) has `norm`; timm's head
is one linear layer, so a linear probe's BatchNorm is folded into it (`official.fold_probe_batch_norm`).
Written as `.safetensors`, which timm loads without torch.load (`pretrained_cfg_overlay=dict(file=...)`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mae_jax.convert.official import GLOBAL_POOL, ConvertError, classifier_kind, fold_probe_batch_norm, is_classifier
from mae_jax.models.vit import EncoderConfig

# Official keys of the MAE decoder, which timm's ViT does not have.
_DECODER_PREFIXES = ("decoder_", "mask_token")


def to_timm(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm's VisionTransformer state_dict of an official encoder (decoder keys refused) or classifier."""
    if is_classifier(state_dict):
        return fold_probe_batch_norm(state_dict)
    if decoder := sorted(key for key in state_dict if key.startswith(_DECODER_PREFIXES)):
        raise ConvertError(f"timm's VisionTransformer has no MAE decoder: leave out {decoder[0]} and the rest")
    return dict(state_dict)


def vision_transformer_kwargs(encoder: EncoderConfig, state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """`timm.models.VisionTransformer(**kwargs)` arguments of the model that `to_timm(state_dict)` fits."""
    kwargs: dict[str, Any] = {
        "img_size": encoder.image_size,
        "patch_size": encoder.patch_size,
        "embed_dim": encoder.width,
        "depth": encoder.depth,
        "num_heads": encoder.num_heads,
        "mlp_ratio": encoder.mlp_ratio,
        "in_chans": encoder.num_channels,
        "num_classes": 0,
        "global_pool": "token",
    }
    if is_classifier(state_dict):
        head = "head.weight" if "head.weight" in state_dict else "head.1.weight"  # the linear probe's is head.1
        kwargs["num_classes"] = int(state_dict[head].shape[0])
        kwargs["global_pool"] = "avg" if classifier_kind(state_dict) == GLOBAL_POOL else "token"
    return kwargs
