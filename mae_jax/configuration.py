"""Every config key with its default, and the checks that run before anything compiles.

Config files in `configs/` start from `base_config()` and change what their recipe needs; a key that is
not defined here is an error, so a typo never silently falls back to a default. The command lines read
them with `parse_flags`, which reports a bad --config path or override in one line.
"""

from __future__ import annotations

import re
import sys
import types

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_dict

from mae_jax import sharding
from mae_jax.models.mae import MAEConfig, num_kept
from mae_jax.models.vit import ATTENTION_IMPLEMENTATIONS, COMPUTE_DTYPES, VARIANTS, Compute


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key."""


TASKS = ("pretrain", "finetune", "linprobe")
SOURCES = ("tfds", "folder", "fashion_mnist", "demo")  # input_pipeline.make_source


def base_config() -> ml_collections.ConfigDict:
    """The paper's ViT-B/16 pretraining recipe on ImageNet-1k (800 epochs)."""
    config = ml_collections.ConfigDict()
    config.task = "pretrain"
    config.seed = 0

    config.dataset = ml_collections.ConfigDict()
    # "tfds": dataset `name` from TFDS; "folder": `data_dir`/`split`/<class>/<image>, the ImageNet layout;
    # "fashion_mnist": the IDX files in `data_dir` (None: where `apt-get install dataset-fashion-mnist` puts
    # them), split "train" or "test"; "demo": scikit-image's bundled photographs (unlabeled).
    config.dataset.source = "tfds"
    config.dataset.name = "imagenet2012"
    config.dataset.split = "train"
    config.dataset.data_dir = config_dict.placeholder(str)  # None with tfds: ~/tensorflow_datasets

    config.input = ml_collections.ConfigDict()
    config.input.num_threads = 16  # decoding/augmenting threads per host (per worker process with num_workers)
    config.input.num_workers = 0  # > 0: that many grain worker processes per host
    config.input.prefetch = 64  # examples read ahead per host
    # Pretraining: the crop's bicubic resize runs on the accelerator (as costly as the JPEG decode on a host)
    config.input.resize_on_device = True

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
    # > 0: process 0 traces that many steps with jax.profiler into WORKDIR/plugins/profile (TensorBoard's
    # profile tab, XProf, Perfetto), starting a few steps after each (re)start, past the compile
    config.profile_steps = 0
    # Keep compiled steps in WORKDIR/compilation_cache (JAX's persistent cache), so that a restarted run skips
    # the compile; a cache directory set through JAX_COMPILATION_CACHE_DIR takes precedence
    config.compilation_cache = True

    config.knn = ml_collections.ConfigDict()  # weighted k-NN accuracy of the encoder's cls features, as DINO's
    config.knn.every_steps = 0  # > 0: kNN top-1 of the encoder's features every that many steps (and at the end)
    config.knn.train_split = "train"  # labeled examples the neighbours come from (same dataset.source/name)
    config.knn.eval_split = "test"
    # that many examples of each split, drawn with `seed`: stratified by class for folder and fashion_mnist,
    # uniform for tfds (its labels sit in the records); the same subsets at every evaluation
    config.knn.num_train = 10000
    config.knn.num_eval = 2000
    config.knn.k = 20
    config.knn.temperature = 0.07  # neighbour weight exp(cosine similarity / temperature)
    config.knn.batch_size = 256  # global, over all hosts
    return config


def downstream_config(task: str) -> ml_collections.ConfigDict:
    """The official ViT-B/16 fine-tuning ("finetune") or linear-probing ("linprobe") recipe on ImageNet-1k.

    Keys shared with pretraining mean the same; the model keys describe the classifier around the encoder.
    """
    if task not in TASKS[1:]:
        raise ValueError(f"downstream task {task!r} must be one of {TASKS[1:]}")
    finetune = task == "finetune"
    config = base_config()
    for key in ("mask_ratio", "image_every_steps", "num_images", "knn"):
        del config[key]
    for key in ("decoder_width", "decoder_depth", "decoder_heads", "norm_pix_loss", "mask_tokens_in_encoder"):
        del config.model[key]
    config.task = task
    config.dataset.eval_split = "validation"  # top-1/top-5 are measured on it
    # > 0: train on that many examples only (few-label experiments), drawn with `seed`: stratified by class
    # for folder and fashion_mnist, uniform for tfds; the same subset on every host and after a restart
    config.dataset.num_train = -1
    config.num_classes = 1000
    # The encoder to start from: a parameter directory (e.g. WORKDIR/encoder of a pretraining run), a
    # pretraining workdir (its newest checkpoint) or an official .pth; "" starts from random init.
    config.init = ""
    config.model.global_pool = finetune  # fine-tuning: mean of patch tokens + fc_norm; linprobe: cls token
    config.model.drop_path = 0.1 if finetune else 0.0  # 0.2 for L, 0.3 for H

    config.batch_size = 1024 if finetune else 16384
    config.num_epochs = 100 if finetune else 90
    config.warmup_epochs = 5 if finetune else 10
    config.base_lr = 5e-4 if finetune else 0.1  # lr = base_lr * batch_size / 256; fine-tuning L/H: 1e-3
    config.min_lr = 1e-6 if finetune else 0.0
    config.weight_decay = 0.05 if finetune else 0.0
    config.b2 = 0.999  # AdamW (fine-tuning); LARS (linprobe) has momentum b1 = 0.9
    config.layer_decay = 0.65 if finetune else 1.0  # layer-wise lr decay; 0.75 for L/H

    config.augment = ml_collections.ConfigDict()
    config.augment.rand_augment = finetune  # RandAugment rand-m9-mstd0.5-inc1
    config.augment.mixup = 0.8 if finetune else 0.0  # Beta(alpha, alpha); 0 switches it off
    config.augment.cutmix = 1.0 if finetune else 0.0
    config.augment.mixup_switch_prob = 0.5  # with both on: the share of batches that use cutmix
    config.augment.label_smoothing = 0.1 if finetune else 0.0
    config.augment.random_erasing = 0.25 if finetune else 0.0  # probability per image

    config.eval_every_steps = 1000  # also at the end
    config.eval_batch_size = 1024
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
    task = config.get("task", "pretrain")
    if task not in TASKS:
        raise ConfigError(f"task={task!r} must be one of {TASKS}")
    unknown = _unknown_keys(config, base_config() if task == "pretrain" else downstream_config(task))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; see mae_jax/configuration.py for the valid ones")
    name, _, patch = config.model.variant.partition("/")
    if name not in VARIANTS or not patch.isdigit() or int(patch) < 1:
        raise ConfigError(f"model.variant={config.model.variant!r} is not NAME/PATCH with NAME in {sorted(VARIANTS)}")
    if config.image_size % int(patch):
        raise ConfigError(f"image_size={config.image_size} is not divisible by the patch size {patch}")
    if task == "pretrain":
        _validate_pretraining(config, (config.image_size // int(patch)) ** 2)
    else:
        _validate_downstream(config)
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
    if config.dataset.source not in SOURCES:
        names = ", ".join(map(repr, SOURCES[:-1]))
        raise ConfigError(f"dataset.source={config.dataset.source!r} must be {names} or {SOURCES[-1]!r}")
    if config.batch_size % jax.process_count():
        raise ConfigError(f"batch_size={config.batch_size} is not a multiple of the {jax.process_count()} hosts")
    for key in ("seed", "skip_nonfinite_steps", "profile_steps"):  # seeds: numpy's generators take none < 0
        if config[key] < 0:
            raise ConfigError(f"{key}={config[key]} must be >= 0")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[key] < 1:
            raise ConfigError(f"{key}={config[key]} must be >= 1")


def _validate_pretraining(config: ml_collections.ConfigDict, num_patches: int) -> None:
    if not 0 <= config.mask_ratio < 1:
        raise ConfigError(f"mask_ratio={config.mask_ratio} must be in [0, 1)")
    if num_kept(num_patches, config.mask_ratio) < 1:
        raise ConfigError(f"mask_ratio={config.mask_ratio} keeps no patch of the {num_patches} in an image")
    if config.model.decoder_width % config.model.decoder_heads or config.model.decoder_width % 4:
        raise ConfigError(
            f"model.decoder_width={config.model.decoder_width} must be divisible by 4 and by "
            f"model.decoder_heads={config.model.decoder_heads}"
        )
    if config.image_every_steps < 1:
        raise ConfigError(f"image_every_steps={config.image_every_steps} must be >= 1")
    _validate_knn(config)


def _validate_knn(config: ml_collections.ConfigDict) -> None:
    knn = config.knn
    for key, valid, rule in (
        ("every_steps", knn.every_steps >= 0, ">= 0"),
        ("k", knn.k >= 1, ">= 1"),
        ("temperature", knn.temperature > 0, "> 0"),
    ):
        if not valid:
            raise ConfigError(f"knn.{key}={knn[key]} must be {rule}")
    if knn.every_steps == 0:
        return
    if config.dataset.source == "demo":
        raise ConfigError("knn.every_steps > 0 needs labeled data: dataset.source='demo' has no labels")
    if knn.num_train < 1 or knn.num_eval < 1:
        raise ConfigError(f"knn.num_train={knn.num_train} and knn.num_eval={knn.num_eval} must be >= 1")
    if knn.batch_size < 1 or knn.batch_size % jax.device_count():
        raise ConfigError(
            f"knn.batch_size={knn.batch_size} is not a positive multiple of the {jax.device_count()} devices"
        )


def _validate_downstream(config: ml_collections.ConfigDict) -> None:
    if config.num_classes < 2:
        raise ConfigError(f"num_classes={config.num_classes} must be >= 2")
    if not 0 <= config.model.drop_path < 1:
        raise ConfigError(f"model.drop_path={config.model.drop_path} must be in [0, 1)")
    if not 0 < config.layer_decay <= 1:
        raise ConfigError(f"layer_decay={config.layer_decay} must be in (0, 1]")
    augment = config.augment
    if min(augment.mixup, augment.cutmix, augment.label_smoothing, augment.random_erasing) < 0:
        raise ConfigError("augment.mixup, cutmix, label_smoothing and random_erasing must be >= 0")
    if augment.label_smoothing >= 1 or augment.random_erasing > 1 or not 0 <= augment.mixup_switch_prob <= 1:
        raise ConfigError("augment.label_smoothing must be < 1; random_erasing and mixup_switch_prob in [0, 1]")
    if config.eval_every_steps < 1 or config.eval_batch_size < 1:
        raise ConfigError("eval_every_steps and eval_batch_size must be >= 1")
    if config.eval_batch_size % jax.device_count():
        raise ConfigError(
            f"eval_batch_size={config.eval_batch_size} is not a multiple of the {jax.device_count()} devices"
        )
    if config.dataset.source == "demo":
        raise ConfigError("dataset.source='demo' has no labels: fine-tuning and linear probing need a labeled dataset")
    if config.grad_accum_steps != 1:
        raise ConfigError(f"grad_accum_steps={config.grad_accum_steps}: fine-tuning and linear probing take 1 only")


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser for a program with a `--config` file flag, whose failures are one line, not a traceback.

    ml_collections raises a config file's load error (a missing path) only when the config is first used:
    here, at parse time. A file without `get_config()`, a `get_config()` that returns no ConfigDict and a
    bad `--config.key` override are one line too.
    """
    try:
        remaining = app.parse_flags_with_usage(argv)
        config = flags.FLAGS.config
        if not isinstance(config, ml_collections.ConfigDict):
            getattr(config, "lock", None)  # a file that could not be loaded raises its error here
            path = flags.FLAGS["config"].config_filename
            sys.exit(f"error: get_config() of the --config file {path} returned {config!r}, not a ConfigDict")
    except OSError as error:  # ml_collections' message ends with the cause, e.g. "[Errno 2] No such file ..."
        sys.exit(f"error: cannot load the --config file: {str(error).strip().splitlines()[-1].strip()}")
    except (AttributeError, KeyError) as error:
        module = getattr(error, "obj", None)
        if isinstance(module, types.ModuleType):
            sys.exit(f"error: the --config file {module.__file__} defines no {error.name}()")
        message = str(error.args[0] if error.args else error)  # ml_collections escapes quotes and newlines
        message = re.sub(r"[\\']", "", message.replace("\\n", "; "))
        sys.exit(f"error: bad config override: unknown key {message}")
    return remaining
