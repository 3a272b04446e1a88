"""Model FLOPs of a train step, and the devices' peak matmul rates: for TFLOP/s and MFU in the training
summaries and the benchmark.

FLOPs are counted analytically from the shapes: 2 per multiply-add of every matmul (the patch embedding of
the patches the encoder sees, the linears, the two attention products), forward once and backward twice,
whatever rematerialization recomputes.
"""

from __future__ import annotations

import jax

from mae_jax.models.classifier import LINPROBE, ClassifierConfig
from mae_jax.models.mae import MAEConfig, num_kept
from mae_jax.models.vit import EncoderConfig

# Dense matmul peak per JAX device, TFLOP/s: (bfloat16, float32 at JAX's default precision). TPU v2/v3
# devices are single cores; TPUs run float32 matmuls as bfloat16 passes, NVIDIA GPUs as TF32.
PEAK_TFLOPS = {
    "TPU v2": (22.5, 22.5),
    "TPU v3": (61.5, 61.5),
    "TPU v4": (275.0, 275.0),
    "TPU v5 lite": (197.0, 197.0),
    "TPU v5e": (197.0, 197.0),
    "TPU v5p": (459.0, 459.0),
    "TPU v6 lite": (918.0, 918.0),
    "TPU v6e": (918.0, 918.0),
    "H100": (989.0, 494.0),
    "H200": (989.0, 494.0),
    "H800": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "L4": (121.0, 60.0),
}


def peak_tflops(device: jax.Device, dtype: str) -> float | None:
    """The table's peak for `device` at compute `dtype` ("bfloat16" or "float32"); None if not listed."""
    for kind, peaks in PEAK_TFLOPS.items():
        if kind.lower() in device.device_kind.lower():
            return peaks[0] if dtype == "bfloat16" else peaks[1]
    return None


def block_flops(tokens: int, width: int, mlp_ratio: int) -> int:
    """Forward matmul FLOPs of one pre-norm block on one sequence: qkv, proj, MLP, and the two attention
    products (q k^T and attention x v)."""
    return 2 * tokens * width * width * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * width


def patch_embed_flops(enc: EncoderConfig, patches: int) -> int:
    return 2 * patches * enc.patch_dim * enc.width


def forward_flops(config: MAEConfig, mask_ratio: float) -> int:
    """Forward matmul FLOPs of the MAE on one image."""
    enc = config.encoder
    patches, patch_dim = enc.num_patches, enc.patch_dim
    embedded = patches if config.mask_tokens_in_encoder else num_kept(patches, mask_ratio)  # MAE: visible only
    encoder_tokens = 1 + embedded
    return (
        patch_embed_flops(enc, embedded)
        + enc.depth * block_flops(encoder_tokens, enc.width, enc.mlp_ratio)
        + 2 * encoder_tokens * enc.width * config.decoder_width  # decoder embedding
        + config.decoder_depth * block_flops(1 + patches, config.decoder_width, enc.mlp_ratio)
        + 2 * (1 + patches) * config.decoder_width * patch_dim  # pixel prediction
    )


def train_flops(config: MAEConfig, mask_ratio: float, batch_size: int) -> int:
    """Model FLOPs of one pretraining step: forward + backward (2x forward)."""
    return 3 * forward_flops(config, mask_ratio) * batch_size


def classifier_train_flops(config: ClassifierConfig, batch_size: int) -> int:
    """Model FLOPs of one fine-tuning or linear-probing step. A probe's frozen encoder runs forward only."""
    enc = config.encoder
    tokens = enc.num_patches
    encoder = patch_embed_flops(enc, tokens) + enc.depth * block_flops(1 + tokens, enc.width, enc.mlp_ratio)
    head = 2 * enc.width * config.num_classes
    return (encoder * (1 if config.protocol == LINPROBE else 3) + 3 * head) * batch_size
