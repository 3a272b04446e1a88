"""Linear probe of an MAE ViT-L/16 on ImageNet-1k, the official recipe (90 epochs, LARS, batch 16384; top-1 75.8).

python -m mae_jax.main --config=configs/linprobe_vit_large.py --workdir=DIR --config.init=mae_pretrain_vit_large.pth
"""

from mae_jax.configuration import downstream_config


def get_config():
    config = downstream_config("linprobe")
    config.model.variant = "L/16"
    return config
