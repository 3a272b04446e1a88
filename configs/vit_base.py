"""MAE ViT-B/16 pretraining on ImageNet-1k, the paper's recipe (800 epochs, batch 4096)."""

from mae_jax.configuration import base_config


def get_config():
    return base_config()
