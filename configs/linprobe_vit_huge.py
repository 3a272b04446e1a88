"""Linear probe of an MAE ViT-H/14 on ImageNet-1k, the official recipe (90 epochs, LARS, batch 16384; top-1 76.6).

python -m mae_jax.main --config=configs/linprobe_vit_huge.py --workdir=DIR --config.init=mae_pretrain_vit_huge.pth
"""

from mae_jax.configuration import downstream_config


def get_config():
    config = downstream_config("linprobe")
    config.model.variant = "H/14"
    return config
