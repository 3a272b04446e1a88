"""mae_jax: Masked Autoencoders (He et al., 2021) in JAX and Flax NNX."""

__version__ = "0.1.0"
