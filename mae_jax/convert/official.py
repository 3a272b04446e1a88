"""Official facebookresearch/mae state_dicts (`MaskedAutoencoderViT`) <-> mae_jax parameters, and their files.

`KEY_TABLE` is the single description of the layout: official module name, mae_jax module path, and the kind
of module, which fixes the parameter names and the axis permutation. Both directions are derived from it.
Fine-tuned classifiers (`classifier_to_official`, the official `models_vit.py` / `main_linprobe.py` layout) add
a head to the encoder in one of three kinds (`classifier_kind`), which the other formats represent differently.
`.pth` files need PyTorch (not a dependency); `.safetensors` files, in the same key layout, need only numpy.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import re
import types
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from absl import logging
from etils import epath
from flax import nnx

from mae_jax.models.mae import MAE, MAEConfig, abstract_model_state
from mae_jax.models.vit import VARIANTS, EncoderConfig, scanned_layout, sincos_2d, unrolled, unrolled_layout

ARRAY, LINEAR, CONV, NORM = "array", "linear", "conv", "norm"

# Kind -> (official parameter suffix, mae_jax parameter suffix, axes of the official array in mae_jax order).
PARAMS_OF_KIND: dict[str, tuple[tuple[str, str, tuple[int, ...] | None], ...]] = {
    ARRAY: (("", "", None),),  # cls/mask tokens and position tables: same shape on both sides
    LINEAR: (("weight", "kernel", (1, 0)), ("bias", "bias", None)),  # torch (out, in) -> flax (in, out)
    CONV: (("weight", "kernel", (2, 3, 1, 0)), ("bias", "bias", None)),  # torch (D, C, p, p) -> flax (p, p, C, D)
    NORM: (("weight", "scale", None), ("bias", "bias", None)),
}

# Submodules of a transformer block; the names are the same on both sides.
_BLOCK = (
    ("norm1", NORM),
    ("attn.qkv", LINEAR),
    ("attn.proj", LINEAR),
    ("norm2", NORM),
    ("mlp.fc1", LINEAR),
    ("mlp.fc2", LINEAR),
)

# (official module, mae_jax module path, kind); `{i}` is a block index.
KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    ("cls_token", "encoder.cls_token", ARRAY),
    ("pos_embed", "encoder.pos_embed", ARRAY),
    ("patch_embed.proj", "encoder.patch_embed.proj", CONV),
    *((f"blocks.{{i}}.{name}", f"encoder.blocks.{{i}}.{name}", kind) for name, kind in _BLOCK),
    ("norm", "encoder.norm", NORM),
    ("decoder_embed", "decoder.embed", LINEAR),
    ("mask_token", "decoder.mask_token", ARRAY),
    ("decoder_pos_embed", "decoder.pos_embed", ARRAY),
    *((f"decoder_blocks.{{i}}.{name}", f"decoder.blocks.{{i}}.{name}", kind) for name, kind in _BLOCK),
    ("decoder_norm", "decoder.norm", NORM),
    ("decoder_pred", "decoder.pred", LINEAR),
)

# Official decoders always have 16 heads (`MaskedAutoencoderViT(decoder_num_heads=16)`); files cannot say.
OFFICIAL_DECODER_HEADS = 16
# Keys of fine-tuned classifiers, which are not MAE pretraining checkpoints.
_CLASSIFIER_PREFIXES = ("head.", "fc_norm.")


class ConvertError(ValueError):
    """A conversion that cannot be done as asked (a file that cannot be read or written, a missing PyTorch or
    transformers, a model that the other format cannot represent exactly); the message is one line saying why."""


class _Rule(NamedTuple):
    ours: re.Pattern[str]
    official: str  # format string with {i}
    axes: tuple[int, ...] | None  # official axes in mae_jax order: ours = official.transpose(axes)
    section: int  # rules of one block share a section, so that keys sort block by block, in table order


def _rules() -> list[_Rule]:
    rules, sections = [], {}
    for official, ours, kind in KEY_TABLE:
        section = sections.setdefault(official.partition("{i}")[0] if "{i}" in official else official, len(sections))
        for official_suffix, our_suffix, axes in PARAMS_OF_KIND[kind]:
            our_path = ".".join(filter(None, (ours, our_suffix)))
            pattern = re.escape(our_path).replace(re.escape("{i}"), r"(?P<i>\d+)")
            official_key = ".".join(filter(None, (official, official_suffix)))
            rules.append(_Rule(re.compile(pattern), official_key, axes, section))
    return rules


_RULES = _rules()


def _match(path: str) -> tuple[str, tuple[int, ...] | None, tuple[int, int, int]]:
    for order, rule in enumerate(_RULES):
        if match := rule.ours.fullmatch(path):
            index = match.groupdict().get("i")
            return rule.official.format(i=index), rule.axes, (rule.section, int(index or 0), order)
    raise KeyError(f"no official key for mae_jax parameter {path!r}")


def official_key(path: str) -> tuple[str, tuple[int, ...] | None]:
    """The official key of a mae_jax path like `encoder.blocks.3.attn.qkv.kernel`, and its axis permutation."""
    key, axes, _ = _match(path)
    return key, axes


def _inverse(axes: tuple[int, ...] | None) -> tuple[int, ...] | None:
    return None if axes is None else tuple(int(a) for a in np.argsort(axes))


def _flatten(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        tree = tree[int(part)] if part.isdigit() and int(part) in tree else tree[part]  # nnx.List keys are ints
    tree[leaf] = value


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; .float() also covers bfloat16, which numpy lacks
        return value.detach().cpu().float().numpy()
    return np.asarray(value)


def describe(config: MAEConfig) -> str:
    """A name like 'ViT B/16 MAE' for messages."""
    enc = config.encoder
    names = [name for name, shape in VARIANTS.items() if shape == (enc.width, enc.depth, enc.num_heads)]
    body = names[0] if names else f"(width {enc.width}, depth {enc.depth}, {enc.num_heads} heads)"
    return (
        f"ViT {body}/{enc.patch_size} MAE at {enc.image_size} px with a {config.decoder_width}-wide "
        f"{config.decoder_depth}-block decoder"
    )


def to_official(state: nnx.State | Mapping, *, encoder_only: bool = False) -> dict[str, np.ndarray]:
    """The official state_dict of an `MAE` state (or an `Encoder` state alone), as numpy arrays; stacked
    blocks (`Compute.scan_blocks`) are split into the official per-block keys."""
    pure = unrolled_layout(nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state)
    if "encoder" not in pure and "decoder" not in pure:
        pure = {"encoder": pure}  # the state of an `Encoder` module
    out = []
    for path, value in _flatten(pure):
        if encoder_only and path.startswith("decoder."):
            continue
        key, axes, order = _match(path)
        array = np.asarray(jax.device_get(value))
        out.append((order, key, np.array(array if axes is None else array.transpose(_inverse(axes)), order="C")))
    return {key: array for _, key, array in sorted(out, key=lambda item: item[0])}  # in the official module order


def classifier_to_official(state: nnx.State | Mapping) -> dict[str, np.ndarray]:
    """The official (timm `VisionTransformer`) state_dict of a `models.classifier.Classifier` state.

    Fine-tuned with global pooling: `fc_norm.*` replaces the encoder's `norm.*`, as in `models_vit.py`.
    Linear probe: the head is `head.0` (BatchNorm1d without affine: running statistics) + `head.1` (Linear),
    as `main_linprobe.py` builds it.
    """
    pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
    out = to_official({"encoder": pure["encoder"]}, encoder_only=True)
    if "fc_norm" in pure:
        out = {key: value for key, value in out.items() if not key.startswith("norm.")}
        out["fc_norm.weight"] = _to_numpy(pure["fc_norm"]["scale"])
        out["fc_norm.bias"] = _to_numpy(pure["fc_norm"]["bias"])
    head = "head"
    if "head_norm" in pure:
        out["head.0.running_mean"] = _to_numpy(pure["head_norm"]["mean"])
        out["head.0.running_var"] = _to_numpy(pure["head_norm"]["var"])
        head = "head.1"
    out[f"{head}.weight"] = np.ascontiguousarray(_to_numpy(pure["head"]["kernel"]).T)
    out[f"{head}.bias"] = _to_numpy(pure["head"]["bias"])
    return out


# Kinds of fine-tuned classifier in the official layout, by the keys their heads add to the encoder.
GLOBAL_POOL, CLS_TOKEN, LINEAR_PROBE = "global_pool", "cls_token", "linear_probe"
# `main_linprobe.py`'s head: BatchNorm1d(affine=False, eps=1e-6) on the cls token, then the linear layer.
PROBE_BATCH_NORM_EPS = 1e-6


def is_classifier(state_dict: Mapping[str, Any]) -> bool:
    """Whether an official-layout state_dict is a fine-tuned classifier (it has a head) rather than an MAE."""
    return any(key.startswith(_CLASSIFIER_PREFIXES) for key in state_dict)


def classifier_kind(state_dict: Mapping[str, Any]) -> str:
    """GLOBAL_POOL (fc_norm of the mean patch token, no final norm: `models_vit.py` fine-tuning), CLS_TOKEN (the
    cls token after the final norm; fine-tuning with global_pool=False) or LINEAR_PROBE (`main_linprobe.py`)."""
    if "fc_norm.weight" in state_dict and "head.weight" in state_dict and "norm.weight" not in state_dict:
        return GLOBAL_POOL
    if "norm.weight" in state_dict and "head.weight" in state_dict and "fc_norm.weight" not in state_dict:
        return CLS_TOKEN
    if {"norm.weight", "head.0.running_mean", "head.0.running_var", "head.1.weight"} <= set(state_dict):
        return LINEAR_PROBE
    raise ConvertError(
        "not a classifier in the official layout: expected fc_norm.* + head.* (global pool), norm.* + head.* "
        "(cls token) or norm.* + head.0.running_mean/var + head.1.* (linear probe)"
    )


def fold_probe_batch_norm(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A linear probe with its BatchNorm (running statistics, no affine) folded into one linear `head`.

    BatchNorm then Linear is one affine map: W' = W / sqrt(var + eps) (column-wise), b' = b - W' @ mean. It is
    computed in float64 and rounded once to float32, so the logits agree with the two-layer head up to float32
    rounding; other heads are returned as they are.
    """
    if classifier_kind(state_dict) != LINEAR_PROBE:
        return dict(state_dict)
    mean = np.asarray(state_dict["head.0.running_mean"], np.float64)
    inv_std = 1.0 / np.sqrt(np.asarray(state_dict["head.0.running_var"], np.float64) + PROBE_BATCH_NORM_EPS)
    weight = np.asarray(state_dict["head.1.weight"], np.float64) * inv_std[None, :]
    bias = np.asarray(state_dict["head.1.bias"], np.float64) - weight @ mean
    out = {key: value for key, value in state_dict.items() if not key.startswith("head.")}
    out["head.weight"] = weight.astype(np.float32)
    out["head.bias"] = bias.astype(np.float32)
    return out


def encoder_of_classifier(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The MAE encoder keys of a classifier (its head left out, with a log line); a global-pool classifier has
    no final norm (fc_norm replaced it), so its encoder is not an MAE encoder and is refused."""
    if classifier_kind(state_dict) == GLOBAL_POOL:
        raise ConvertError(
            "a global-pool classifier (fc_norm.*, no norm.*) holds no complete MAE encoder: fine-tuning replaced "
            "the encoder's final norm by fc_norm"
        )
    head = sorted(key for key in state_dict if key.startswith(_CLASSIFIER_PREFIXES))
    logging.info("Leaving out the classifier head (%s): the encoder alone is imported", ", ".join(head))
    return {key: value for key, value in state_dict.items() if key not in head}


def _block_count(state_dict: Mapping[str, Any], prefix: str) -> int:
    indices = {int(m.group(1)) for key in state_dict if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def infer_config(
    state_dict: Mapping[str, Any],
    *,
    variant: str | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
    decoder_heads: int = OFFICIAL_DECODER_HEADS,
    norm_pix_loss: bool = True,
) -> MAEConfig:
    """The MAEConfig of an official state_dict, read off its shapes.

    Head counts are not visible in the weights: the encoder's come from `num_heads`, the variant, or the known
    variants of that width and depth; the decoder's from `decoder_heads` (16 in every official model). Whether
    the file was trained with norm-pix targets is not visible either: pass `norm_pix_loss`. Files without a
    decoder get the official 512-wide, 8-block decoder. The channel count is the patch embedding's `in_chans`.
    """
    if variant is not None:
        encoder = EncoderConfig.from_variant(variant)
        if num_heads is not None:
            encoder = dataclasses.replace(encoder, num_heads=num_heads)
    else:
        for key in ("patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
            if key not in state_dict:
                raise ValueError(f"cannot infer the model shape: {key} is missing; pass the variant")
        width, _, _, patch = state_dict["patch_embed.proj.weight"].shape
        depth = _block_count(state_dict, "blocks")
        if num_heads is None:
            heads = [h for (w, d, h) in VARIANTS.values() if (w, d) == (width, depth)]
            if not heads:
                raise ValueError(f"no known ViT has width {width} and depth {depth}: pass the number of heads")
            num_heads = heads[0]
        mlp_ratio = state_dict["blocks.0.mlp.fc1.weight"].shape[0] // width
        encoder = EncoderConfig(224, patch, width, depth, num_heads, mlp_ratio)
    if image_size is None:
        if "pos_embed" not in state_dict:
            raise ValueError("cannot infer the image size: pos_embed is missing; pass the image size")
        num_patches = state_dict["pos_embed"].shape[1] - 1
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ValueError(f"pos_embed holds 1 + {num_patches} tokens, not 1 + G*G; pass the image size")
        image_size = grid * encoder.patch_size
    encoder = dataclasses.replace(encoder, image_size=image_size, num_channels=_in_chans(state_dict, encoder))
    if "decoder_embed.weight" not in state_dict:
        return MAEConfig(encoder, decoder_heads=decoder_heads, norm_pix_loss=norm_pix_loss)
    decoder_width = state_dict["decoder_embed.weight"].shape[0]
    decoder_depth = _block_count(state_dict, "decoder_blocks")
    return MAEConfig(encoder, decoder_width, decoder_depth, decoder_heads, norm_pix_loss)


def _in_chans(state_dict: Mapping[str, Any], encoder: EncoderConfig) -> int:
    """The official model's `in_chans`: the patch embedding's input channels (3 when it is missing), which the
    decoder's prediction (p * p * in_chans values per patch) must agree with."""
    if "patch_embed.proj.weight" not in state_dict:
        return encoder.num_channels
    in_chans = state_dict["patch_embed.proj.weight"].shape[1]
    if "decoder_pred.weight" in state_dict:
        predicted = state_dict["decoder_pred.weight"].shape[0]
        if predicted != encoder.patch_size**2 * in_chans:
            raise ValueError(
                f"decoder_pred predicts {predicted} values per patch, not patch {encoder.patch_size}^2 x in_chans "
                f"{in_chans} (patch_embed.proj.weight)"
            )
    return in_chans


def from_official(
    state_dict: Mapping[str, Any],
    config: MAEConfig,
    encoder_only_ok: bool = True,
    *,
    fresh_decoder: bool = True,
    decoder_seed: int = 0,
) -> nnx.State:
    """The mae_jax state of an official state_dict, checked key by key and shape by shape against `config`.

    An encoder-only file (the released `mae_pretrain_vit_*.pth`) is accepted when `encoder_only_ok`: the
    decoder then is the one of a fresh `MAE(config, rngs=nnx.Rngs(decoder_seed))`, with the fixed sin-cos
    decoder position table, or, without `fresh_decoder`, the state is `{"encoder": ...}` alone. Any other
    difference raises one ValueError that lists every offending key. The state has the layout of `config`:
    its blocks stacked with `compute.scan_blocks`.
    """
    if config.compute.scan_blocks:
        return scanned_layout(
            from_official(
                state_dict, unrolled(config), encoder_only_ok, fresh_decoder=fresh_decoder, decoder_seed=decoder_seed
            )
        )
    state = abstract_model_state(config)
    expected = {}  # official key -> (mae_jax path, axes, abstract leaf)
    for path, leaf in _flatten(nnx.to_pure_dict(state)):
        key, axes = official_key(path)
        expected[key] = (path, axes, leaf)

    decoder_keys = {key for key, (path, _, _) in expected.items() if path.startswith("decoder.")}
    missing = set(expected) - set(state_dict)
    encoder_only = encoder_only_ok and decoder_keys <= missing
    if encoder_only:
        missing -= decoder_keys
    unexpected = set(state_dict) - set(expected)
    mismatched = []
    for key in sorted(set(expected) & set(state_dict), key=_natural):
        path, axes, leaf = expected[key]
        official_shape = tuple(leaf.shape) if axes is None else tuple(leaf.shape[a] for a in _inverse(axes))
        if tuple(state_dict[key].shape) != official_shape:
            mismatched.append(f"{key}: file {tuple(state_dict[key].shape)} vs model {official_shape}")
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing {sorted(missing, key=_natural)}")
        if unexpected:
            problems.append(f"unexpected {sorted(unexpected, key=_natural)}")
        if mismatched:
            problems.append(f"shape mismatch [{', '.join(mismatched)}]")
        message = f"checkpoint does not match {describe(config)}: {'; '.join(problems)}"
        if any(key.startswith(_CLASSIFIER_PREFIXES) for key in unexpected):
            message += " (head.*/fc_norm.* belong to a fine-tuned classifier, not to an MAE pretraining checkpoint)"
        raise ValueError(message)

    if encoder_only and not fresh_decoder:
        state = nnx.State({"encoder": state["encoder"]})
        expected = {key: value for key, value in expected.items() if key not in decoder_keys}
    pure = nnx.to_pure_dict(state)
    if encoder_only and fresh_decoder:
        logging.warning(
            "Checkpoint has no decoder (encoder-only file): the decoder is a fresh init of "
            "MAE(config, rngs=nnx.Rngs(%d)) with the fixed sin-cos position table.",
            decoder_seed,
        )
        pure["decoder"] = nnx.to_pure_dict(nnx.state(MAE(config, rngs=nnx.Rngs(decoder_seed))))["decoder"]
    for key in set(expected) & set(state_dict):
        path, axes, leaf = expected[key]
        array = _to_numpy(state_dict[key])
        _set(pure, path, jnp.asarray(array if axes is None else array.transpose(axes), dtype=leaf.dtype))
    _warn_on_unusual_position_tables(pure, config)
    nnx.replace_by_pure_dict(state, pure)
    return state


def _warn_on_unusual_position_tables(pure: dict, config: MAEConfig) -> None:
    """Position tables are fixed; one that is not the official sin-cos table is loaded as is, but flagged."""
    grid = config.encoder.grid_size
    for part, width in (("encoder", config.encoder.width), ("decoder", config.decoder_width)):
        if part not in pure:
            continue
        error = float(np.max(np.abs(np.asarray(pure[part]["pos_embed"])[0] - sincos_2d(width, grid))))
        if error > 1e-5:
            logging.warning("The %s position table differs from the sin-cos table by up to %.3g", part, error)


# ---------------------------------------------------------------------------------------------------
# Files: official .pth (needs PyTorch) and .safetensors (numpy only), both in the official key layout
# ---------------------------------------------------------------------------------------------------
SAFETENSORS_SUFFIX = ".safetensors"
# What fine-tuning and linear probing write into their workdir: the official (timm) classifier state_dict as
# safetensors (needs no PyTorch), and as the official code saves it when PyTorch is installed.
CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_PTH_FILE = "classifier.pth"


def _import_torch() -> types.ModuleType:
    """torch, which only .pth files need (it is not a dependency of mae_jax)."""
    try:
        import torch
    except ImportError:
        raise ConvertError(
            ".pth files need PyTorch, which is not installed: `pip install torch` (or use a .safetensors file)"
        ) from None
    return torch


def torch_available() -> bool:
    """Whether .pth files can be read and written here."""
    try:
        _import_torch()
    except ConvertError:
        return False
    return True


def _read_bytes(path: str | epath.Path) -> bytes:
    path = epath.Path(path)
    if not path.is_file():
        raise ConvertError(f"{path} does not exist")
    return path.read_bytes()


def load_pth(path: str | epath.Path) -> dict[str, np.ndarray]:
    """An official `.pth` file's state_dict (its 'model' entry if present), without unpickling code."""
    torch = _import_torch()
    data = _read_bytes(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # training checkpoints also hold their `args`
            checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError... for other files
        raise ConvertError(
            f"{path} is not a PyTorch checkpoint that loads without running code ({type(error).__name__})"
        ) from error
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ConvertError(f"{path} holds no state_dict (a dict of tensors, alone or under 'model')")
    return {key: _to_numpy(value) for key, value in state_dict.items()}


def save_pth(path: str | epath.Path, state_dict: Mapping[str, np.ndarray]) -> None:
    """Write `{'model': state_dict}` as the official code does, with contiguous float32 tensors."""
    torch = _import_torch()
    model = {key: torch.tensor(np.asarray(value, dtype=np.float32)).contiguous() for key, value in state_dict.items()}
    buffer = io.BytesIO()
    torch.save({"model": model}, buffer)
    epath.Path(path).write_bytes(buffer.getvalue())


def load_safetensors(path: str | epath.Path) -> dict[str, np.ndarray]:
    """A `.safetensors` file's arrays: a state_dict in the official layout, as `save_safetensors` writes it."""
    data = _read_bytes(path)
    try:
        return dict(safetensors.numpy.load(data))
    except Exception as error:  # SafetensorError, or a numpy dtype error for bfloat16 files
        raise ConvertError(f"{path} is not a .safetensors file numpy can read ({type(error).__name__})") from error


def save_safetensors(path: str | epath.Path, state_dict: Mapping[str, np.ndarray]) -> None:
    """The flat state_dict as contiguous float32 arrays (timm's and transformers' layout); needs no PyTorch."""
    arrays = {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in state_dict.items()}
    epath.Path(path).write_bytes(safetensors.numpy.save(arrays, metadata={"format": "pt"}))


def load_state_dict(path: str | epath.Path) -> dict[str, np.ndarray]:
    """An official-layout state_dict from a `.safetensors` file, or else from a `.pth` file."""
    return load_safetensors(path) if str(path).endswith(SAFETENSORS_SUFFIX) else load_pth(path)


def save_state_dict(path: str | epath.Path, state_dict: Mapping[str, np.ndarray]) -> None:
    """Write a `.safetensors` file when the name ends so, else an official `.pth` file."""
    (save_safetensors if str(path).endswith(SAFETENSORS_SUFFIX) else save_pth)(path, state_dict)
