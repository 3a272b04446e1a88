"""Fine-tune an MAE ViT-L/16 on ImageNet-1k, the official recipe (50 epochs, batch 1024, top-1 85.9)."""

from mae_jax.configuration import downstream_config


def get_config():
    config = downstream_config("finetune")
    config.model.variant = "L/16"
    config.model.drop_path = 0.2
    config.num_epochs = 50
    config.base_lr = 1e-3
    config.layer_decay = 0.75
    return config
