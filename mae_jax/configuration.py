"""Every config key with its default, and the checks that run before anything compiles.

Config files in `configs/` start from `base_config()` and change what their recipe needs; a key that is
not defined here is an error, so a typo never silently falls back to a default. The command lines read
them with `parse_flags`, which reports a bad --config path or override in one line.
"""

from __future__ import annotations

import math
import re
import sys
import types

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_dict

from mae_jax import sharding
from mae_jax.models.mae import GRID_MASK_RATIO, MASKINGS, MAEConfig, num_kept
from mae_jax.models.ops import check_kernels
from mae_jax.models.vit import VARIANTS, Compute


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key."""


TASKS = ("pretrain", "finetune", "linprobe")
CROPS = ("random", "center")  # `augment.crop`: the downstream tasks' training views


def base_config() -> ml_collections.ConfigDict:
    """The paper's ViT-B/16 pretraining recipe on ImageNet-1k (800 epochs)."""
    config = ml_collections.ConfigDict()
    config.task = "pretrain"
    config.seed = 0

    config.dataset = ml_collections.ConfigDict()
    # `source`: a name in input_pipeline.SOURCES, which says what each source reads from `name`, `split` and
    # `data_dir` (input_pipeline.make_source refuses other names when a run opens its data, before compiling).
    config.dataset.source = "tfds"
    config.dataset.name = "imagenet2012"
    config.dataset.split = "train"
    config.dataset.data_dir = config_dict.placeholder(str)  # None with tfds: ~/tensorflow_datasets
    # Per-channel pixel mean and std (of values in [0, 1]) that the model's inputs are normalized with, one
    # per channel of `num_channels`: ImageNet's by default, as the official code
    config.dataset.mean = (0.485, 0.456, 0.406)
    config.dataset.std = (0.229, 0.224, 0.225)

    config.input = ml_collections.ConfigDict()
    config.input.num_threads = 16  # decoding/augmenting threads per host (per worker process with num_workers)
    config.input.num_workers = 0  # > 0: that many grain worker processes per host
    config.input.prefetch = 64  # examples read ahead per host
    # Pretraining: the crop's bicubic resize runs on the accelerator (as costly as the JPEG decode on a host)
    config.input.resize_on_device = True

    config.image_size = 224
    config.num_channels = 3  # image bands the model reads: 1 grayscale, 3 RGB, other counts multi-band (.npy)
    config.mask_ratio = 0.75
    config.model = ml_collections.ConfigDict()
    config.model.variant = "B/16"  # encoder NAME/PATCH, NAME in models.vit.VARIANTS
    config.model.decoder_width = 512
    config.model.decoder_depth = 8
    config.model.decoder_heads = 16
    config.model.norm_pix_loss = True
    config.model.dtype = "float32"  # compute dtype, "float32" or "bfloat16"; params and optimizer stay float32
    config.model.attention = "xla"  # "xla" or "cudnn" (NVIDIA GPUs, bfloat16): jax.nn.dot_product_attention
    # Backward passes of the blocks' LayerNorm, attention and GELU: "custom" (hand-written, faster on XLA:CPU)
    # or "autodiff" (jax's, of the same forwards: for comparing on GPUs); the same results up to rounding
    config.model.kernels = "custom"
    config.model.remat = False  # recompute block activations in the backward pass: less memory, more time
    # Run the encoder's and decoder's blocks as one scanned layer each (stacked parameters): XLA compiles one
    # block instead of all; saved parameters and exports stay in the unrolled layout (models/vit.py)
    config.model.scan_blocks = False
    config.model.mask_tokens_in_encoder = False  # the paper's slower baseline (Table 2): encoder sees all tokens
    # Which patches are removed (models/mae.py MASKINGS): "random" (the paper's), "block" (BEiT-style blocks,
    # the paper's Fig. 6 middle) or "grid" (keep one patch of every 2 x 2, Fig. 6 right; mask_ratio 0.75)
    config.model.masking = "random"

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
    # Dense matmul peak of one device in TFLOP/s at the compute dtype, for the MFU the summaries report; 0: the
    # device kind's entry in flops.PEAK_TFLOPS (a kind it lacks gets no MFU, and says so in the log)
    config.peak_tflops = 0.0
    config.checkpoint_every_steps = 1000  # also at the end and on preemption (SIGTERM)
    config.keep_checkpoints = 3
    config.skip_nonfinite_steps = 0  # 0: stop at a non-finite loss/gradient; N: skip up to N in a row
    # > 0: process 0 traces that many steps with jax.profiler into WORKDIR/plugins/profile (TensorBoard's
    # profile tab, XProf, Perfetto), starting a few steps after each (re)start, past the compile
    config.profile_steps = 0
    # Keep compiled steps in WORKDIR/compilation_cache (JAX's persistent cache), so that a restarted run skips
    # the compile; a cache directory set through JAX_COMPILATION_CACHE_DIR takes precedence
    config.compilation_cache = True

    # Evaluations while training (mae_jax/evaluators), each every `every_steps` steps and after the last one
    config.evals = ml_collections.ConfigDict()
    config.evals.reconstruction = ml_collections.ConfigDict()  # the reconstruction grid, to TensorBoard
    config.evals.reconstruction.every_steps = 5000
    config.evals.reconstruction.num_images = 8  # samples in the grid
    # The image bands shown as red, green and blue (grayscale, one band, shows as gray)
    config.evals.reconstruction.bands = (0, 1, 2)
    knn = config.evals.knn = ml_collections.ConfigDict()  # weighted k-NN accuracy of the encoder's cls features
    knn.every_steps = 0  # 0: off
    knn.train_split = "train"  # labeled examples the neighbours come from (same dataset.source/name)
    knn.eval_split = "test"
    # that many examples of each split, drawn with `seed`: stratified by class for folder and fashion_mnist,
    # uniform for tfds (its labels sit in the records); the same subsets at every evaluation
    knn.num_train = 10000
    knn.num_eval = 2000
    knn.k = 20
    knn.temperature = 0.07  # neighbour weight exp(cosine similarity / temperature), as DINO's
    knn.batch_size = 256  # global, over all hosts
    # A linear classifier trained from scratch on the encoder's frozen cls features at every evaluation
    # (evaluators/probe.py): the official probe's head (BatchNorm without affine, linear), Adam, cosine decay
    probe = config.evals.probe = ml_collections.ConfigDict()
    probe.every_steps = 0  # 0: off
    probe.train_split = "train"  # labeled examples the head trains on (same dataset.source/name)
    probe.eval_split = "test"
    probe.num_train = 10000  # subsets drawn as knn's: with the same values, the same examples
    probe.num_eval = 2000
    probe.batch_size = 256  # feature extraction; global, over all hosts
    probe.epochs = 100  # the head's training, on the cached features: about 1 s for 10,000 64-wide on a CPU
    probe.head_batch_size = 256
    probe.learning_rate = 0.1  # Adam's, decayed to 0 (cosine): within 1 point of the optimum (L-BFGS)
    return config


def downstream_config(task: str) -> ml_collections.ConfigDict:
    """The official ViT-B/16 fine-tuning ("finetune") or linear-probing ("linprobe") recipe on ImageNet-1k.

    Keys shared with pretraining mean the same; the model keys describe the classifier around the encoder.
    """
    if task not in TASKS[1:]:
        raise ValueError(f"downstream task {task!r} must be one of {TASKS[1:]}")
    finetune = task == "finetune"
    config = base_config()
    del config.mask_ratio
    pretraining_only = ("decoder_width", "decoder_depth", "decoder_heads", "norm_pix_loss", "mask_tokens_in_encoder")
    for key in (*pretraining_only, "masking"):
        del config.model[key]
    config.task = task
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
    # Training views: "random" crops of `crop_scale` of the area (torchvision's default range) and flips, as the
    # official recipes; "center" trains on the evaluation's resize + center crop itself, unflipped (the linear
    # probes of CLIP and others, which train on features without augmentation)
    config.augment.crop = "random"
    config.augment.crop_scale = (0.08, 1.0)
    config.augment.rand_augment = finetune  # RandAugment rand-m9-mstd0.5-inc1
    config.augment.mixup = 0.8 if finetune else 0.0  # Beta(alpha, alpha); 0 switches it off
    config.augment.cutmix = 1.0 if finetune else 0.0
    config.augment.mixup_switch_prob = 0.5  # with both on: the share of batches that use cutmix
    config.augment.label_smoothing = 0.1 if finetune else 0.0
    config.augment.random_erasing = 0.25 if finetune else 0.0  # probability per image

    config.evals = ml_collections.ConfigDict()  # the pretraining evaluations make no sense for a classifier
    config.evals.classification = ml_collections.ConfigDict()  # top-1/top-5 of the classifier (also at the end)
    config.evals.classification.every_steps = 1000
    config.evals.classification.batch_size = 1024  # global, over all hosts
    config.evals.classification.split = "validation"  # of the training dataset
    return config


def model_config(config: ml_collections.ConfigDict) -> MAEConfig:
    m = config.model
    return MAEConfig.from_variant(
        m.variant,
        config.image_size,
        config.num_channels,
        decoder_width=m.decoder_width,
        decoder_depth=m.decoder_depth,
        decoder_heads=m.decoder_heads,
        norm_pix_loss=m.norm_pix_loss,
        compute=Compute(m.dtype, m.attention, m.remat, m.scan_blocks, m.kernels),
        mask_tokens_in_encoder=m.mask_tokens_in_encoder,
        masking=m.masking,
    )


# Keys that moved, old -> new: a config or override that still sets one is told where it went, in one line.
MOVED_KEYS = {
    "knn": "evals.knn",
    "image_every_steps": "evals.reconstruction.every_steps",
    "num_images": "evals.reconstruction.num_images",
    "eval_every_steps": "evals.classification.every_steps",
    "eval_batch_size": "evals.classification.batch_size",
    "dataset.eval_split": "evals.classification.split",
}


def moved_key(key: str) -> str | None:
    """Where the old dotted `key` (`MOVED_KEYS`, or a key inside a moved block) lives now; None if it did not move."""
    for old, new in MOVED_KEYS.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return None


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
    for key in unknown:
        if moved_key(key):
            raise ConfigError(f"config key {key} moved to {moved_key(key)}")
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; see mae_jax/configuration.py for the valid ones")
    name, _, patch = config.model.variant.partition("/")
    if name not in VARIANTS or not patch.isdigit() or int(patch) < 1:
        raise ConfigError(f"model.variant={config.model.variant!r} is not NAME/PATCH with NAME in {sorted(VARIANTS)}")
    if config.image_size % int(patch):
        raise ConfigError(f"image_size={config.image_size} is not divisible by the patch size {patch}")
    _validate_channels(config)
    if task == "pretrain":
        _validate_pretraining(config, (config.image_size // int(patch)) ** 2)
    else:
        _validate_downstream(config)
    try:
        check_kernels(config.model.attention, config.model.dtype, jax.default_backend(), config.model.kernels)
    except ValueError as error:
        raise ConfigError(f"model.{error}") from None  # its messages name `attention=`, `dtype=` and `kernels=`
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
    if config.batch_size % jax.process_count():
        raise ConfigError(f"batch_size={config.batch_size} is not a multiple of the {jax.process_count()} hosts")
    for key in ("seed", "skip_nonfinite_steps", "profile_steps"):  # seeds: numpy's generators take none < 0
        if config[key] < 0:
            raise ConfigError(f"{key}={config[key]} must be >= 0")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[key] < 1:
            raise ConfigError(f"{key}={config[key]} must be >= 1")
    if config.peak_tflops < 0:
        raise ConfigError(f"peak_tflops={config.peak_tflops} must be > 0 (TFLOP/s per device), or 0 for the table's")


def _validate_channels(config: ml_collections.ConfigDict) -> None:
    channels = config.num_channels
    if channels < 1:
        raise ConfigError(f"num_channels={channels} must be >= 1")
    for key in ("mean", "std"):
        values = config.dataset[key]
        if len(values) != channels:
            raise ConfigError(
                f"dataset.{key} has {len(values)} values for num_channels={channels}: give one per channel"
            )
    if min(config.dataset.std) <= 0:
        raise ConfigError(f"dataset.std={tuple(config.dataset.std)} must be > 0 in every channel")


def _validate_pretraining(config: ml_collections.ConfigDict, num_patches: int) -> None:
    if not 0 <= config.mask_ratio < 1:
        raise ConfigError(f"mask_ratio={config.mask_ratio} must be in [0, 1)")
    if num_kept(num_patches, config.mask_ratio) < 1:
        raise ConfigError(f"mask_ratio={config.mask_ratio} keeps no patch of the {num_patches} in an image")
    masking = config.model.masking
    if masking not in MASKINGS:
        raise ConfigError(f"model.masking={masking!r} must be one of {sorted(MASKINGS)}")
    if masking == "grid" and (config.mask_ratio != GRID_MASK_RATIO or math.isqrt(num_patches) % 2):
        raise ConfigError(
            f"model.masking='grid' keeps one patch of every 2 x 2: it needs mask_ratio={GRID_MASK_RATIO} (not "
            f"{config.mask_ratio}) and an even number of patches per side (not {math.isqrt(num_patches)})"
        )
    if config.model.decoder_width % config.model.decoder_heads or config.model.decoder_width % 4:
        raise ConfigError(
            f"model.decoder_width={config.model.decoder_width} must be divisible by 4 and by "
            f"model.decoder_heads={config.model.decoder_heads}"
        )
    reconstruction = config.evals.reconstruction
    for key in ("every_steps", "num_images"):
        if reconstruction[key] < 1:
            raise ConfigError(f"evals.reconstruction.{key}={reconstruction[key]} must be >= 1")
    bands = tuple(reconstruction.bands)
    if len(bands) != 3 or (config.num_channels >= 3 and not all(0 <= band < config.num_channels for band in bands)):
        raise ConfigError(
            f"evals.reconstruction.bands={bands} must be 3 bands in [0, num_channels={config.num_channels}), "
            "shown as red, green and blue"
        )
    _validate_knn(config)
    _validate_probe(config)


def _validate_knn(config: ml_collections.ConfigDict) -> None:
    knn = config.evals.knn
    rules = (("k", knn.k >= 1, ">= 1"), ("temperature", knn.temperature > 0, "> 0"))
    _validate_labeled_evaluation(config, "knn", rules)


def _validate_probe(config: ml_collections.ConfigDict) -> None:
    probe = config.evals.probe
    rules = (
        ("epochs", probe.epochs >= 1, ">= 1"),
        ("head_batch_size", probe.head_batch_size >= 1, ">= 1"),
        ("learning_rate", probe.learning_rate > 0, "> 0"),
    )
    _validate_labeled_evaluation(config, "probe", rules)


def _validate_labeled_evaluation(config: ml_collections.ConfigDict, name: str, rules: tuple) -> None:
    """An evaluator on labeled subsets of the run's dataset (kNN, the online probe): `every_steps` and its own
    `rules` ((key, valid, rule) each), then, when it is on, the labeled data and subsets it reads."""
    block = config.evals[name]
    for key, valid, rule in (("every_steps", block.every_steps >= 0, ">= 0"), *rules):
        if not valid:
            raise ConfigError(f"evals.{name}.{key}={block[key]} must be {rule}")
    if block.every_steps == 0:
        return
    if config.dataset.source == "demo":
        raise ConfigError(f"evals.{name}.every_steps > 0 needs labeled data: dataset.source='demo' has no labels")
    if block.num_train < 1 or block.num_eval < 1:
        raise ConfigError(
            f"evals.{name}.num_train={block.num_train} and evals.{name}.num_eval={block.num_eval} must be >= 1"
        )
    if block.batch_size < 1 or block.batch_size % jax.device_count():
        raise ConfigError(
            f"evals.{name}.batch_size={block.batch_size} is not a positive multiple of the {jax.device_count()} devices"
        )


def _validate_downstream(config: ml_collections.ConfigDict) -> None:
    if config.num_classes < 2:
        raise ConfigError(f"num_classes={config.num_classes} must be >= 2")
    if not 0 <= config.model.drop_path < 1:
        raise ConfigError(f"model.drop_path={config.model.drop_path} must be in [0, 1)")
    if not 0 < config.layer_decay <= 1:
        raise ConfigError(f"layer_decay={config.layer_decay} must be in (0, 1]")
    augment = config.augment
    if augment.rand_augment and config.num_channels not in (1, 3):
        raise ConfigError(
            f"augment.rand_augment needs num_channels 1 or 3 (its PIL ops take L or RGB images), not "
            f"{config.num_channels}"
        )
    if augment.crop not in CROPS:
        raise ConfigError(f"augment.crop={augment.crop!r} must be one of {CROPS}")
    low, high = augment.crop_scale
    if not 0 < low <= high <= 1:
        raise ConfigError(
            f"augment.crop_scale={tuple(augment.crop_scale)} must be (low, high) with 0 < low <= high <= 1"
        )
    if min(augment.mixup, augment.cutmix, augment.label_smoothing, augment.random_erasing) < 0:
        raise ConfigError("augment.mixup, cutmix, label_smoothing and random_erasing must be >= 0")
    if augment.label_smoothing >= 1 or augment.random_erasing > 1 or not 0 <= augment.mixup_switch_prob <= 1:
        raise ConfigError("augment.label_smoothing must be < 1; random_erasing and mixup_switch_prob in [0, 1]")
    classification = config.evals.classification
    if classification.every_steps < 1 or classification.batch_size < 1:
        raise ConfigError("evals.classification.every_steps and evals.classification.batch_size must be >= 1")
    if classification.batch_size % jax.device_count():
        raise ConfigError(
            f"evals.classification.batch_size={classification.batch_size} is not a multiple of the "
            f"{jax.device_count()} devices"
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
    bad `--config.key` override are one line too; a key that moved (`MOVED_KEYS`) is named with its new place.
    A `get_config(arg)` that raises (e.g. an unknown `configs/ablation.py:NAME`) is its error's last line.
    """
    try:
        try:
            remaining = flags.FLAGS(argv)
        except flags.Error as error:
            message = str(error).strip()
            if "Error whilst parsing config file" not in message:
                app.parse_flags_with_usage(argv)  # absl's message and usage for every other bad flag
            sys.exit(f"error: get_config() of the --config file failed: {message.splitlines()[-1].strip()}")
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
        message = re.sub(r"[\\']", "", message.replace("\\n", "; ").replace("\n", "; "))
        overrides = [arg.removeprefix("--config.").partition("=")[0] for arg in argv if arg.startswith("--config.")]
        unknown = message.split(";")[0].strip().strip('"')  # the key a --config file reads, e.g. `config.knn.k = 5`
        for key in [*overrides, unknown]:
            if moved_key(key):
                sys.exit(f"error: config key {key} moved to {moved_key(key)}")
        sys.exit(f"error: bad config override: unknown key {message}")
    return remaining
