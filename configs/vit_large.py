"""MAE ViT-L/16 pretraining on ImageNet-1k, the paper's recipe (800 epochs, batch 4096)."""

from mae_jax.configuration import base_config


def get_config():
    config = base_config()
    config.model.variant = "L/16"
    return config
