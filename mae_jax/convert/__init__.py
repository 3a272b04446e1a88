"""Weight formats of other implementations, one module each, and their conversion to and from mae_jax.

- `official`: facebookresearch/mae state_dicts (`.pth`, or `.safetensors` in the same key layout), both ways, and
  the fine-tuned classifiers' layout.
- `hf`: transformers' ViTMAE and ViT (Hugging Face): names both ways, config.json, model directories.
- `timm`: timm's VisionTransformer, whose names are the official ones (encoders and classifiers).

Every format passes through the official layout. `python -m mae_jax.convert import|export ...` (`__main__`)
converts parameter directories from and to all three. Only `.pth` files need PyTorch; nothing needs transformers.
"""

from mae_jax.convert import hf, official, timm
from mae_jax.convert.official import (
    SAFETENSORS_SUFFIX,
    ConvertError,
    classifier_to_official,
    describe,
    from_official,
    infer_config,
    load_state_dict,
    save_pth,
    save_safetensors,
    to_official,
    torch_available,
)

__all__ = [
    "SAFETENSORS_SUFFIX",
    "ConvertError",
    "classifier_to_official",
    "describe",
    "from_official",
    "hf",
    "infer_config",
    "load_state_dict",
    "official",
    "save_pth",
    "save_safetensors",
    "timm",
    "to_official",
    "torch_available",
]
