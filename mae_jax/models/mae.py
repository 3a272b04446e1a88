"""The Masked Autoencoder: masking from noise, encoder on visible tokens, decoder, loss on removed patches."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mae_jax.models.vit import (
    Block,
    Compute,
    Encoder,
    EncoderConfig,
    FixedEmbedding,
    layer_norm,
    linear,
    patchify,
    run_blocks,
    sincos_2d,
    token_init,
)

NORM_PIX_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class MAEConfig:
    """Encoder shape plus the decoder and loss settings of the official `MaskedAutoencoderViT`."""

    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    compute: Compute = dataclasses.field(default_factory=Compute)
    # The paper's Table 2 baseline "encoder w/ [M]": the encoder sees every token, the removed ones replaced
    # by a learned mask token (an extra parameter); the decoder then unshuffles nothing.
    mask_tokens_in_encoder: bool = False
    masking: str = "random"  # how the noise that picks the removed patches is drawn: a key of MASKINGS

    @classmethod
    def from_variant(cls, variant: str, image_size: int = 224, num_channels: int = 3, **decoder_and_loss) -> MAEConfig:
        return cls(EncoderConfig.from_variant(variant, image_size, num_channels), **decoder_and_loss)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> MAEConfig:
        compute = Compute(**fields.get("compute", {}))  # model.json files from before `compute` have none
        return cls(**{**fields, "encoder": EncoderConfig(**fields["encoder"]), "compute": compute})


class MAEOutput(NamedTuple):
    loss: jax.Array  # scalar
    pred: jax.Array  # (N, L, p*p*C) predicted patches, in image order
    mask: jax.Array  # (N, L) 1 = removed, 0 = kept, in image order
    latent: jax.Array  # (N, 1 + len_keep, D) encoder output on cls + visible tokens


class Masking(NamedTuple):
    ids_keep: jax.Array  # (N, len_keep) grid indices of the kept patches, in ascending-noise order
    mask: jax.Array  # (N, L)
    ids_restore: jax.Array  # (N, L) position of each image-order token in the shuffled order

    def keep(self, per_patch: jax.Array) -> jax.Array:
        """(N, L, D) -> (N, len_keep, D): the kept patches' rows, in ascending-noise order."""
        return jnp.take_along_axis(per_patch, self.ids_keep[:, :, None], axis=1)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    return int(num_patches * (1 - mask_ratio))


def random_masking(noise: jax.Array, mask_ratio: float) -> Masking:
    """Keep the patches with the smallest noise, as the official `random_masking` does."""
    len_keep = num_kept(noise.shape[1], mask_ratio)
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    mask = (ids_restore >= len_keep).astype(jnp.float32)  # float32 also under bfloat16: the loss sums it
    return Masking(ids_shuffle[:, :len_keep], mask, ids_restore)


def reconstruction_loss(target: jax.Array, pred: jax.Array, mask: jax.Array, norm_pix: bool) -> jax.Array:
    """Per-patch MSE against the (N, L, p*p*C) pixel patches, averaged over removed patches of the whole
    batch; norm-pix uses unbiased variance."""
    if norm_pix:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + NORM_PIX_EPS)
    per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


class Decoder(nnx.Module):
    """Light decoder: mask tokens fill the removed positions, then blocks predict every patch's pixels."""

    def __init__(self, config: MAEConfig, *, rngs: nnx.Rngs):
        enc, compute, dtype = config.encoder, config.compute, config.compute.jnp_dtype
        width = config.decoder_width
        self.remat = compute.remat
        self.embed = linear(enc.width, width, rngs, dtype)
        self.mask_token = nnx.Param(token_init(rngs.params(), (1, 1, width)))
        self.pos_embed = FixedEmbedding(jnp.asarray(sincos_2d(width, enc.grid_size))[None])
        self.blocks = nnx.List(
            [
                Block(width, config.decoder_heads, enc.mlp_ratio, compute=compute, rngs=rngs)
                for _ in range(config.decoder_depth)
            ]
        )
        self.norm = layer_norm(width, rngs, dtype)
        self.pred = linear(width, enc.patch_dim, rngs, dtype)

    def __call__(self, latent: jax.Array, ids_restore: jax.Array | None) -> jax.Array:
        """`ids_restore=None`: the latent already holds every token in image order (the baseline)."""
        x = self.embed(latent)
        if ids_restore is not None:
            n, num_visible, width = x.shape[0], x.shape[1] - 1, x.shape[2]
            mask_tokens = jnp.broadcast_to(
                self.mask_token.astype(x.dtype), (n, ids_restore.shape[1] - num_visible, width)
            )
            shuffled = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
            unshuffled = jnp.take_along_axis(shuffled, ids_restore[:, :, None], axis=1)
            x = jnp.concatenate([x[:, :1], unshuffled], axis=1)
        x = x + self.pos_embed.astype(x.dtype)
        return self.pred(self.norm(run_blocks(self.blocks, x, self.remat)))[:, 1:]


class MAE(nnx.Module):
    """`MaskedAutoencoderViT` of facebookresearch/mae, on NHWC images."""

    def __init__(self, config: MAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config.encoder, compute=config.compute, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        if config.mask_tokens_in_encoder:
            self.encoder_mask_token = nnx.Param(token_init(rngs.params(), (1, 1, config.encoder.width)))

    def draw_noise(self, key: jax.Array, batch_size: int) -> jax.Array:
        """Per-sample uniform noise that fully determines the mask, as the official forward draws it."""
        return jax.random.uniform(key, (batch_size, self.config.encoder.num_patches))

    def __call__(
        self,
        images: jax.Array,
        mask_ratio: float = 0.75,
        *,
        noise: jax.Array | None = None,
        key: jax.Array | None = None,
    ) -> MAEOutput:
        """Reconstruct removed patches of NHWC `images`; pass the masking `noise` (N, L) or a `key` to draw it."""
        if noise is None:
            if key is None:
                raise ValueError("MAE needs the masking noise or a PRNG key to draw it: pass noise= or key=")
            noise = self.draw_noise(key, images.shape[0])
        patches = patchify(images, self.config.encoder.patch_size)
        masking = random_masking(noise, mask_ratio)
        if self.config.mask_tokens_in_encoder:
            tokens = self.encoder.embed_patches(patches)
            mask_tokens = (self.encoder_mask_token + self.encoder.pos_embed[:, 1:]).astype(tokens.dtype)
            latent = self.encoder.encode(jnp.where(masking.mask[:, :, None] > 0, mask_tokens, tokens))
            pred = self.decoder(latent, None)
        else:
            # Patches embed independently: embedding only the visible ones gives the official tokens.
            latent = self.encoder.encode(self.encoder.embed_patches(masking.keep(patches), masking.ids_keep))
            pred = self.decoder(latent, masking.ids_restore)
        loss = reconstruction_loss(patches, pred, masking.mask, self.config.norm_pix_loss)
        return MAEOutput(loss, pred, masking.mask, latent)


def abstract_model_state(config: MAEConfig) -> nnx.State:
    """Shapes and dtypes of every variable of `MAE(config)`, without allocating it: the template that
    checkpoints are restored into and converted files are checked against."""
    return nnx.state(nnx.eval_shape(lambda: MAE(config, rngs=nnx.Rngs(0))))
