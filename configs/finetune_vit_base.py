"""Fine-tune an MAE ViT-B/16 on ImageNet-1k, the official recipe (100 epochs, batch 1024, top-1 83.6).

python -m mae_jax.main --config=configs/finetune_vit_base.py --workdir=DIR --config.init=PRETRAIN_WORKDIR/encoder
"""

from mae_jax.configuration import downstream_config


def get_config():
    return downstream_config("finetune")
