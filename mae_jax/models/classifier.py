"""The ViT classifier of the paper's two evaluation protocols, around an MAE-pretrained `Encoder`.

Fine-tuning (official `models_vit.VisionTransformer(global_pool=True)`): average of the patch tokens,
`fc_norm` LayerNorm, linear head initialised with std 2e-5; drop path in the blocks. The position table is
a parameter, as in timm's ViT: fine-tuning trains it, starting from the pretrained sin-cos table.
Linear probing (official `main_linprobe.py`): cls token after the encoder's final norm, BatchNorm without
affine (eps 1e-6, torch's running statistics: `TorchBatchNorm`), linear head initialised with std 0.01; the
encoder is frozen by the training loop.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mae_jax.models.vit import Compute, Encoder, EncoderConfig, layer_norm, truncated_normal

FINETUNE, LINPROBE = "finetune", "linprobe"
# PyTorch's BatchNorm1d momentum 0.1 is flax's 0.9: the running average keeps 90 % of its old value.
BATCH_NORM_MOMENTUM = 0.9


class TorchBatchNorm(nnx.Module):
    """BatchNorm without affine over the rows of (N, width) features, keeping running statistics as torch's
    `BatchNorm1d` does: training normalizes with the batch's mean and biased variance, and the running variance
    averages the unbiased one (N / (N - 1) times it), which evaluation then normalizes with. (flax's BatchNorm
    averages the biased variance.) Its state is flax's, `mean` and `var` BatchStats, so checkpoints keep their
    layout.

    The statistics are over the batch the call sees: under `jax.jit` with the batch sharded over devices, the
    global batch, so N is the global batch size.
    """

    def __init__(self, width: int, *, epsilon: float, momentum: float):
        self.mean = nnx.BatchStat(jnp.zeros((width,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((width,), jnp.float32))
        self.epsilon, self.momentum = epsilon, momentum

    def __call__(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
        """Normalized x (N, width); with `use_running_average` False, the running statistics move
        1 - momentum of the way to the batch's."""
        if use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            count = x.shape[0]
            if count < 2:
                raise ValueError(f"BatchNorm needs more than 1 row per training batch, got {count} (as torch's)")
            mean, var = jnp.mean(x, axis=0), jnp.var(x, axis=0)
            unbiased = jax.lax.stop_gradient(var * (count / (count - 1)))
            self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * jax.lax.stop_gradient(mean)
            self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * unbiased
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    encoder: EncoderConfig
    num_classes: int
    protocol: str = FINETUNE  # FINETUNE or LINPROBE
    global_pool: bool = True  # fine-tuning only: mean of patch tokens + fc_norm instead of the cls token
    drop_path: float = 0.0  # highest drop-path rate (the last block's); rates rise linearly with depth
    compute: Compute = dataclasses.field(default_factory=Compute)

    def __post_init__(self):
        if self.protocol not in (FINETUNE, LINPROBE):
            raise ValueError(f"protocol {self.protocol!r} must be {FINETUNE!r} or {LINPROBE!r}")


class Classifier(nnx.Module):
    def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs):
        self.config = config
        width = config.encoder.width
        self.encoder = Encoder(
            config.encoder, compute=config.compute, drop_path=config.drop_path, trained_pos_embed=True, rngs=rngs
        )
        if config.protocol == FINETUNE:
            compute = config.compute
            self.fc_norm = layer_norm(width, rngs, compute.jnp_dtype, compute.kernels) if config.global_pool else None
            head_std = 2e-5
        else:
            self.head_norm = TorchBatchNorm(width, epsilon=1e-6, momentum=BATCH_NORM_MOMENTUM)
            head_std = 0.01
        self.head = nnx.Linear(width, config.num_classes, kernel_init=truncated_normal(head_std), rngs=rngs)

    @property
    def pools_tokens(self) -> bool:
        return self.config.protocol == FINETUNE and self.config.global_pool

    def features(self, images: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """(N, width) float32 features that the head reads; `rngs` switches on drop path."""
        if self.pools_tokens:
            tokens = self.encoder(images, final_norm=False, rngs=rngs)
            return self.fc_norm(tokens[:, 1:].mean(axis=1)).astype(jnp.float32)
        return self.encoder(images, rngs=rngs)[:, 0].astype(jnp.float32)

    def __call__(self, images: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits (N, num_classes). Linear probing: `train` normalizes with batch statistics and updates the
        running ones; the features never pass gradients to the frozen encoder."""
        features = self.features(images, rngs)
        if self.config.protocol == LINPROBE:
            features = self.head_norm(jax.lax.stop_gradient(features), use_running_average=not train)
        return self.head(features)
