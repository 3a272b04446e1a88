"""Vision Transformer encoder and the Masked Autoencoder built on it."""
