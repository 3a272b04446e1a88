"""transformers' ViTMAE and ViT (Hugging Face): parameter names, config.json, and model directories, both ways.

Weights pass through the official layout (`official.to_official` / `official.from_official`): `KEY_TABLE` maps
each official module to transformers' module. The official attention has one `qkv` linear whose outputs are
q|k|v; transformers has three linears, so that row is split into equal thirds (and concatenated back).

Names exist in two spellings. transformers 5 modules are named as in `KEY_TABLE` (`vit.layers.0.attention.q_proj`);
files on the Hugging Face Hub (facebook/vit-mae-*), and those of transformers 4, say `vit.encoder.layer.0.
attention.attention.query`, which transformers 5 renames as it loads them (its `conversion_mapping.py`). Export
writes the Hub spelling, which both load; import reads either, and the decoder stack as transformers 5's
`save_pretrained` writes it (`decoder.decoder_encoder.layer`).

A directory is `config.json` + `model.safetensors` (or shards with their index, or `pytorch_model.bin` when torch
is installed), read and written without torch or transformers. Models mae_jax cannot compute exactly (another
LayerNorm eps or activation, no q/k/v bias, non-square images or patches) are refused in one line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import logging
from etils import epath

from mae_jax.convert.official import (
    CLS_TOKEN,
    GLOBAL_POOL,
    ConvertError,
    classifier_kind,
    fold_probe_batch_norm,
    load_pth,
    load_safetensors,
    save_safetensors,
)
from mae_jax.models.mae import MAEConfig
from mae_jax.models.vit import LAYER_NORM_EPS, EncoderConfig

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


def _pattern(module: str) -> re.Pattern[str]:
    return re.compile(re.escape(module).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_RULES = [(_pattern(official), (hf,) if isinstance(hf, str) else hf) for official, hf in KEY_TABLE]
# transformers module -> (official module, which of its equal row blocks, how many blocks)
_INVERSE_RULES = [
    (_pattern(hf_module), official, part, len(modules))
    for official, modules in ((official, (hf,) if isinstance(hf, str) else hf) for official, hf in KEY_TABLE)
    for part, hf_module in enumerate(modules)
]


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".") if key.endswith((".weight", ".bias")) else (key, "", "")
    return module, param


def _hf_modules(official_module: str) -> tuple[str, ...]:
    for pattern, modules in _RULES:
        if match := pattern.fullmatch(official_module):
            return tuple(module.format(**match.groupdict()) for module in modules)
    raise ValueError(f"official module {official_module!r} has no counterpart in transformers' ViTMAEForPreTraining")


def official_to_hf(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers' state_dict of an official one (as `official.to_official` gives it), as numpy arrays."""
    out = {}
    for key, value in state_dict.items():
        module, param = _split_param(key)
        modules = _hf_modules(module)
        for hf_module, part in zip(modules, np.split(np.asarray(value), len(modules)), strict=True):
            out[".".join(filter(None, (hf_module, param)))] = np.array(part)
    return out


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def hf_to_official(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The official state_dict of transformers' one in module names (`to_module_names`): q, k and v joined
    back into qkv. Keys with no official counterpart raise one ValueError naming them all."""
    parts: dict[str, dict[int, np.ndarray]] = {}
    counts: dict[str, int] = {}
    unknown = []
    for key, value in state_dict.items():
        module, param = _split_param(key)
        for pattern, official, part, count in _INVERSE_RULES:
            if match := pattern.fullmatch(module):
                official_key = ".".join(filter(None, (official.format(**match.groupdict()), param)))
                parts.setdefault(official_key, {})[part] = np.asarray(value)
                counts[official_key] = count
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"no counterpart in the official MAE for {sorted(unknown, key=_natural)}")
    incomplete = sorted((key for key, got in parts.items() if len(got) != counts[key]), key=_natural)
    if incomplete:
        raise ValueError(f"q, k and v are not all there for {incomplete}")
    return {key: np.concatenate([got[part] for part in range(counts[key])]) for key, got in parts.items()}


# ---------------------------------------------------------------------------------------------------
# Hub spelling of the names (transformers 4, the Hub's files) <-> transformers 5 module names
# ---------------------------------------------------------------------------------------------------
# Submodule of a block: transformers 5 name -> Hub name (layernorm_before/after are the same in both).
_HUB_BLOCK = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_FROM_HUB_BLOCK = {hub: module for module, hub in _HUB_BLOCK.items()}
# Stacks of blocks: transformers 5 name -> Hub name.
_HUB_STACKS = {"vit.layers": "vit.encoder.layer", "decoder.decoder_layers": "decoder.decoder_layers"}
# Any stack name found in files -> transformers 5 name; transformers 5's save_pretrained writes the decoder's
# stack as decoder.decoder_encoder.layer.
_FROM_FILE_STACKS = {
    **{name: name for name in _HUB_STACKS},
    **{hub: module for module, hub in _HUB_STACKS.items()},
    "decoder.decoder_encoder.layer": "decoder.decoder_layers",
}
_BLOCK_KEY = re.compile(r"(?P<stack>.+?)\.(?P<i>\d+)\.(?P<module>.+)\.(?P<param>weight|bias)")
# Top-level modules of transformers' models; a base model (ViTMAEModel, ViTModel) saved alone lacks the `vit.`.
_TOP_LEVEL = ("vit.", "decoder.", "classifier.")


def _hub_name(key: str) -> str:
    match = _BLOCK_KEY.fullmatch(key)
    if not match or match["stack"] not in _HUB_STACKS:
        return key
    module = _HUB_BLOCK.get(match["module"], match["module"])
    return f"{_HUB_STACKS[match['stack']]}.{match['i']}.{module}.{match['param']}"


def _module_name(key: str) -> str:
    key = key if key.startswith(_TOP_LEVEL) else f"vit.{key}"
    match = _BLOCK_KEY.fullmatch(key)
    if not match or match["stack"] not in _FROM_FILE_STACKS:
        return key
    module = _FROM_HUB_BLOCK.get(match["module"], match["module"])
    return f"{_FROM_FILE_STACKS[match['stack']]}.{match['i']}.{module}.{match['param']}"


def to_hub_names(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 5 module names (`official_to_hf`) spelled as the Hub's files and transformers 4 spell them."""
    return {_hub_name(key): value for key, value in state_dict.items()}


def to_module_names(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 5 module names, with the `vit.` prefix, of a file's keys in any of the spellings above."""
    return {_module_name(key): value for key, value in state_dict.items()}


# ---------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------
PRETRAINING, MAE_ENCODER = "ViTMAEForPreTraining", "ViTMAEModel"
VIT_CLASSIFIER, VIT_ENCODER = "ViTForImageClassification", "ViTModel"
_ARCHITECTURES = {"vit_mae": (PRETRAINING, MAE_ENCODER), "vit": (VIT_CLASSIFIER, VIT_ENCODER)}
# Modules of those models that no MAE has: left out on import, with a log line.
_NOT_IN_MAE = ("classifier.", "vit.pooler.")


def _vit_config_json(encoder: EncoderConfig) -> dict[str, Any]:
    return {
        "hidden_size": encoder.width,
        "num_hidden_layers": encoder.depth,
        "num_attention_heads": encoder.num_heads,
        "intermediate_size": encoder.mlp_ratio * encoder.width,
        "hidden_act": "gelu",  # exact erf GELU
        "layer_norm_eps": LAYER_NORM_EPS,
        "qkv_bias": True,
        "image_size": encoder.image_size,
        "patch_size": encoder.patch_size,
        "num_channels": encoder.num_channels,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "dtype": "float32",
    }


def mae_config_json(config: MAEConfig, mask_ratio: float, architecture: str = PRETRAINING) -> dict[str, Any]:
    """config.json of transformers' ViTMAE (`architecture` PRETRAINING or MAE_ENCODER) of the same model."""
    return {
        "architectures": [architecture],
        "model_type": "vit_mae",
        **_vit_config_json(config.encoder),
        "decoder_hidden_size": config.decoder_width,
        "decoder_num_hidden_layers": config.decoder_depth,
        "decoder_num_attention_heads": config.decoder_heads,
        "decoder_intermediate_size": config.encoder.mlp_ratio * config.decoder_width,
        "mask_ratio": mask_ratio,
        "norm_pix_loss": config.norm_pix_loss,
    }


def classifier_config_json(encoder: EncoderConfig, num_classes: int) -> dict[str, Any]:
    """config.json of transformers' ViTForImageClassification with this encoder and `num_classes` labels."""
    return {
        "architectures": [VIT_CLASSIFIER],
        "model_type": "vit",
        **_vit_config_json(encoder),
        "id2label": {str(label): f"LABEL_{label}" for label in range(num_classes)},
        "label2id": {f"LABEL_{label}": label for label in range(num_classes)},
    }


def transformers_config(config: MAEConfig, mask_ratio: float) -> transformers.ViTMAEConfig:
    """transformers' `ViTMAEConfig` of the same architecture and loss."""
    try:
        import transformers
    except ImportError:
        raise ConvertError(
            "transformers' ViTMAE needs the transformers package, which is not installed: `pip install transformers`"
        ) from None
    return transformers.ViTMAEConfig.from_dict(mae_config_json(config, mask_ratio))


def _setting(hf_config: Mapping[str, Any], name: str) -> Any:
    if name not in hf_config:
        raise ConvertError(f"config.json has no {name}")
    return hf_config[name]


def _square(hf_config: Mapping[str, Any], name: str) -> int:
    value = _setting(hf_config, name)
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise ConvertError(f"config.json's {name} is {value}: mae_jax's ViT has square images and patches")
        value = value[0]
    return int(value)


def read_config(
    hf_config: Mapping[str, Any], *, norm_pix_loss: bool | None = None, official_layer_norm_eps: bool = False
) -> tuple[str, MAEConfig]:
    """(architecture, MAEConfig) of a config.json, refusing in one line what mae_jax cannot compute exactly.

    `norm_pix_loss` left out is the ViTMAE config's (True for a ViT, which has no loss). LayerNorm eps: mae_jax
    computes with the official 1e-6; `official_layer_norm_eps` accepts a config that says otherwise, for weights
    trained with 1e-6 under a config left at transformers' default 1e-12 (facebook/vit-mae-*, converted from the
    official files). ViT classifiers and encoders get the official 512 x 8 decoder (16 heads).
    """
    model_type = hf_config.get("model_type")
    if model_type not in _ARCHITECTURES:
        known = "; ".join(f"{name!r}: {', '.join(models)}" for name, models in _ARCHITECTURES.items())
        raise ConvertError(f"config.json's model_type is {model_type!r}: mae_jax imports {known}")
    architectures = hf_config.get("architectures")
    if architectures and (len(architectures) != 1 or architectures[0] not in _ARCHITECTURES[model_type]):
        known = ", ".join(_ARCHITECTURES[model_type])
        raise ConvertError(f"config.json's architectures are {architectures}: mae_jax imports one of {known}")
    architecture = architectures[0] if architectures else f"{model_type} model"
    eps = _setting(hf_config, "layer_norm_eps")
    if eps != LAYER_NORM_EPS:
        if not official_layer_norm_eps:
            raise ConvertError(
                f"config.json's layer_norm_eps is {eps:g}, but mae_jax's LayerNorm uses the official MAE's "
                f"{LAYER_NORM_EPS:g}, so the model would compute differently; for weights trained with 1e-6 "
                "under a transformers-default config (facebook/vit-mae-*, converted from the official files) "
                "import with `python -m mae_jax.convert import SRC OUT --official-layer-norm-eps`"
            )
        logging.warning(
            "config.json's layer_norm_eps is %g; mae_jax computes with the official %g", eps, LAYER_NORM_EPS
        )
    if (act := _setting(hf_config, "hidden_act")) != "gelu":
        raise ConvertError(f"config.json's hidden_act is {act!r}: mae_jax's MLP computes the exact (erf) GELU, 'gelu'")
    if _setting(hf_config, "qkv_bias") is not True:
        raise ConvertError("config.json's qkv_bias is not true: mae_jax's attention has q, k and v biases")
    if (channels := _setting(hf_config, "num_channels")) < 1:
        raise ConvertError(f"config.json's num_channels is {channels}: an image has at least 1 channel")
    image_size, patch_size = _square(hf_config, "image_size"), _square(hf_config, "patch_size")
    if image_size % patch_size:
        raise ConvertError(f"config.json's image_size {image_size} is not a multiple of its patch_size {patch_size}")
    width, hidden = _setting(hf_config, "hidden_size"), _setting(hf_config, "intermediate_size")
    if hidden % width:
        raise ConvertError(f"config.json's intermediate_size {hidden} is not a multiple of its hidden_size {width}")
    encoder = EncoderConfig(
        image_size,
        patch_size,
        width,
        _setting(hf_config, "num_hidden_layers"),
        _setting(hf_config, "num_attention_heads"),
        hidden // width,
        num_channels=channels,
    )
    if model_type == "vit":
        return architecture, MAEConfig(encoder, norm_pix_loss=True if norm_pix_loss is None else norm_pix_loss)
    decoder_width = _setting(hf_config, "decoder_hidden_size")
    if (decoder_hidden := _setting(hf_config, "decoder_intermediate_size")) != encoder.mlp_ratio * decoder_width:
        raise ConvertError(
            f"config.json's decoder_intermediate_size {decoder_hidden} is not {encoder.mlp_ratio} x "
            f"decoder_hidden_size {decoder_width}: mae_jax's decoder MLP has the encoder's ratio"
        )
    config = MAEConfig(
        encoder,
        decoder_width,
        _setting(hf_config, "decoder_num_hidden_layers"),
        _setting(hf_config, "decoder_num_attention_heads"),
        bool(_setting(hf_config, "norm_pix_loss")) if norm_pix_loss is None else norm_pix_loss,
    )
    return architecture, config


# ---------------------------------------------------------------------------------------------------
# Directories
# ---------------------------------------------------------------------------------------------------
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # shards: {"weight_map": {key: shard file}}
PTH_WEIGHTS_FILE = "pytorch_model.bin"  # older directories; needs torch


def is_model_dir(path: str | epath.Path) -> bool:
    """Whether `path` is a Hugging Face model directory (it holds config.json)."""
    return (epath.Path(path) / CONFIG_FILE).is_file()


def _read_json(path: epath.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConvertError(f"{path} is not JSON ({error.msg} at line {error.lineno})") from None


def _load_weights(directory: epath.Path) -> dict[str, np.ndarray]:
    if (directory / WEIGHTS_FILE).exists():
        return load_safetensors(directory / WEIGHTS_FILE)
    if (directory / WEIGHTS_INDEX_FILE).exists():
        weight_map = _read_json(directory / WEIGHTS_INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConvertError(f"{directory / WEIGHTS_INDEX_FILE} has no weight_map")
        weights = {}
        for shard in sorted(set(weight_map.values())):
            weights.update(load_safetensors(directory / shard))
        return weights
    if (directory / PTH_WEIGHTS_FILE).exists():
        return load_pth(directory / PTH_WEIGHTS_FILE)
    raise ConvertError(
        f"{directory} holds {CONFIG_FILE} but no {WEIGHTS_FILE}, {WEIGHTS_INDEX_FILE} or {PTH_WEIGHTS_FILE}"
    )


def load_dir(
    directory: str | epath.Path, *, norm_pix_loss: bool | None = None, official_layer_norm_eps: bool = False
) -> tuple[MAEConfig, dict[str, np.ndarray]]:
    """(config, official state_dict) of a transformers ViTMAE or ViT directory (see `read_config`).

    A classifier's head and a ViTModel's pooler are left out, with a log line: the encoder is imported. An
    encoder-only model gives the encoder's keys alone (`official.from_official` adds a decoder if asked).
    """
    directory = epath.Path(directory)
    architecture, config = read_config(
        _read_json(directory / CONFIG_FILE),
        norm_pix_loss=norm_pix_loss,
        official_layer_norm_eps=official_layer_norm_eps,
    )
    weights = to_module_names(_load_weights(directory))
    left_out = sorted(key for key in weights if key.startswith(_NOT_IN_MAE))
    if left_out:
        logging.info("Leaving out the %s's %s: the encoder alone is imported", architecture, ", ".join(left_out))
    try:
        return config, hf_to_official({key: value for key, value in weights.items() if key not in left_out})
    except ValueError as error:
        raise ConvertError(f"{directory} is not a {architecture} mae_jax can read: {error}") from None


def _write_dir(directory: epath.Path, hf_config: dict[str, Any], weights: Mapping[str, np.ndarray]) -> None:
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if (directory / name).exists():
            raise ConvertError(f"{directory / name} already exists; choose a new output directory")
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(directory / WEIGHTS_FILE, weights)
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")


def save_mae_dir(
    directory: str | epath.Path, state_dict: Mapping[str, np.ndarray], config: MAEConfig, mask_ratio: float
) -> str:
    """A directory that transformers' ViTMAEForPreTraining (or, for an encoder-only state_dict, ViTMAEModel)
    loads with `from_pretrained`, from an official state_dict; returns the architecture written."""
    encoder_only = "mask_token" not in state_dict
    weights = to_hub_names(official_to_hf(state_dict))
    if encoder_only:  # ViTMAEModel's save_pretrained writes its own names, without the `vit.`
        weights = {key.removeprefix("vit."): value for key, value in weights.items()}
    architecture = MAE_ENCODER if encoder_only else PRETRAINING
    _write_dir(epath.Path(directory), mae_config_json(config, mask_ratio, architecture), weights)
    return architecture


def save_classifier_dir(
    directory: str | epath.Path, state_dict: Mapping[str, np.ndarray], encoder: EncoderConfig
) -> None:
    """A ViTForImageClassification directory of an official-layout classifier, where it computes the same logits.

    transformers' ViTForImageClassification classifies the cls token after the encoder's final LayerNorm with one
    linear layer: fine-tuning with the cls token is that model, and a linear probe is once its BatchNorm is folded
    into the linear layer. A global-pool classifier (mean of the patch tokens, fc_norm, no final norm) is not,
    and is refused.
    """
    kind = classifier_kind(state_dict)
    if kind == GLOBAL_POOL:
        raise ConvertError(
            "transformers' ViTForImageClassification classifies the cls token after the final LayerNorm; this "
            "classifier averages the patch tokens through fc_norm (global pool), which it cannot compute: "
            "export it with --format=timm or --format=official"
        )
    if kind != CLS_TOKEN:
        logging.info("Folding the linear probe's BatchNorm (running statistics) into its linear head")
        state_dict = fold_probe_batch_norm(state_dict)
    encoder_keys = {key: value for key, value in state_dict.items() if not key.startswith("head.")}
    weights = to_hub_names(official_to_hf(encoder_keys))
    weights |= {"classifier.weight": state_dict["head.weight"], "classifier.bias": state_dict["head.bias"]}
    num_classes = state_dict["head.weight"].shape[0]
    _write_dir(epath.Path(directory), classifier_config_json(encoder, num_classes), weights)
