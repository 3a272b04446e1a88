"""Every config key with its default, and the checks that run before anything compiles.

Config files in `configs/` start from `base_config()` and change what their recipe needs; a key that is
not defined here is an error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import jax
import ml_collections
from ml_collections import config_dict

from mae_jax import sharding
from mae_jax.models.mae import MAEConfig, num_kept
from mae_jax.models.vit import ATTENTION_IMPLEMENTATIONS, COMPUTE_DTYPES, VARIANTS, Compute


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key."""


def base_config() -> ml_collections.ConfigDict:
    """The paper's ViT-B/16 pretraining recipe on ImageNet-1k (800 epochs)."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.dataset = ml_collections.ConfigDict()
    # "tfds": dataset `name` from TFDS; "folder": `data_dir`/`split`/<class>/<image>, the ImageNet layout;
    # "demo": scikit-image's bundled photographs.
    config.dataset.source = "tfds"
    config.dataset.name = "imagenet2012"
    config.dataset.split = "train"
    config.dataset.data_dir = config_dict.placeholder(str)  # None with tfds: ~/tensorflow_datasets

    config.input = ml_collections.ConfigDict()
    config.input.num_threads = 16  # decoding/augmenting threads per host (per worker process with num_workers)
    config.input.num_workers = 0  # > 0: that many grain worker processes per host
    config.input.prefetch = 64  # examples read ahead per host

    config.image_size = 224
    config.mask_ratio = 0.75
    config.model = ml_collections.ConfigDict()
    config.model.variant = "B/16"  # encoder NAME/PATCH, NAME in models.vit.VARIANTS
    config.model.decoder_width = 512
    config.model.decoder_depth = 8
    config.model.decoder_heads = 16
    config.model.norm_pix_loss = True
    config.model.dtype = "float32"  # compute dtype, "float32" or "bfloat16"; params and optimizer stay float32
    config.model.attention = "xla"  # "xla" or "cudnn" (NVIDIA GPUs, bfloat16): jax.nn.dot_product_attention
    config.model.remat = False  # recompute block activations in the backward pass: less memory, more time
    config.model.mask_tokens_in_encoder = False  # the paper's slower baseline (Table 2): encoder sees all tokens

    config.batch_size = 4096  # global, over all hosts
    config.grad_accum_steps = 1  # > 1: the batch runs as that many micro-batches, one optimizer step
    config.mesh = ml_collections.ConfigDict()  # data x fsdp must be the device count; -1: the remaining devices
    config.mesh.data = -1  # data parallel: parameters replicated
    config.mesh.fsdp = 1  # fully sharded data parallel: weight kernels and their moments split over this axis
    config.num_epochs = 800
    config.warmup_epochs = 40
    config.total_steps = -1  # > 0 replaces num_epochs
    config.warmup_steps = -1  # >= 0 replaces warmup_epochs
    config.base_lr = 1.5e-4  # lr = base_lr * batch_size / 256
    config.min_lr = 0.0
    config.weight_decay = 0.05
    config.b1 = 0.9
    config.b2 = 0.95

    config.log_every_steps = 100
    config.image_every_steps = 5000  # reconstruction grid to TensorBoard
    config.num_images = 8  # samples in the reconstruction grid
    config.checkpoint_every_steps = 1000  # also at the end and on preemption (SIGTERM)
    config.keep_checkpoints = 3
    config.skip_nonfinite_steps = 0  # 0: stop at a non-finite loss/gradient; N: skip up to N in a row
    return config


def model_config(config: ml_collections.ConfigDict) -> MAEConfig:
    m = config.model
    return MAEConfig.from_variant(
        m.variant,
        config.image_size,
        decoder_width=m.decoder_width,
        decoder_depth=m.decoder_depth,
        decoder_heads=m.decoder_heads,
        norm_pix_loss=m.norm_pix_loss,
        compute=Compute(m.dtype, m.attention, m.remat),
        mask_tokens_in_encoder=m.mask_tokens_in_encoder,
    )


def _unknown_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, prefix: str = "") -> list:
    unknown = []
    for key, value in config.items():
        if key not in reference:
            unknown.append(prefix + key)
        elif isinstance(value, ml_collections.ConfigDict) and isinstance(reference[key], ml_collections.ConfigDict):
            unknown += _unknown_keys(value, reference[key], f"{prefix}{key}.")
    return unknown


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError with one line for the first value that cannot work."""
    unknown = _unknown_keys(config, base_config())
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; see mae_jax/configuration.py for the valid ones")
    name, _, patch = config.model.variant.partition("/")
    if name not in VARIANTS or not patch.isdigit() or int(patch) < 1:
        raise ConfigError(f"model.variant={config.model.variant!r} is not NAME/PATCH with NAME in {sorted(VARIANTS)}")
    if config.image_size % int(patch):
        raise ConfigError(f"image_size={config.image_size} is not divisible by the patch size {patch}")
    if not 0 <= config.mask_ratio < 1:
        raise ConfigError(f"mask_ratio={config.mask_ratio} must be in [0, 1)")
    num_patches = (config.image_size // int(patch)) ** 2
    if num_kept(num_patches, config.mask_ratio) < 1:
        raise ConfigError(f"mask_ratio={config.mask_ratio} keeps no patch of the {num_patches} in an image")
    if config.model.decoder_width % config.model.decoder_heads or config.model.decoder_width % 4:
        raise ConfigError(
            f"model.decoder_width={config.model.decoder_width} must be divisible by 4 and by "
            f"model.decoder_heads={config.model.decoder_heads}"
        )
    if config.model.dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"model.dtype={config.model.dtype!r} must be one of {COMPUTE_DTYPES}")
    if config.model.attention not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"model.attention={config.model.attention!r} must be one of {ATTENTION_IMPLEMENTATIONS}")
    if config.model.attention == "cudnn" and (jax.default_backend() != "gpu" or config.model.dtype != "bfloat16"):
        raise ConfigError("model.attention='cudnn' needs an NVIDIA GPU and model.dtype='bfloat16'")
    devices = jax.device_count()
    try:
        sharding.mesh_shape(config.mesh, devices)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.grad_accum_steps < 1:
        raise ConfigError(f"grad_accum_steps={config.grad_accum_steps} must be >= 1")
    per_step = devices * config.grad_accum_steps
    if config.batch_size < 1 or config.batch_size % per_step:
        raise ConfigError(
            f"batch_size={config.batch_size} is not a positive multiple of the {devices} devices"
            + (f" x grad_accum_steps={config.grad_accum_steps}" if config.grad_accum_steps > 1 else "")
        )
    if config.total_steps <= 0 and config.num_epochs <= 0:
        raise ConfigError("set num_epochs > 0 or total_steps > 0")
    if config.base_lr <= 0 or config.min_lr < 0:
        raise ConfigError(f"base_lr={config.base_lr} must be > 0 and min_lr={config.min_lr} >= 0")
    if config.dataset.source not in ("tfds", "folder", "demo"):
        raise ConfigError(f"dataset.source={config.dataset.source!r} must be 'tfds', 'folder' or 'demo'")
    if config.batch_size % jax.process_count():
        raise ConfigError(f"batch_size={config.batch_size} is not a multiple of the {jax.process_count()} hosts")
    if config.skip_nonfinite_steps < 0:
        raise ConfigError(f"skip_nonfinite_steps={config.skip_nonfinite_steps} must be >= 0")
    for key in ("log_every_steps", "image_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[key] < 1:
            raise ConfigError(f"{key}={config[key]} must be >= 1")
