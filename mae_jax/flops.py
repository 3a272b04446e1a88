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

# Dense (not sparse) matmul peak per JAX device, TFLOP/s: (bfloat16, float32 at JAX's default precision), keyed
# by the exact `jax.Device.device_kind`: a substring would give an L40S the L4's peak, or an RTX A1000 the A100's.
# Names: NVIDIA GPUs report the CUDA device name (NVIDIA's Linux driver README, appendix A, lists them); TPU
# kinds are those of jax's own table (`chip_version_from_device_kind` in jax/_src/pallas/mosaic/tpu_info.py),
# which gives v5e, v5p and v6e two names each. A kind not listed gets no MFU: give the peak on the command line.
# NVIDIA GPUs run float32 matmuls as TF32 and TPUs as bfloat16 passes, so the float32 column is that peak.
_H100_SXM = (989.5, 494.5)  # H100 SXM5 datasheet: BF16 1,979 and TF32 989 TFLOPS with sparsity, halved
_A100 = (312.0, 156.0)  # A100 datasheet (SXM4 and PCIe, 40 and 80 GB): BF16 312, TF32 156 dense
PEAK_TFLOPS = {
    # Cloud TPU system architecture pages, bf16 per chip; v2 and v3 chips are two JAX devices (cores) each
    "TPU v2": (22.5, 22.5),  # 45 per chip
    "TPU v3": (61.5, 61.5),  # 123 per chip
    "TPU v4": (275.0, 275.0),  # one device per chip (megacore)
    "TPU v5 lite": (197.0, 197.0),  # v5e
    "TPU v5e": (197.0, 197.0),
    "TPU v5": (459.0, 459.0),  # v5p
    "TPU v5p": (459.0, 459.0),
    "TPU v6 lite": (918.0, 918.0),  # v6e (Trillium)
    "TPU v6e": (918.0, 918.0),
    "NVIDIA H100 80GB HBM3": _H100_SXM,  # H100 SXM5
    "NVIDIA H200": _H100_SXM,  # H200 SXM datasheet: the same 1,979 / 989 with sparsity
    "NVIDIA GH200 480GB": _H100_SXM,  # GH200 datasheet: the same
    "NVIDIA H100 PCIe": (756.5, 378.0),  # H100 PCIe datasheet: BF16 1,513, TF32 756 with sparsity, halved
    "NVIDIA H100 NVL": (835.5, 417.5),  # H100 NVL datasheet: BF16 1,671, TF32 835 with sparsity, halved
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA L4": (121.0, 60.0),  # L4 datasheet: BF16 242, TF32 120 with sparsity, halved
    "NVIDIA L40S": (362.05, 183.0),  # L40S datasheet: BF16 362.05, TF32 183 dense
    "NVIDIA L40": (181.05, 90.5),  # L40 datasheet: BF16 181.05, TF32 90.5 dense
}


def peak_tflops(device: jax.Device, dtype: str) -> float | None:
    """The table's dense peak for `device` at compute `dtype` ("bfloat16" or "float32"); None for a device kind
    the table does not list by its exact name (no MFU rather than a neighbour's peak)."""
    peaks = PEAK_TFLOPS.get(device.device_kind)
    if peaks is None:
        return None
    return peaks[0] if dtype == "bfloat16" else peaks[1]


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
