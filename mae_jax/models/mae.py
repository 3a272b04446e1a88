"""The Masked Autoencoder: masking from noise, encoder on visible tokens, decoder, loss on removed patches."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.models.vit import (
    Block,
    Compute,
    Encoder,
    EncoderConfig,
    FixedEmbedding,
    layer_norm,
    linear,
    make_blocks,
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

    def __post_init__(self):
        if self.masking not in MASKINGS:
            raise ValueError(f"masking={self.masking!r} must be one of {sorted(MASKINGS)}")

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


# ---------------------------------------------------------------------------------------------------
# Masking strategies: each is a way to draw the (N, L) noise whose smallest floor(L * (1 - ratio)) entries
# are kept, so that the argsort, the encoder on kept tokens and the decoder stay one code path.
# ---------------------------------------------------------------------------------------------------
def random_noise(key: jax.Array, batch_size: int, grid_size: int, mask_ratio: float) -> jax.Array:
    """Uniform noise: every patch equally likely to go, the paper's masking and the official draw."""
    del mask_ratio  # the kept count comes from the argsort alone
    return jax.random.uniform(key, (batch_size, grid_size**2))


# BEiT's block-wise masking generator (Bao et al. 2021, `MaskingGenerator`): rectangles of at least
# BEIT_MIN_BLOCK of a 14 x 14 grid's patches (scaled here to the grid's size), aspect ratio log-uniform in
# [BEIT_MIN_ASPECT, 1 / BEIT_MIN_ASPECT], placed until the mask holds the patches to remove.
BEIT_MIN_BLOCK, BEIT_GRID_PATCHES, BEIT_MIN_ASPECT = 16, 196, 0.3
# Placement attempts per image: BEiT stops after 10 failures in a row; a fixed count keeps it one XLA loop.
BLOCK_ATTEMPTS = 100


def min_block_patches(num_patches: int) -> int:
    """BEiT's smallest block (16 of 196 patches), as the same share of a grid of `num_patches`."""
    return max(1, round(BEIT_MIN_BLOCK * num_patches / BEIT_GRID_PATCHES))


def block_mask(key: jax.Array, grid_size: int, num_masked: int) -> jax.Array:
    """One (grid, grid) bool mask of BEiT-style blocks holding at most `num_masked` patches.

    Each attempt draws a block's area uniformly between the smallest block and the patches still to mask,
    its aspect log-uniformly, and a position uniformly; it is placed if it fits the grid and adds between 1
    and the still-missing number of patches, as in BEiT. Patches the attempts leave missing (the last gap
    can be smaller than any block) are filled by `block_noise` at random.
    """
    min_block = min_block_patches(grid_size**2)
    rows, cols = jnp.arange(grid_size)[:, None], jnp.arange(grid_size)[None, :]
    log_aspect = (np.log(BEIT_MIN_ASPECT), -np.log(BEIT_MIN_ASPECT))

    def attempt(key: jax.Array, mask: jax.Array) -> jax.Array:
        area_key, aspect_key, top_key, left_key = jax.random.split(key, 4)
        missing = num_masked - mask.sum()
        # Python's random.uniform(a, b) = a + (b - a) * U, also for b < a, as BEiT calls it
        area = min_block + (missing - min_block) * jax.random.uniform(area_key)
        aspect = jnp.exp(jax.random.uniform(aspect_key, minval=log_aspect[0], maxval=log_aspect[1]))
        height = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
        width = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
        top = jax.random.randint(top_key, (), 0, jnp.maximum(grid_size - height + 1, 1))
        left = jax.random.randint(left_key, (), 0, jnp.maximum(grid_size - width + 1, 1))
        block = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
        added = (block & ~mask).sum()
        fits = (height < grid_size) & (width < grid_size) & (added > 0) & (added <= missing)
        return mask | (block & fits)

    keys = jax.random.split(key, BLOCK_ATTEMPTS)
    mask, _ = jax.lax.scan(lambda mask, key: (attempt(key, mask), None), jnp.zeros((grid_size,) * 2, bool), keys)
    return mask


def block_noise(key: jax.Array, batch_size: int, grid_size: int, mask_ratio: float) -> jax.Array:
    """Noise in [0, 1) on kept patches and [1, 2) on each image's `block_mask`: the blocks go first; patches
    still missing are the kept ones of largest noise, i.e. random."""
    num_patches = grid_size**2
    block_key, jitter_key = jax.random.split(key)
    num_masked = num_patches - num_kept(num_patches, mask_ratio)
    masks = jax.vmap(lambda key: block_mask(key, grid_size, num_masked))(jax.random.split(block_key, batch_size))
    return jax.random.uniform(jitter_key, (batch_size, num_patches)) + masks.reshape(batch_size, -1)


def grid_pattern(grid_size: int) -> np.ndarray:
    """(grid * grid,) bool: the top-left patch of every 2 x 2 cell, the paper's grid-wise sampling."""
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    return ((rows % 2 == 0) & (cols % 2 == 0)).reshape(-1)


def grid_noise(key: jax.Array, batch_size: int, grid_size: int, mask_ratio: float) -> jax.Array:
    """Noise in [0, 1) on `grid_pattern` and [1, 2) elsewhere: on an even grid at ratio 0.75 exactly the
    pattern is kept (configuration.validate holds runs to that)."""
    del mask_ratio
    pattern = jnp.asarray(grid_pattern(grid_size))
    return jax.random.uniform(key, (batch_size, grid_size**2)) + ~pattern


# model.masking -> its noise: (key, batch_size, grid_size, mask_ratio) -> (N, L)
MASKINGS = {"random": random_noise, "block": block_noise, "grid": grid_noise}
GRID_MASK_RATIO = 0.75


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
        self.blocks = make_blocks(
            [
                Block(width, config.decoder_heads, enc.mlp_ratio, compute=compute, rngs=rngs)
                for _ in range(config.decoder_depth)
            ],
            compute.scan_blocks,
        )
        self.norm = layer_norm(width, rngs, dtype, compute.kernels)
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

    def draw_noise(self, key: jax.Array, batch_size: int, mask_ratio: float) -> jax.Array:
        """Per-sample noise that fully determines the mask, drawn as `config.masking` says (`MASKINGS`);
        "random" draws it as the official forward does."""
        return MASKINGS[self.config.masking](key, batch_size, self.config.encoder.grid_size, mask_ratio)

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
            noise = self.draw_noise(key, images.shape[0], mask_ratio)
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
