"""Weight formats of other implementations, one module each, and their conversion to and from mae_jax.

- `official`: facebookresearch/mae state_dicts (`.pth`, or `.safetensors` in the same key layout), both ways.
- `hf`: transformers' `ViTMAEForPreTraining` names and config, from the official layout (parity tests, the
  `--torch` benchmark).

`python -m mae_jax.convert import|export ...` (`__main__`) converts official files to parameter directories and
back.
"""

from mae_jax.convert import hf, official
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
    "to_official",
    "torch_available",
]
