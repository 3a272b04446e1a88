"""The paper's ablations at small scale: MAE on Fashion-MNIST, offline, minutes per run on a CPU.

The argument after the colon names the ablated settings, comma-separated (none: the baseline):

    python -m mae_jax.main --config=configs/ablation.py --workdir=ab/base
    python -m mae_jax.main --config=configs/ablation.py:mask_ratio=0.5 --workdir=ab/ratio_0.5      # Fig. 5
    python -m mae_jax.main --config=configs/ablation.py:masking=block --workdir=ab/block           # Fig. 6
    python -m mae_jax.main --config=configs/ablation.py:masking=block,mask_ratio=0.5 --workdir=ab/block_0.5
    python -m mae_jax.main --config=configs/ablation.py:decoder_depth=1 --workdir=ab/depth_1        # Table 1a
    python -m mae_jax.main --config=configs/ablation.py:decoder_width=32 --workdir=ab/width_32      # Table 1b
    python -m mae_jax.main --config=configs/ablation.py:mask_token_in_encoder --workdir=ab/enc_mask # Table 1c
    python -m mae_jax.main --config=configs/ablation.py:target=pixel --workdir=ab/pixel              # Table 1d

Every run reports the online linear probe (`probe_top1`) and kNN (`knn_top1`) of its encoder. The offline
linear probe of a run's encoder, the paper's metric, is the `linprobe` variant:

    python -m mae_jax.main --config=configs/ablation.py:linprobe --workdir=ab/base_probe --config.init=ab/base

The images are resized to 32 px (8 x 8 patches of 4 px) so that grid masking's 2 x 2 cells tile the image.
"""

from collections.abc import Callable

import ml_collections

from configs import fashion_mnist

IMAGE_SIZE = 32  # 8 x 8 patches: grid masking keeps one of every 2 x 2
PRETRAIN_EPOCHS = 3


def _set(key: str, parse: Callable[[str], object]) -> Callable[[ml_collections.ConfigDict, str], None]:
    def apply(config: ml_collections.ConfigDict, value: str) -> None:
        *parents, leaf = key.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        target[leaf] = parse(value)

    return apply


# ablation name -> what it sets from its value ("" for a bare flag)
ABLATIONS: dict[str, Callable[[ml_collections.ConfigDict, str], None]] = {
    "mask_ratio": _set("mask_ratio", float),
    "masking": _set("model.masking", str),
    "decoder_depth": _set("model.decoder_depth", int),
    "decoder_width": _set("model.decoder_width", int),
    "mask_token_in_encoder": lambda config, value: setattr(config.model, "mask_tokens_in_encoder", True),
    "target": _set("model.norm_pix_loss", lambda value: {"norm_pixel": True, "pixel": False}[value]),
}


def get_config(ablations: str = "") -> ml_collections.ConfigDict:
    if ablations == "linprobe":
        config = fashion_mnist.get_config("linprobe")
        config.image_size = IMAGE_SIZE
        return config
    config = fashion_mnist.get_config("pretrain")
    config.image_size = IMAGE_SIZE
    config.num_epochs = PRETRAIN_EPOCHS
    config.checkpoint_every_steps = 500
    config.evals.reconstruction.every_steps = 500
    config.evals.knn.every_steps = 500
    config.evals.probe.every_steps = 500
    for ablation in filter(None, ablations.split(",")):
        name, _, value = ablation.partition("=")
        if name not in ABLATIONS:
            raise ValueError(f"unknown ablation {name!r} in {ablations!r}: use {', '.join(ABLATIONS)} or linprobe")
        try:
            ABLATIONS[name](config, value)
        except (KeyError, ValueError):
            raise ValueError(f"ablation {ablation!r}: bad value {value!r}") from None
    return config
